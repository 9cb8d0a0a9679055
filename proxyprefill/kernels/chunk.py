"""ProxyAttn for one prefill chunk: the one place where the steps are composed.

`attention_chunk` checks the chunk once, picks the backend (proxyprefill/kernels/registry.py), and either runs
dense attention (contexts of at most `dense_below_tokens` keys, where estimation costs more than
it saves) or the four steps: block scores (by the configured estimator), head budgets, the
nested index, block-sparse attention. Both `kernels.api.proxy_attention` and the model's
attention hook (workers/attention.py) call it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backend import AttentionBackend
from .checks import check_qkv
from .config import ProxyAttnConfig
from .index import BlockSparseIndex
from .registry import load_estimator, select_backend

# Replaces the measured budgets [B, Hq, Mq] of a chunk at q_offset (benchmarks time ProxyAttn at
# a chosen density this way on models whose attention is near uniform).
BudgetOverride = Callable[[torch.Tensor, int, ProxyAttnConfig], torch.Tensor]


@dataclass(frozen=True)
class ChunkAttention:
    """The chunk's attention output (q's shape and dtype) and the index it used; index is None
    when the chunk ran dense attention."""

    out: torch.Tensor
    index: BlockSparseIndex | None

    @property
    def dense_fallback(self) -> bool:
        return self.index is None


def attention_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
    backend: str | AttentionBackend = "auto",
    on_estimated: Callable[[], None] | None = None,
    budget_override: BudgetOverride | None = None,
) -> ChunkAttention:
    """Causal ProxyAttn of a chunk: q [B, Hq, Nq, d], k/v [B, Hkv, q_offset + Nq, d].

    `scale` defaults to 1/sqrt(d), for estimation and attention alike. `on_estimated` is called
    once the index is built (before attention runs), so callers can time the two parts.
    """
    check_qkv(q, k, v, q_offset, config)
    impl = select_backend(backend, q)
    if k.shape[2] <= config.dense_below_tokens:
        return ChunkAttention(out=impl.dense_attention(q, k, v, q_offset, scale), index=None)
    scores = load_estimator(config.estimator).estimate(impl, q, k, config, q_offset, scale)
    budgets = impl.head_budgets(q, k, config, q_offset, scale)
    if budget_override is not None:
        budgets = budget_override(budgets, q_offset, config)
    index = impl.build_block_mask(scores, budgets, config, q_offset)
    if on_estimated is not None:
        on_estimated()
    out, _ = impl.block_sparse_attention(q, k, v, index, q_offset, scale)
    return ChunkAttention(out=out, index=index)
