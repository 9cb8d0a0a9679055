"""ProxyAttn on the GPU: Triton kernels with exactly the reference's semantics and return types.

The four steps of kernels/reference.py, each in its own module:

    triton_scores.estimate_block_scores(q, k, config, q_offset, scale)   float32 [B, g, Mq, Nk_blocks]
    triton_budgets.head_budgets(q, k, config, q_offset, scale)           int64 [B, Hq, Mq]
    triton_index.build_block_mask(scores, budgets, config, q_offset)      BlockSparseIndex
    triton_attention.block_sparse_attention(q, k, v, index, q_offset, scale)
                                                   (out like q, lse float32 [B, Hq, Nq])

with what they share (numerics, reductions, launch records) in triton_common. They run on CUDA
tensors, or on CPU tensors under TRITON_INTERPRET=1 (float32/float16 only).
"""

from __future__ import annotations

from .triton_attention import block_sparse_attention
from .triton_budgets import head_budgets, last_block_budgets
from .triton_index import build_block_mask
from .triton_scores import estimate_block_scores

__all__ = [
    "block_sparse_attention",
    "build_block_mask",
    "estimate_block_scores",
    "head_budgets",
    "last_block_budgets",
]
