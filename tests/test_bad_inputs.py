"""Bad input, everywhere a user can give it: registered methods x bad values x integrations.

The matrix is built from the registry (``tp.available_methods()``) and each method's dataclass
fields (annotation, default), so a method registered later is covered without editing this file.
Every bad value must raise ``TypeError``/``ValueError`` *at construction*, with a message naming
the field. A field whose annotation the generator does not understand fails the matrix
(``...-UNCOVERED``) until bad values are added for it here, deliberately.

Integrations: ``tp.build``; ``tp.patch`` on the tiny fixture models (stages a model does not support
raise ``NotImplementedError`` naming architectures, and leave the model untouched); non-method
objects; the vLLM config parser; the ``tokenprune-bench --methods`` spec (exit code 2, one line).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, NamedTuple, Optional, Union

import pytest
import torch

import tokenprune as tp
from tokenprune.methods.base import get_method_class

MISSING = object()  # marks a field the generator cannot cover


class Spec(NamedTuple):
    values: list  # bad values, each must be refused
    base: dict  # other arguments the bad value needs to be reached (e.g. the source that uses it)


# ------------------------------------------------------------------------------------------ bad values
#: str fields that are free-form (a path), not a closed set: only "" and non-str are bad.
FREE_FORM_STR = {"model"}
#: fields whose annotation says too little (tuples, Any, unions with classes): bad values by hand,
#: with the arguments that make the field matter. Add an entry when a method adds such a field.
BY_HAND: dict[tuple[str, str], Spec] = {
    ("draft_tree", "sources"): Spec([(), ("magic",), ("ngram", "ngram"), ("ngram", 1), 1, None], {}),
    ("draft_tree", "budget"): Spec(["many", "", -1, True, 1.5, math.nan, None], {}),
    ("draft_tree", "corpus"): Spec(
        ["a string is not a list of documents", 1, None, ((1, -2),), ((1, 2.5),), ((1, True),), (None,), ((),),
         ("",)],
        {"sources": ("retrieval",)},
    ),
    ("draft_tree", "draft_model"): Spec([1, "", object(), torch.nn.Linear(2, 2)], {"sources": ("draft_model",)}),
    ("lazyllm", "schedule"): Spec(
        ["(1, 0.5)", 5, (), ((0, 0.5),), ((1, 1.5),), ((1, 0.0),), ((1, math.nan),), ((1,),), ((True, 0.5),),
         ((1.0, 0.5),), ((1, 0.5), (1, 0.4)), ((2, 0.3), (3, 0.5))],
        {},
    ),
    ("context", "scorer"): Spec([1, "", "no-such-scorer", object(), None], {}),
}
#: extra bad values of fields the generator covers, where the method has a stricter rule.
EXTRA: dict[tuple[str, str], list] = {("snapkv", "kernel"): [4]}
NOT_A_VALUE = "not a valid value!"


def _resolved_types(cls: type) -> dict[str, Any]:
    import tokenprune.methods.context.scorers as scorers

    return typing.get_type_hints(cls, localns={"SentenceScorer": scorers.SentenceScorer})


def _kind(annotation: Any) -> tuple[Optional[str], bool]:
    """(kind, optional) of a field annotation: bool, int, float, number (int | float), str."""
    args = typing.get_args(annotation)
    optional = False
    if typing.get_origin(annotation) in (Union, types.UnionType):
        optional = type(None) in args
        args = tuple(a for a in args if a is not type(None))
        annotation = args[0] if len(args) == 1 else frozenset(args)
    if annotation == frozenset({int, float}):
        return "number", optional
    kinds = {bool: "bool", int: "int", float: "float", str: "str"}
    return kinds.get(annotation) if not isinstance(annotation, frozenset) else None, optional


def bad_values(name: str, cls: type, field: dataclasses.Field) -> Optional[Spec]:
    """Values of ``field`` that ``cls`` must refuse at construction, or ``None`` if unknown."""
    if (name, field.name) in BY_HAND:
        return BY_HAND[(name, field.name)]
    kind, optional = _kind(_resolved_types(cls)[field.name])
    by_kind = {
        "bool": [1, 0, "yes", "true"],
        "int": ["1", True, 1.5, -1, math.nan],
        "float": ["0.5", True, math.nan, math.inf, -math.inf, -1.0],
        "number": ["64", True, False, 0, -1, 0.0, -0.5, 1.5, math.nan, math.inf, -math.inf],
        "str": [1, "", b"auto"] + ([] if field.name in FREE_FORM_STR else [NOT_A_VALUE]),
    }
    if kind is None:
        return None
    values = by_kind[kind] + ([] if optional else [None]) + EXTRA.get((name, field.name), [])
    return Spec(values, {})


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float, str, bytes, tuple, type(None))) else type(value).__name__
    return text if len(text) <= 24 else text[:21] + "..."


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _matrix():
    for name in tp.available_methods():
        cls = get_method_class(name)
        for field in _init_fields(cls):
            spec = bad_values(name, cls, field)
            if spec is None:
                yield pytest.param(name, field.name, {}, MISSING, id=f"{name}.{field.name}-UNCOVERED")
                continue
            for i, value in enumerate(spec.values):
                yield pytest.param(name, field.name, spec.base, value, id=f"{name}.{field.name}-{i}-{_short(value)}")


MATRIX = list(_matrix())


def _check_refused(build, field: str, base: dict, value: Any) -> None:
    if value is MISSING:
        pytest.fail(f"no bad values for field {field!r}: add them to BY_HAND in {__file__}")
    with pytest.raises((TypeError, ValueError)) as info:
        build(**{**base, field: value})
    assert field in str(info.value), f"the message does not name {field!r}: {info.value}"


# ------------------------------------------------------------------------------------------ methods
def test_every_registered_method_is_in_the_matrix():
    covered = {p.values[0] for p in MATRIX}
    assert covered == set(tp.available_methods())
    assert len(MATRIX) > 10 * len(covered)


@pytest.mark.parametrize("name", tp.available_methods())
def test_defaults_construct_and_round_trip(name):
    method = get_method_class(name)()
    config = method.to_config()
    assert config.pop("method") == name
    assert tp.build(name, **config) == method


@pytest.mark.parametrize("name, field, base, value", MATRIX)
def test_bad_value_refused_at_construction(name, field, base, value):
    _check_refused(get_method_class(name), field, base, value)


@pytest.mark.parametrize("name, field, base, value", MATRIX)
def test_bad_value_refused_by_build(name, field, base, value):
    _check_refused(lambda **kw: tp.build(name, **kw), field, base, value)


def test_build_refuses_unknown_names_and_arguments():
    with pytest.raises(ValueError, match="unknown method 'nope'; available methods: .*divprune"):
        tp.build("nope")
    with pytest.raises(TypeError, match="method name must be a str"):
        tp.build(3)
    with pytest.raises(TypeError, match="unexpected argument.*bogus.*accepted: .*keep"):
        tp.build("divprune", bogus=1)


@pytest.mark.parametrize("name", tp.available_methods())
def test_methods_are_immutable(name):
    method = get_method_class(name)()
    for field in _init_fields(type(method)):
        before = getattr(method, field.name)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(method, field.name, before)
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(method, field.name)
        assert getattr(method, field.name) == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.brand_new_attribute = 1


@pytest.mark.parametrize("name", [n for n in tp.available_methods() if "keep" in
                                  {f.name for f in dataclasses.fields(get_method_class(n))}])
def test_replace_revalidates(name):
    """``dataclasses.replace`` (the vLLM per-request budget) builds a new, validated object."""
    method = get_method_class(name)()
    assert dataclasses.replace(method, keep=1).keep == 1 and method.keep != 1
    with pytest.raises(ValueError, match="keep"):
        dataclasses.replace(method, keep=0)


def test_visual_keep_cannot_be_zeroed_after_validation():
    """The reported case: ``m.keep = 0`` after construction used to prune every image token."""
    method = tp.DivPrune(keep=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.keep = 0
    assert method.num_kept(16) == 4


# ------------------------------------------------------------------------------------------ tp.patch
#: stages each tiny fixture architecture supports (independent of the adapters' own tables).
SUPPORTED_STAGES = {
    "LlamaForCausalLM": {"prompt", "kv", "speculative"},
    "LlavaForConditionalGeneration": {"visual", "llm", "prompt", "kv"},
}
#: what the NotImplementedError must name for each stage: architectures or targets that take it.
SUPPORTED_TARGETS = {
    "visual": "LlavaForConditionalGeneration",
    "llm": "LlavaForConditionalGeneration",
    "prompt": "LlamaForCausalLM",
    "kv": "LlamaForCausalLM",
    "speculative": "llama",
    "context": "tokenizer or processor",
}


@pytest.fixture(scope="module")
def tiny_models(tiny_llama_path, tiny_llava_path):
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    return {
        "LlamaForCausalLM": LlamaForCausalLM.from_pretrained(tiny_llama_path).eval(),
        "LlavaForConditionalGeneration": LlavaForConditionalGeneration.from_pretrained(tiny_llava_path).eval(),
    }


def _fingerprint(model: torch.nn.Module) -> tuple:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks, tuple(tuple(sorted(m.__dict__)) for m in model.modules())


@pytest.mark.parametrize("arch", sorted(SUPPORTED_STAGES))
@pytest.mark.parametrize("name", tp.available_methods())
def test_patch_refuses_stages_the_model_does_not_support(tiny_models, arch, name):
    pytest.importorskip("transformers")
    model = tiny_models[arch]
    method = get_method_class(name)()
    stages = {c.stage for c in method.components()}  # a multi-stage method (ToDRE) needs all of its stages
    if stages <= SUPPORTED_STAGES[arch]:
        pytest.skip(f"{arch} supports stage(s) {sorted(stages)}")
    before = _fingerprint(model)
    with pytest.raises(NotImplementedError) as info:
        tp.patch(model, method)
    message = str(info.value)
    unsupported = sorted(stages - SUPPORTED_STAGES[arch])
    assert SUPPORTED_TARGETS.get(unsupported[0], "") in message, message
    assert arch in message or getattr(model.config, "model_type", "") in message, message
    assert _fingerprint(model) == before  # nothing half-applied


@pytest.mark.parametrize("target", ["nn.Linear", "object"])
def test_patch_refuses_unsupported_targets(target):
    obj = torch.nn.Linear(2, 2) if target == "nn.Linear" else object()
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration"):
        tp.patch(obj, tp.DivPrune(keep=4))


@pytest.mark.parametrize("not_a_method", ["divprune", None, 3, object(), tp.DivPrune, {"method": "divprune"}],
                         ids=["str", "None", "int", "object", "class", "dict"])
def test_patch_and_prune_refuse_non_methods(tiny_models, not_a_method):
    model = tiny_models["LlavaForConditionalGeneration"]
    before = _fingerprint(model)
    with pytest.raises(TypeError, match="method must be a tokenprune method"):
        tp.patch(model, not_a_method)
    with pytest.raises(TypeError, match="method must be a tokenprune method"):
        tp.prune(not_a_method)
    assert _fingerprint(model) == before


# ------------------------------------------------------------------------------------------ vLLM config
def _vllm_parse(raw: Any):
    # imported the way the plugin imports it today (neither vLLM nor transformers needed)
    from tokenprune.integrations.vllm.config import parse_config

    return parse_config(raw)


def _json_able(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, tuple)  # tuples come back as lists: not the value under test


@pytest.mark.parametrize(
    "raw, match",
    [
        ("{", "not valid JSON"),
        ("[1, 2]", r"\[0\] must be an object with a \"method\" name"),
        ('"divprune"', "must be a JSON object"),
        ('{"keep": 3}', 'needs a "method" name'),
        ('{"method": 3}', 'needs a "method" name'),
        ('{"method": "nope"}', "unknown method 'nope'"),
        ('{"method": "divprune", "bogus": 1}', "bogus"),
    ],
)
def test_vllm_config_refuses_malformed(raw, match):
    with pytest.raises(ValueError, match=match):
        _vllm_parse(raw)


@pytest.mark.parametrize("name, field, base, value", [p for p in MATRIX if p.values[3] is not MISSING
                                                      and _json_able(p.values[3]) and not p.values[2]])
def test_vllm_config_refuses_bad_arguments(name, field, base, value):
    with pytest.raises(ValueError) as info:
        _vllm_parse(json.dumps({"method": name, field: value}))
    assert field in str(info.value) and "TOKENPRUNE_CONFIG" in str(info.value)


@pytest.mark.parametrize("name", [n for n in tp.available_methods() if get_method_class(n).stage != "visual"])
def test_vllm_config_refuses_methods_it_cannot_run(name):
    with pytest.raises(ValueError, match="vLLM"):
        _vllm_parse(json.dumps({"method": name}))


# ------------------------------------------------------------------------------------------ bench CLI
def _cli_text(value: Any) -> Optional[str]:
    """``value`` as written in a ``--methods`` spec, if the CLI parses it back to the same value."""
    from tokenprune.bench.cli import _value

    if isinstance(value, bool):
        text = str(value).lower()
    elif value is None:
        text = "none"
    elif isinstance(value, (int, float, str)):
        text = str(value)
    else:
        return None
    if any(c in text for c in ",:="):
        return None
    parsed = _value(text)
    same = parsed is value or (type(parsed) is type(value) and (parsed == value or (
        isinstance(value, float) and math.isnan(value) and math.isnan(parsed))))
    return text if same else None


CLI_CASES = [
    pytest.param(f"{name}:{field}={_cli_text(value)}", field, id=f"{name}.{field}={_cli_text(value)}")
    for name, field, base, value in (p.values for p in MATRIX)
    if value is not MISSING and not base and _cli_text(value) is not None
]


def _bench(capsys, spec: str) -> tuple[int, str]:
    from tokenprune.bench.cli import main

    code = main(["latency", "--methods", spec, "--reps", "1", "--warmup", "0"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("spec, field", CLI_CASES)
def test_bench_cli_refuses_bad_method_arguments(capsys, spec, field):
    code, err = _bench(capsys, spec)
    assert code == 2
    assert err.startswith("tokenprune-bench: error:") and err.count("\n") == 1, err
    assert field in err


@pytest.mark.parametrize(
    "spec, match",
    [
        ("nope", "unknown method 'nope'"),
        ("divprune:keep", "must be written key=value"),
        ("divprune:=3", "must be written key=value"),
        ("divprune:bogus=1", "bogus"),
        (",", "no method given"),
        ("divprune,divprune", "listed twice"),
    ],
)
def test_bench_cli_refuses_malformed_specs(capsys, spec, match):
    code, err = _bench(capsys, spec)
    assert code == 2 and err.count("\n") == 1 and match in err, err
