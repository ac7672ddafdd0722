"""The Triton kernels compile for a real GPU (sm_90, Hopper) even on a machine without one.

The interpreter tests check what the kernels compute, but the interpreter accepts code that the
compiler rejects (python-typed loop-carried values, ``tl.dot`` with K < 16, ...). Triton compiles
ahead of time to PTX and runs its bundled ``ptxas`` without a device, so CI catches those errors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tokenprune.kernels.attn_topk import triton as attn
from tokenprune.kernels.mmdp import triton as mmdp

target = GPUTarget("cuda", 90, 32)


def build(fn, signature, constants, **options):
    signature = {**signature, **{name: "constexpr" for name in constants}}
    triton.compile(ASTSource(fn, signature, constants), target=target, options=options)
    print(fn.__name__, constants, flush=True)


# the block sizes the host wrappers choose, for a few shapes
for max_n, d in ((577, 5), (576, 4096), (5000, 100)):
    bt, bd = mmdp.gram_blocks(max_n, d)
    build(mmdp._mmdp_gram_kernel,
          {"gram_ptr": "*fp32", "nn_ptr": "*fp32", "x_ptr": "*bf16", "cu_ptr": "*i64", "gram_off_ptr": "*i64",
           "k": "i32", "D": "i32", "stride_x": "i32"},
          {"BT": bt, "BD": bd})
    block, num_warps = mmdp.greedy_block(max_n)
    for one_block in (True, False):
        build(mmdp._mmdp_greedy_kernel,
              {"out_ptr": "*i64", "run_ptr": "*fp32", "gram_ptr": "*fp32", "nn_ptr": "*fp32", "cu_ptr": "*i64",
               "cu_out_ptr": "*i64", "gram_off_ptr": "*i64", "k": "i32"},
              {"BLOCK": block, "ONE_BLOCK": one_block}, num_warps=num_warps)

sizes = {name: "i32" for name in ("Hk", "Hq", "Lq", "Lk", "D", "G", "R")}
strides = {name: "i64" for name in ("sq_b", "sq_h", "sq_l", "sk_b", "sk_h", "sk_l", "sm_b")}
inputs = {"q_ptr": "*fp16", "k_ptr": "*fp16", "mask_ptr": "*i8"}
for rows, d, causal, has_mask in ((1, 128, True, True), (4, 5, False, False), (34, 5, True, False), (256, 128, False, True)):
    flags = {"CAUSAL": causal, "HAS_MASK": has_mask, **attn.block_sizes(rows, d)}
    build(attn._attn_stats_kernel,
          {"part_m_ptr": "*fp32", "part_l_ptr": "*fp32", **inputs, **sizes, "split_len": "i32", **strides,
           "scale": "fp32"}, flags)
    build(attn._attn_scores_kernel,
          {"scores_ptr": "*fp32", "m_ptr": "*fp32", "inv_l_ptr": "*fp32", **inputs, **sizes, "key_start": "i32",
           "key_end": "i32", **strides, "scale": "fp32", "inv_rows": "fp32"}, flags)
print("compiled")
"""


@pytest.mark.triton
def test_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("compiled"), proc.stdout + proc.stderr
