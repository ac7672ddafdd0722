"""Base classes of every pruning method, the ``keep`` convention and the method registry.

A method is a small frozen ``@dataclass(frozen=True)`` validated in ``__post_init__`` and registered
by name: once built it cannot be changed, so what was validated is what runs (``dataclasses.replace``
builds a new, validated object; a ``__post_init__`` that normalises a field uses
``object.__setattr__``). The ``check_*`` helpers below validate fields with messages that name the
argument and its valid values. The base class of its *stage* owns everything but the method's own rule:

* :class:`VisualPruner` (stage ``"visual"``): acts on the image embeddings of one image before the
  language model sees them; the integration calls :meth:`VisualPruner.select_batch` once per
  forward with every image of the batch.
* :class:`ScoredVisualPruner`: a visual pruner that only writes :meth:`score`; the base owns top-k
  (ties to the lowest index) and returns the kept indices in original order.
* :class:`SequencePruner`: drops tokens between decoder layers at prefill; :class:`InLLMPruner`
  (stage ``"llm"``) drops image tokens (FastV), LazyLLM (stage ``"prompt"``) prompt tokens. The
  method writes :meth:`SequencePruner.score`; the decoder runtime ranks, gathers and masks.
* :class:`KVPruner` (stage ``"kv"``): compresses each layer's prompt KV after prefill (SnapKV,
  Knorm); the method writes :meth:`KVPruner.score`.
* A method that acts at several stages (ToDRE: a pre-LLM selection, then an in-LLM drop) returns one
  policy per stage from :meth:`Pruner.components`; ``tp.patch`` applies them as ``tp.compose`` does.

Integrations (``tokenprune.integrations``) decide *where* a method acts on a given model; methods
never special-case a model and never import an integration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Optional, Protocol, Sequence

import torch

__all__ = [
    "Pruner",
    "VisualPruner",
    "ScoredVisualPruner",
    "SequencePruner",
    "InLLMPruner",
    "KVPruner",
    "DecoderView",
    "KVView",
    "ImageTokens",
    "register",
    "available_methods",
    "build",
    "get_method_class",
    "method_stages",
    "validate_keep",
    "check_int",
    "check_number",
    "check_bool",
    "check_device",
    "resolve_keep",
    "topk_ascending",
]

_REGISTRY: dict[str, type["Pruner"]] = {}


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register(name: str):
    """Class decorator: register a method under ``name`` (used by :func:`build` and the CLI)."""

    def decorator(cls: type["Pruner"]) -> type["Pruner"]:
        key = _normalise_name(name)
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[key].__name__})")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return decorator


def available_methods() -> list[str]:
    """Names of all registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type["Pruner"]:
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    key = _normalise_name(name)
    if key not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available_methods())}")
    return _REGISTRY[key]


def method_stages(cls: type["Pruner"]) -> tuple[str, ...]:
    """Stages a method class acts at: ``(cls.stage,)``, or for a multi-stage method (stage
    ``"composite"``, e.g. ToDRE) the stages of its default instance's components."""
    if cls.stage != "composite":
        return (cls.stage,)
    return tuple(c.stage for c in cls().components())


