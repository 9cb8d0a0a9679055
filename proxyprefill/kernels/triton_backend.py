"""ProxyAttn on the GPU: Triton kernels with exactly the reference's semantics and return types.

The four steps of proxyprefill/kernels/reference.py, each in its own module:

    triton_scores.estimate_block_scores(q, k, config, q_offset, scale)   float32 [B, g, Mq, Nk_blocks]
    triton_budgets.head_budgets(q, k, config, q_offset, scale)           int64 [B, Hq, Mq]
    triton_index.build_block_mask(scores, budgets, config, q_offset)      BlockSparseIndex
    triton_attention.block_sparse_attention(q, k, v, index, q_offset, scale)
                                                   (out like q, lse float32 [B, Hq, Nq])

with what they share (numerics, reductions, launch records) in triton_common; `TritonBackend`
puts them behind the attention-backend interface (proxyprefill/kernels/backend.py, registered as "triton").
Importing this module needs Triton; without it the registry reports the backend unavailable.
"""

from __future__ import annotations

import os

import torch

from . import triton_attention, triton_budgets, triton_index, triton_scores
from .backend import AttentionBackend

# Dtypes the kernels take on the GPU; Triton's interpreter computes bfloat16 wrongly on CPU tensors.
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INTERPRETER_DTYPES = (torch.float16, torch.float32)


class TritonBackend(AttentionBackend):
    """The Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (emulated)."""

    name = "triton"

    def unsupported_reason(self, device, dtype, head_dim, *, emulated=False):
        if head_dim < 16 or head_dim & (head_dim - 1):
            return f"needs a power-of-two head_dim >= 16, got {head_dim}"
        if device.type == "cuda":
            return None if dtype in GPU_DTYPES else f"does not run {dtype}"
        if not (emulated and os.environ.get("TRITON_INTERPRET") == "1"):
            return "needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        if dtype not in INTERPRETER_DTYPES:
            return f"under TRITON_INTERPRET=1 runs float32/float16 only, got {dtype}"
        return None

    estimate_block_scores = staticmethod(triton_scores.estimate_block_scores)
    head_budgets = staticmethod(triton_budgets.head_budgets)
    build_block_mask = staticmethod(triton_index.build_block_mask)
    block_sparse_attention = staticmethod(triton_attention.block_sparse_attention)
