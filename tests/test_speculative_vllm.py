"""vLLM custom_class drafter: identical greedy output to no speculation, drafts really verified."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tokenprune.integrations.vllm.spec import TreeDrafter, best_path
from tokenprune.speculative import TokenTree

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams

    d = tempfile.mkdtemp()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                      max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(d)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8] * 4 + [5, 6]}, {"prompt_token_ids": [9, 20, 30, 40, 50]}]
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # An explicit KV budget: vLLM-CPU otherwise sizes it as a fraction of RAM minus this process's RSS.
    common = dict(skip_tokenizer_init=True, enforce_eager=True, dtype="float32", max_model_len=256,
                  kv_cache_memory_bytes=64 << 20)
    base = LLM(d, **common)
    ref = [list(o.outputs[0].token_ids) for o in base.generate(prompts, sp)]
    del base
    spec = LLM(d, speculative_config={"method": "custom_class",
                                      "model": "tokenprune.integrations.vllm.spec.TreeDrafter",
                                      "num_speculative_tokens": 4}, disable_log_stats=False, **common)
    out = [list(o.outputs[0].token_ids) for o in spec.generate(prompts, sp)]
    drafted = 0
    for metric in spec.get_metrics():
        if metric.name == "vllm:spec_decode_num_draft_tokens":
            drafted = metric.value
    print("RESULT", json.dumps({"ref": ref, "out": out, "drafted": drafted}))
    """
)


@pytest.mark.vllm
def test_vllm_tree_drafter_matches_plain_decoding(tmp_path):
    pytest.importorskip("vllm")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENPRUNE_DRAFT_TREE=json.dumps({"sources": ["ngram"], "budget": 8}))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["out"] == result["ref"]
    assert result["drafted"] > 0  # the repetitive prompt made the drafter propose tokens


class _Config:
    class speculative_config:
        num_speculative_tokens = 3

    class model_config:
        max_model_len = 64


def test_tree_drafter_proposes_best_confident_path():
    import numpy as np

    drafter = TreeDrafter(_Config(), min_prob=0.3)
    tokens = np.zeros((2, 64), dtype=np.int64)
    tokens[0, :9] = [1, 2, 3, 4, 9, 1, 2, 3, 4]
    tokens[1, :3] = [7, 8, 9]
    drafts = drafter.propose([[4], [9]], np.array([9, 3]), tokens)
    assert drafts == [[9, 1, 2], []]  # capped at num_speculative_tokens; no match -> empty
    assert drafter.propose([[], [9]], np.array([9, 3]), tokens)[0] == []
    with pytest.raises(ValueError, match="recycling"):
        os.environ["TOKENPRUNE_DRAFT_TREE"] = json.dumps({"sources": ["recycling"]})
        try:
            TreeDrafter(_Config())
        finally:
            del os.environ["TOKENPRUNE_DRAFT_TREE"]


def test_best_path_maximises_expected_length():
    tree = TokenTree(0)
    a = tree.add(0, 1, -0.1)
    tree.add(a, 2, -2.0)  # unlikely continuation: cut by min_prob
    b = tree.add(0, 3, -0.3)
    c = tree.add(b, 4, -0.05)
    tree.add(c, 5, -0.05)
    assert best_path(tree, min_prob=0.2) == [3, 4, 5]
    assert best_path(tree, min_prob=0.95) == []