def build(name: str, /, **kwargs: Any) -> "Pruner":
    """Build a registered method from its name, e.g. ``build("divprune", keep=64)``.

    Unknown keyword arguments raise ``TypeError`` naming the accepted ones.
    """
    cls = get_method_class(name)
    accepted = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(
            f"{cls.__name__} got unexpected argument(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(**kwargs)


# --------------------------------------------------------------------------- keep convention


def validate_keep(keep: Any, name: str = "keep") -> None:
    """``keep`` is an int >= 1 (tokens kept) or a float in (0, 1] (fraction kept)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(
            f"{name} must be an int >= 1 (tokens kept) or a float in (0, 1] (fraction kept), "
            f"got {type(keep).__name__}"
        )
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"{name} must be >= 1 when given as a token count, got {keep}")
    elif not (math.isfinite(keep) and 0.0 < keep <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] when given as a fraction, got {keep}")


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None,
              *, optional: bool = False) -> None:
    """``value`` is an int (not a bool) in ``[minimum, maximum]`` (or ``None`` when ``optional``)."""
    if optional and value is None:
        return
    bounds = " ".join(b for b in (f">= {minimum}" if minimum is not None else "",
                                  f"<= {maximum}" if maximum is not None else "") if b)
    expected = f"an int{' ' + bounds if bounds else ''}{' or None' if optional else ''}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value}")


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False, optional: bool = False) -> None:
    """``value`` is a finite int or float (not a bool) in the interval from ``low`` to ``high``
    (``*_open``: that end excluded; ``high=math.inf``: no upper bound), or ``None`` when ``optional``."""
    if optional and value is None:
        return
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or math.isinf(high) else ']'}"
    expected = f"a finite number in {interval}{' or None' if optional else ''}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """``value`` is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_device(name: str, value: Any) -> None:
    """``value`` is a torch device string such as ``"cpu"``, ``"cuda"`` or ``"cuda:1"``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a device string such as 'cpu' or 'cuda:0', got {type(value).__name__}")
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {value!r}") from None


def resolve_keep(keep: int | float, n: int) -> int:
    """Number of tokens kept out of ``n``: a count is capped at ``n``; a fraction is rounded
    half up and never drops below one token (for ``n > 0``)."""
    if n <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, n)
    return min(n, max(1, int(math.floor(keep * n + 0.5))))


def topk_ascending(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of a 1-D ``scores`` in ascending index order.

    Ties go to the lowest index (a stable descending sort), so selections are deterministic and
    comparable with an independent reference.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    k = min(k, scores.numel())
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


# --------------------------------------------------------------------------- method bases


@dataclass(frozen=True)
class Pruner:
    """Root of all methods. ``stage`` tells the integrations where the method acts."""

    stage: ClassVar[str] = "abstract"
    name: ClassVar[str] = "abstract"

    def to_config(self) -> dict[str, Any]:
        """A JSON-able description, ``{"method": name, **fields}``, that :func:`build` accepts."""
        return {"method": self.name, **asdict(self)}

    def components(self) -> tuple["Pruner", ...]:
        """The single-stage methods this method is applied as, in stage order: ``(self,)``, or for a
        method that acts at several stages (stage ``"composite"``, e.g. ToDRE) one policy per stage.
        ``tp.patch`` and ``tp.compose`` order, check and install the components; the method itself
        stays what the patch handle, ``to_config()`` and error messages name."""
        return (self,)


@dataclass
class ImageTokens:
    """One image's visual tokens as the language model would receive them.

    Attributes:
        features: ``[N, D]`` post-projector embeddings (what the decoder reads).
        grid: ``(rows, cols)`` of the patch grid when the tokens form one, else ``None``.
        cls_attention: ``[N]`` attention of the vision [CLS] token (or mean query) onto each
            patch at the feature layer, when the adapter provides it.
        extras: adapter-provided inputs a method declared in ``requires``: ``"keys"`` ``[N, d]``,
            ``"flow_layers"`` (per-layer [CLS] statistics), ``"instruction"`` ``[M, D]`` (the
            prompt row's text tokens in the decoder's input embedding space, the space of
            ``features``; every image of a row gets that row's instruction).
        blocks: ``[(start, rows, cols), ...]``: the tokens ``start .. start + rows*cols`` form a
            row-major ``rows x cols`` patch grid. Set by adapters whose images are several grids
            (LLaVA-NeXT: base image + unpadded high-resolution grid); ``None`` means ``grid``.
    """

    features: torch.Tensor
    grid: Optional[tuple[int, int]] = None
    cls_attention: Optional[torch.Tensor] = None
    extras: dict[str, Any] | None = None
    blocks: Optional[list[tuple[int, int, int]]] = None

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    def spatial_blocks(self) -> Optional[list[tuple[int, int, int]]]:
        """The image's patch grids as ``[(start, rows, cols)]`` covering all its tokens in order, or
        ``None`` when it has no (complete) layout."""
        if self.blocks is not None:
            starts = [0]
            for _, rows, cols in self.blocks:
                starts.append(starts[-1] + rows * cols)
            contiguous = all(block[0] == start for block, start in zip(self.blocks, starts))
            return list(self.blocks) if contiguous and starts[-1] == self.num_tokens else None
        if self.grid is not None and self.grid[0] * self.grid[1] == self.num_tokens:
            return [(0, int(self.grid[0]), int(self.grid[1]))]
        return None

    def require(self, name: str, method: str) -> Any:
        """An adapter-provided input (``"cls_attention"`` or an ``extras`` key), or a clear error."""
        value = self.cls_attention if name == "cls_attention" else (self.extras or {}).get(name)
        if value is None:
            raise ValueError(
                f"{method} needs {name!r} for each image, which this model's adapter did not provide"
            )
        return value


@dataclass(frozen=True)
class VisualPruner(Pruner):
    """Pre-LLM visual pruning: choose which visual tokens of each image reach the decoder.

    Args:
        keep: tokens kept per image (int >= 1) or the fraction kept (float in (0, 1]).
            More than an image has keeps them all.
    """

    stage: ClassVar[str] = "visual"
    #: inputs beyond ``features`` the method needs from the adapter (e.g. ``"cls_attention"``).
    requires: ClassVar[frozenset[str]] = frozenset()

    keep: int | float = 64

    def __post_init__(self) -> None:
        validate_keep(self.keep)

    def num_kept(self, n: int) -> int:
        return resolve_keep(self.keep, n)

    def select(self, image: ImageTokens) -> torch.Tensor:
        """Kept token indices of one image: LongTensor ``[num_kept(N)]``, ascending."""
        raise NotImplementedError

    def select_batch(self, images: Sequence[ImageTokens]) -> list[torch.Tensor]:
        """Kept indices for every image of a batch (override to batch the work)."""
        return [self.select(image) for image in images]

    def merge(self, image: ImageTokens, kept: torch.Tensor) -> torch.Tensor:
        """Embeddings that replace the image's tokens, ``[len(kept), D]``.

        The default returns the kept rows unchanged; merging methods (VisionZip) override it.
        """
        return image.features.index_select(0, kept)


@dataclass(frozen=True)
class ScoredVisualPruner(VisualPruner):
    """A visual pruner defined by a per-token score; the base keeps the top ``keep`` tokens."""

    def score(self, image: ImageTokens) -> torch.Tensor:
        """Score of each token, ``[N]`` (higher = more important)."""
        raise NotImplementedError

    def select(self, image: ImageTokens) -> torch.Tensor:
        scores = self.score(image).float()
        if scores.shape != (image.num_tokens,):
            raise RuntimeError(
                f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, "
                f"expected ({image.num_tokens},)"
            )
        return topk_ascending(scores, self.num_kept(image.num_tokens)).to(image.features.device)


class DecoderView(Protocol):
    """What a decoder policy (:class:`SequencePruner`) sees when it scores the tokens entering layer
    ``layer``; provided by the integration's decoder runtime.

    Attributes:
        layer: the decoder layer about to run on the kept tokens (scores come from ``layer - 1``).
        index: ``[B, n]`` sequence index of each current slot (its original position in the prompt).
        valid: ``[B, n]`` False for padding and filler slots.
        groups: ``[B, n]`` image number (0, 1, ... in the row) of each slot, ``-1`` for text, padding
            and generated tokens (all ``-1`` for policies of ``tokens="prompt"``).
    """

    layer: int
    index: torch.Tensor
    valid: torch.Tensor
    groups: torch.Tensor

    def attention(self, queries: str = "last", impl: str = "auto") -> torch.Tensor:
        """``[B, n]`` softmax attention of the scoring ``queries`` at layer ``layer - 1`` onto the
        current slots, averaged over heads (and queries): ``"last"`` = the last token (at decoding
        steps: the new token), ``"text_mean"`` = every text token after the row's last image. Computed
        from that layer's own queries and post-RoPE keys (:func:`tokenprune.kernels.attention_topk`),
        so every layer keeps its SDPA/flash attention."""
        ...

    def attention_from(self, queries: torch.Tensor, impl: str = "auto") -> torch.Tensor:
        """``[B, n]`` softmax attention at layer ``layer - 1`` of the query slots ``queries`` (``[B, n]``
        bool) onto the current slots, averaged over heads and those queries, causal by sequence
        index as the model attends (all zeros for a row without queries). Prefill only; the policy's
        :attr:`SequencePruner.query_rows` must be ``None`` (all queries captured)."""
        ...


class KVView(Protocol):
    """What a KV policy (:class:`KVPruner`) sees after the prefill of one decoder layer.

    Attributes:
        layer: the decoder layer whose cache is compressed.
        keys / values: ``[B, Hk, n, D]`` the layer's cached prompt keys (post-RoPE) and values.
        valid: ``[B, n]`` False for padding and filler slots.
        scale: the attention's softmax scale.
    """

    layer: int
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    scale: float

    def queries(self, window: int) -> torch.Tensor:
        """``[B, Hq, window, D]`` post-RoPE queries of the last ``window`` prompt slots at this layer."""
        ...


@dataclass(frozen=True)
class SequencePruner(Pruner):
    """A decoder policy that drops tokens *between* decoder layers at prefill: the tokens entering a
    scheduled layer are scored (:meth:`score`), the integration's runtime keeps the best ones per
    group and runs the deeper layers on them only (their KV is never computed there). Kept tokens
    keep their original positions.

    Subclasses set the candidates (``tokens``): ``"image"`` (each image's placeholder tokens are a
    group with its own budget; text is always kept, FastV) or ``"prompt"`` (every prompt token of a
    row is one group, LazyLLM), and write :meth:`resolve_schedule` and :meth:`score`.
    """

    #: which tokens may be dropped: "image" (per image, text kept) or "prompt" (per row).
    tokens: ClassVar[str] = "image"
    #: prefix of the statistics kinds the runtime records ("<prefix>-prefill", "<prefix>-revive").
    stats_prefix: ClassVar[str] = "llm"

    def resolve_schedule(self, depth: int) -> tuple[tuple[int, float | int], ...]:
        """``((layer, keep), ...)`` for a decoder of ``depth`` layers: before ``layer`` keep ``keep``
        (count or fraction) of each group's tokens. ``ValueError`` when a layer is out of range."""
        raise NotImplementedError

    def score(self, view: DecoderView) -> torch.Tensor:
        """Importance ``[B, n]`` of the tokens entering ``view.layer`` (higher = kept first)."""
        raise NotImplementedError

    def protected(self, index: torch.Tensor, length: int) -> torch.Tensor:
        """Slots never dropped (bool, shape of ``index``) of a prompt of ``length`` tokens."""
        return torch.zeros_like(index, dtype=torch.bool)

    def budget(self, view: DecoderView, scores: torch.Tensor, keep: int | float, sizes: torch.Tensor) -> torch.Tensor:
        """Tokens each group keeps entering ``view.layer`` (at prefill; decoding steps reuse them).

        Args:
            view: the tokens entering the layer; ``scores``: what :meth:`score` returned, ``[B, n]``.
            keep: the schedule's ``keep`` for this layer.
            sizes: ``[B, G]`` tokens each group had in the prompt: image ``g`` of row ``b`` for
                ``tokens="image"`` (0 where the row has fewer images), the row's prompt for
                ``tokens="prompt"`` (``G = 1``).

        Returns:
            ``[B, G]`` counts in ``[0, sizes]``. Default: :func:`resolve_keep` of ``keep`` (at least one
            token per non-empty group); a policy may return 0 to drop a group whole (ToDRE).
        """
        return torch.tensor([[resolve_keep(keep, n) for n in row] for row in sizes.tolist()],
                            dtype=torch.long, device=sizes.device).view(sizes.shape)

    @property
    def query_rows(self) -> Optional[int]:
        """Query rows of each scoring layer that :meth:`score` reads: ``1`` (the last token, the
        default) or ``None`` (all: ``view.attention("text_mean")`` or :meth:`DecoderView.attention_from`)."""
        return 1

    @property
    def revives(self) -> bool:
        """Whether decoding steps repeat the selection and revive dropped tokens (LazyLLM)."""
        return False


@dataclass(frozen=True)
class InLLMPruner(SequencePruner):
    """In-LLM visual pruning: drop image tokens inside the decoder, before layer ``layer``.

    Args:
        layer: index K of the first decoder layer that sees the pruned sequence (1 <= K < depth).
        keep: image tokens kept per image (count or fraction).
    """

    stage: ClassVar[str] = "llm"

    layer: int = 2
    keep: int | float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer must be an int, got {type(self.layer).__name__}")
        if self.layer < 1:
            raise ValueError(f"layer must be >= 1 (the score comes from layer K-1), got {self.layer}")
        validate_keep(self.keep)

    def num_kept(self, n: int) -> int:
        return resolve_keep(self.keep, n)

    def resolve_schedule(self, depth: int) -> tuple[tuple[int, float | int], ...]:
        if not 1 <= self.layer < depth:
            raise ValueError(f"layer must be in [1, {depth - 1}] for this model ({depth} decoder layers), got {self.layer}")
        return ((self.layer, self.keep),)


@dataclass(frozen=True)
class KVPruner(Pruner):
    """KV-cache compression after prefill (kvpress's ``ScorerPress``): after each decoder layer's
    prefill, every KV head keeps its ``keep`` best prompt entries by :meth:`score` (the last
    :attr:`window` prompt tokens always among them); decoding runs on the compressed cache with the
    kept tokens' original positions. A method writes only :meth:`score`.

    Args:
        keep: KV entries kept per layer and KV head: a count (>= 1) or a fraction in (0, 1] of the
            prompt's tokens at that layer.
    """

    stage: ClassVar[str] = "kv"
    #: last prompt tokens always kept (their queries are what :meth:`KVView.queries` returns).
    window: ClassVar[int] = 0

    keep: int | float = 0.5

    def __post_init__(self) -> None:
        validate_keep(self.keep)

    def num_kept(self, n: int) -> int:
        """KV entries kept out of a prompt of ``n`` tokens."""
        return resolve_keep(self.keep, n)

    def score(self, view: KVView) -> torch.Tensor:
        """Importance ``[B, Hk, n]`` of each cached prompt entry per KV head (higher = kept)."""
        raise NotImplementedError


#: stages that act inside a decoder, in the order a composition applies them.
DECODER_STAGES = ("llm", "prompt", "kv")
