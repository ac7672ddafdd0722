"""CDPruner: the greedy DPP against a naive float64 log-det greedy, the relevance, the adapter's
instruction per batch row, and the method in HF generate on tiny LLaVA / LLaVA-NeXT / Qwen2.5-VL."""

import math

import pytest
import torch

import tokenprune as tp
from tokenprune import ImageTokens
from tokenprune.kernels.dpp import dpp_greedy_map

EPS = 1e-5  # dpp_greedy_map's default exhaustion threshold


# --------------------------------------------------------------------------- independent references


def greedy_logdet_reference(features: torch.Tensor, quality: torch.Tensor, k: int) -> list[int]:
    """Naive greedy MAP in float64: at each step evaluate det(L[S + j]) / det(L[S]) for every j
    with explicit determinants. A candidate whose gain is <= EPS * L_jj adds nothing (its direction
    is spanned); those come last, by decreasing L_jj. Ties: lowest index (strict comparisons)."""
    x = features.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    q = quality.double()
    cos = x @ x.T
    cos.diagonal().copy_((features.norm(dim=-1) > 0).double())  # cos(x, x) = 1 exactly
    kernel = q[:, None] * cos * q[None, :]
    n = x.shape[0]
    chosen: list[int] = []
    for _ in range(k):
        base = torch.linalg.det(kernel[chosen][:, chosen]) if chosen else torch.tensor(1.0, dtype=torch.float64)
        best, best_gain, best_fallback, best_diag = None, -math.inf, None, -math.inf
        for j in range(n):
            if j in chosen:
                continue
            sub = chosen + [j]
            gain = float(torch.linalg.det(kernel[sub][:, sub]) / base) if float(base) > 0 else 0.0
            if gain > EPS * float(kernel[j, j]):
                if gain > best_gain:
                    best, best_gain = j, gain
            elif float(kernel[j, j]) > best_diag:
                best_fallback, best_diag = j, float(kernel[j, j])
        chosen.append(best if best is not None else best_fallback)
    return chosen


