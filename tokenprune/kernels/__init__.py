"""Hot paths of token pruning: Triton kernels beside pure-torch references with the same signature.

Nothing here imports transformers or vLLM; ``triton`` is imported only when a Triton
implementation is actually chosen.
"""

from tokenprune.kernels.attn_topk import attention_topk
from tokenprune.kernels.dpp import dpp_greedy_map
from tokenprune.kernels.mmdp import mmdp_select

__all__ = ["attention_topk", "dpp_greedy_map", "mmdp_select"]
