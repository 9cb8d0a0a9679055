"""Public entry points: each step on its own, checked, and the whole ProxyAttn forward of a chunk.

backend="torch"  the reference (proxyprefill/kernels/reference.py), any device.
backend="triton" the Triton kernels (proxyprefill/kernels/triton_*.py): CUDA tensors, or CPU tensors under
                 TRITON_INTERPRET=1 (float32/float16 only).
backend="auto"   the first backend of proxyprefill/kernels/registry.py that supports the tensors natively:
                 Triton on CUDA tensors, the reference otherwise.
An AttentionBackend object may be passed instead of a name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import AttentionBackend
from .checks import check_index, check_qkv, check_scores_and_budgets
from .chunk import attention_chunk
from .config import ProxyAttnConfig
from .index import BlockSparseIndex
from .registry import BACKEND_CHOICES, backend_available, load_estimator, select_backend

BACKENDS = BACKEND_CHOICES
Backend = str | AttentionBackend


def triton_available() -> bool:
    return backend_available("triton")


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Block scores of the configured estimator, float32 [B, g, Mq, Nk_blocks]
    (see reference.estimate_block_scores and meanpool.estimate_block_scores_meanpool)."""
    check_qkv(q, k, None, q_offset, config)
    impl = select_backend(backend, q)
    return load_estimator(config.estimator).estimate(impl, q, k, config, q_offset, scale)


def head_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-head, per-row block budgets, int64 [B, Hq, Mq] (see reference.head_budgets)."""
    check_qkv(q, k, None, q_offset, config)
    return select_backend(backend, q).head_budgets(q, k, config, q_offset, scale)


def build_block_mask(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    backend: Backend = "auto",
) -> BlockSparseIndex:
    """The nested block index from block scores and budgets (see reference.build_block_mask)."""
    check_scores_and_budgets(scores, budgets)
    return select_backend(backend, scores).build_block_mask(scores, budgets, config, q_offset)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    q_offset: int = 0,
    scale: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the index's kept blocks: (out like q, lse float32 [B, Hq, Nq])."""
    check_qkv(q, k, v, q_offset, None)
    check_index(q, k, index, q_offset)
    return select_backend(backend, q).block_sparse_attention(q, k, v, index, q_offset, scale)


@dataclass
class ProxyAttnStats:
    """What one proxy_attention call decided."""

    index: BlockSparseIndex
    dense_fallback: bool

    def causal_sparsity(self) -> torch.Tensor:
        """Fraction of causal blocks skipped, per (batch, head)."""
        return self.index.causal_sparsity()


def proxy_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: ProxyAttnConfig | None = None,
    q_offset: int = 0,
    backend: Backend = "auto",
    return_stats: bool = False,
    scale: float | None = None,
):
    """ProxyAttn causal attention for one prefill chunk (proxyprefill/kernels/chunk.attention_chunk).

    q [B, Hq, Nq, d]; k, v [B, Hkv, Nk, d] with Nk = q_offset + Nq. Returns out [B, Hq, Nq, d]
    (q's dtype), or (out, ProxyAttnStats) when return_stats. `scale` defaults to 1/sqrt(d) and
    is used for estimation and attention alike. Contexts of at most `dense_below_tokens` keys
    skip estimation and run dense causal attention (cuDNN on CUDA tensors); their stats carry
    the dense index.
    """
    config = config or ProxyAttnConfig()
    chunk = attention_chunk(q, k, v, config, q_offset, scale, backend)
    if not return_stats:
        return chunk.out
    index = chunk.index
    if index is None:
        b, hq, nq, _ = q.shape
        index = BlockSparseIndex.dense(
            b, hq, config.proxy_groups, nq, k.shape[2], config.block_size, q_offset, device=q.device
        )
    return chunk.out, ProxyAttnStats(index=index, dense_fallback=chunk.dense_fallback)