def relevance_reference(features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The public code's relevance with the cosine's natural sign, in float64."""
    x = features.double() / features.double().norm(dim=-1, keepdim=True)
    t = text.double() / text.double().norm(dim=-1, keepdim=True)
    r = (x @ t.T).mean(dim=1)
    return (r - r.min() + 1e-6) / (r.max() - r.min())


def _image(n=24, d=16, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageTokens(features=torch.randn(n, d, generator=g), extras={"instruction": torch.randn(m, d, generator=g)})


# --------------------------------------------------------------------------- the DPP step


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n, d", [(10, 16), (12, 5)])  # full rank, and more tokens than the rank
def test_greedy_map_equals_naive_logdet_greedy(seed, n, d):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    q = torch.rand(n, generator=g) + 0.05
    picks = dpp_greedy_map(x, q, n)
    assert picks.tolist() == greedy_logdet_reference(x, q, n)
    # Greedy is prefix-consistent: a smaller k is the first k picks.
    assert dpp_greedy_map(x, q, 4).tolist() == picks[:4].tolist()


def test_ties_and_duplicates_are_deterministic():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 6, generator=g)
    x[5] = x[2]  # a duplicate: once token 2 is in, token 5 adds nothing
    x[6] = x[1]  # exact ties: identical gains until one of the pair is in
    q = torch.ones(8)
    picks = dpp_greedy_map(x, q, 8)
    assert picks.tolist() == greedy_logdet_reference(x, q, 8)
    assert picks[0] == 0  # every L_ii = 1: the first pick is the lowest index
    assert picks.tolist().index(5) > picks.tolist().index(2) and picks.tolist().index(6) > picks.tolist().index(1)
    assert all(torch.equal(dpp_greedy_map(x, q, 8), picks) for _ in range(3))


def test_batched_with_padding_equals_each_image_alone():
    images = [_image(n, seed=s) for s, n in enumerate((24, 17, 9))]
    quality = [torch.rand(im.num_tokens, generator=torch.Generator().manual_seed(7)) for im in images]
    x = torch.zeros(3, 24, 16)
    q = torch.zeros(3, 24)
    for i, (im, w) in enumerate(zip(images, quality)):
        x[i, : im.num_tokens], q[i, : im.num_tokens] = im.features, w
        x[i, im.num_tokens :] = 100.0  # padding content must not matter
    batched = dpp_greedy_map(x, q, 6, lengths=torch.tensor([24, 17, 9]))
    for i, (im, w) in enumerate(zip(images, quality)):
        assert batched[i].tolist() == dpp_greedy_map(im.features, w, 6).tolist()
        assert int(batched[i].max()) < im.num_tokens


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, q: dpp_greedy_map(x, q, 0), ValueError, "k must be in"),
        (lambda x, q: dpp_greedy_map(x, q, 11), ValueError, "k must be in"),
        (lambda x, q: dpp_greedy_map(x, q, 2.0), TypeError, "k must be an int"),
        (lambda x, q: dpp_greedy_map(x, q[:5], 2), ValueError, "quality must have shape"),
        (lambda x, q: dpp_greedy_map(x, -q, 2), ValueError, "quality must be >= 0"),
        (lambda x, q: dpp_greedy_map(x * float("nan"), q, 2), ValueError, "finite"),
        (lambda x, q: dpp_greedy_map(x.long(), q, 2), TypeError, "features"),
        (lambda x, q: dpp_greedy_map(x, q, 2, lengths=torch.tensor([3])), ValueError, "lengths"),
        (lambda x, q: dpp_greedy_map(x[None], q[None], 4, lengths=torch.tensor([3])), ValueError, "k must be in"),
        (lambda x, q: dpp_greedy_map(x, q, 2, eps=1.0), ValueError, "eps"),
    ],
)
def test_dpp_bad_arguments(call, error, match):
    g = torch.Generator().manual_seed(0)
    with pytest.raises(error, match=match):
        call(torch.randn(10, 4, generator=g), torch.rand(10, generator=g))


# --------------------------------------------------------------------------- the method


@pytest.mark.parametrize("theta", [None, 0.5, 0.9])
@pytest.mark.parametrize("seed", range(3))
def test_selection_equals_reference(seed, theta):
    image = _image(n=14, d=20, seed=seed)
    r = relevance_reference(image.features, image.extras["instruction"])
    q = r if theta is None else torch.exp(theta / (2 * (1 - theta)) * r)
    expected = sorted(greedy_logdet_reference(image.features, q, 6))
    assert tp.CDPruner(keep=6, theta=theta).select(image).tolist() == expected
    torch.testing.assert_close(tp.CDPruner().relevance(image).double(), r, atol=1e-5, rtol=1e-5)


def test_relevance_steers_the_selection():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(36, 16, generator=g)
    kept = {}
    for target in (5, 20):
        # An instruction whose words point at token `target` (plus an unrelated word).
        text = torch.stack([feats[target] + 0.1 * torch.randn(16, generator=g), torch.randn(16, generator=g)])
        image = ImageTokens(features=feats, extras={"instruction": text})
        kept[target] = tp.CDPruner(keep=4).select(image).tolist()
        assert target in kept[target]
        # keep=1: the kernel's diagonal is q^2, so the single kept token is the most relevant one.
        assert tp.CDPruner(keep=1).select(image).tolist() == [int(tp.CDPruner().relevance(image).argmax())]
        # theta=0 ignores the instruction: the DPP on the similarities alone.
        assert tp.CDPruner(keep=4, theta=0.0).select(image).tolist() == sorted(
            greedy_logdet_reference(feats, torch.ones(36), 4)
        )
    assert kept[5] != kept[20]


def test_empty_or_uninformative_instruction_is_pure_diversity():
    image = _image(n=20, d=8)
    diverse = sorted(greedy_logdet_reference(image.features, torch.ones(20), 5))
    empty = ImageTokens(features=image.features, extras={"instruction": torch.empty(0, 8)})
    assert tp.CDPruner(keep=5).select(empty).tolist() == diverse
    same = ImageTokens(features=torch.ones(6, 8), extras={"instruction": torch.randn(2, 8)})
    assert torch.equal(tp.CDPruner().relevance(same), torch.ones(6))  # no division by a zero range
    assert tp.CDPruner(keep=3).select(same).tolist() == [0, 1, 2]  # all identical: lowest indices


@pytest.mark.parametrize("keep", [1, 5, 12, 0.25, 24, 100, 1.0])
def test_exact_count_ascending_unique(keep):
    image = _image()
    kept = tp.CDPruner(keep=keep).select(image)
    expected = min(keep, 24) if isinstance(keep, int) else max(1, int(math.floor(keep * 24 + 0.5)))
    assert kept.numel() == expected and kept.unique().numel() == expected
    assert torch.equal(kept, torch.sort(kept).values)
    if expected == 24:
        assert torch.equal(kept, torch.arange(24))


def test_select_batch_equals_select_per_image():
    images = [_image(n, seed=s, m=s + 1) for s, n in enumerate((24, 16, 24, 9))]
    for keep in (4, 0.5):
        method = tp.CDPruner(keep=keep)
        batched = method.select_batch(images)
        assert [b.tolist() for b in batched] == [method.select(im).tolist() for im in images]


def test_registered_and_bad_arguments():
    assert tp.build("cdpruner", keep=8, theta=0.5) == tp.CDPruner(keep=8, theta=0.5)
    assert tp.CDPruner.requires == frozenset({"instruction"})
    for bad in (1.0, -0.1, 2, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="theta"):
            tp.CDPruner(theta=bad)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="keep"):
            tp.CDPruner(keep=bad)
    with pytest.raises(ValueError, match="'instruction'"):
        tp.CDPruner(keep=2).select(ImageTokens(features=torch.randn(5, 4)))
    with pytest.raises(ValueError, match=r"instruction.*\[M, 4\]"):
        tp.CDPruner(keep=2).select(ImageTokens(features=torch.randn(5, 4), extras={"instruction": torch.randn(3, 7)}))


def test_vllm_config_refuses_with_the_reason():
    from tokenprune.integrations.vllm.config import parse_config

    with pytest.raises(ValueError, match=r"CDPruner needs instruction.*Hugging Face"):
        parse_config('{"method": "cdpruner", "keep": 64}')


# --------------------------------------------------------------------------- in HF generate

transformers = pytest.importorskip("transformers")

from test_models_visual import MODELS, generate, inputs_for, load, paths  # noqa: E402,F401

from tokenprune.fixtures import make_image  # noqa: E402
from tokenprune.integrations.hf.adapters import get_adapter  # noqa: E402

QUESTIONS = ["describe the red circle in the corner", "what is it"]


def same_image_inputs(processor, name, rows=(0, 1)):
    """Rows with the same image and different questions (row 1 left-padded in a batch)."""
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[r]}]}],
            add_generation_prompt=True,
        )
        for r in rows
    ]
    size = {"llava": (56, 56), "next": (112, 80)}.get(name, (168, 112))
    images = [make_image(64, seed=3).resize(size) for _ in rows]
    return processor(text=prompts, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", MODELS)
def test_instruction_is_the_rows_text_in_the_embedding_space(paths, name):
    model, processor = load(paths, name)
    adapter = get_adapter(model)
    batch = inputs_for(processor, name)
    assert batch["attention_mask"][1, 0] == 0  # row 1 is left-padded
    instructions = adapter.instruction_embeddings(batch["input_ids"], batch["attention_mask"])
    table = model.get_input_embeddings().weight
    layout = set(adapter.layout_token_ids().tolist())
    assert adapter.image_token_id in layout
    for row, single_row in enumerate(inputs_for(processor, name, rows=(r,)) for r in (0, 1)):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        text_ids = [i for i in ids.tolist() if i not in layout]
        assert torch.equal(instructions[row], table[text_ids])  # every text token, in order
        assert 0 < len(text_ids) < ids.numel()
        alone = adapter.instruction_embeddings(single_row["input_ids"], single_row["attention_mask"])[0]
        assert torch.equal(alone, instructions[row])  # padding is not instruction
        assert instructions[row].shape[1] == model.config.get_text_config().hidden_size


@pytest.mark.parametrize("name", MODELS)
def test_keep_all_is_identical(paths, name):
    model, processor = load(paths, name)
    inputs = inputs_for(processor, name)
    base = generate(model, inputs)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    for keep in (1.0, 10_000):
        with tp.patch(model, tp.CDPruner(keep=keep)) as handle:
            assert torch.equal(generate(model, inputs), base)
            with torch.no_grad():
                assert torch.equal(model(**inputs).logits, base_logits)
        assert all(r.after == r.before for r in handle.stats.records)


@pytest.mark.parametrize("name", MODELS)
def test_rows_with_different_instructions_match_their_single_runs(paths, name):
    model, processor = load(paths, name)
    batch = same_image_inputs(processor, name)
    singles = [same_image_inputs(processor, name, rows=(r,)) for r in (0, 1)]
    keep = 5
    with tp.patch(model, tp.CDPruner(keep=keep)) as handle:
        out = generate(model, batch)
        batch_kept = [r.kept for r in handle.stats.last()]
        single_out, single_kept = [], []
        for s in singles:
            single_out.append(generate(model, s))
            single_kept.append(handle.stats.last()[0].kept)
        with torch.no_grad():
            logits = model(**batch).logits[:, -1]
            single_logits = [model(**s).logits[0, -1] for s in singles]
    assert [len(k) for k in batch_kept] == [keep, keep]
    assert batch_kept[0] != batch_kept[1]  # same image, different question: different tokens
    assert batch_kept == single_kept
    width = batch["input_ids"].shape[1]
    for r in (0, 1):
        torch.testing.assert_close(logits[r], single_logits[r], atol=1e-4, rtol=1e-4)
        assert torch.equal(out[r, width:], single_out[r][0, singles[r]["input_ids"].shape[1] :])
        assert torch.equal(out[r, :width], batch["input_ids"][r])


@pytest.mark.parametrize("name", MODELS)
def test_selection_in_the_model_equals_the_method_on_its_inputs(paths, name):
    """The kept tokens of every image are the method applied to the adapter's features and the
    row's instruction (checked against the float64 reference), and the prompt shrinks by exactly
    the dropped tokens (LLaVA-NeXT: content tokens; row newlines follow their rows)."""
    model, processor = load(paths, name)
    adapter = get_adapter(model)
    inputs = inputs_for(processor, name, images_per_row=2)
    keep = 5
    with torch.no_grad():
        images = adapter.encode_images(dict(inputs), frozenset())
    instructions = adapter.instruction_embeddings(inputs["input_ids"], inputs["attention_mask"])
    with tp.patch(model, tp.CDPruner(keep=keep)) as handle:
        with torch.no_grad():
            logits = model(**inputs).logits
    records = handle.stats.last()
    assert len(records) == len(images) == 4
    for record, image in zip(records, images):
        r = relevance_reference(image.features, instructions[record.row])
        assert list(record.kept) == sorted(greedy_logdet_reference(image.features, r, keep))
        if name != "next":
            assert record.after == keep < record.before
    # The decoder reads each row's real tokens minus the dropped image tokens, re-padded.
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    for record in records:
        lengths[record.row] -= record.before - record.after
    assert logits.shape[1] == max(lengths) < inputs["input_ids"].shape[1]
