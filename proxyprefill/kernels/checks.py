"""Input checks at the edge of the kernels: a chunk's q, k, v (and an index) are checked once,
before any backend step runs; the steps themselves trust their inputs."""

from __future__ import annotations

import torch

from .config import ProxyAttnConfig
from .index import BlockSparseIndex


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None, q_offset: int, config: ProxyAttnConfig | None
) -> None:
    """Raise ValueError (with the shapes) unless q, k, v form a valid causal chunk."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}" + ("" if v is None else f", v {tuple(v.shape)}")
    if q.dim() != 4 or k.dim() != 4 or (v is not None and v.dim() != 4):
        raise ValueError(f"q, k, v must be 4-D [batch, heads, tokens, head_dim]; got {shapes}")
    b, hq, nq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k must match q's batch and head_dim; got {shapes}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape; got {shapes}")
    hkv, nk = k.shape[1], k.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv}); got {shapes}")
    if nq == 0:
        raise ValueError(f"q has no tokens; got {shapes}")
    if isinstance(q_offset, bool) or not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(f"q_offset must be a non-negative integer, got {q_offset!r}")
    if nk != q_offset + nq:
        raise ValueError(
            f"keys must cover the prefix: Nk ({nk}) != q_offset ({q_offset}) + Nq ({nq}); {shapes}"
        )
    tensors = [q, k] + ([] if v is None else [v])
    if len({t.dtype for t in tensors}) != 1:
        raise ValueError(f"q, k, v dtypes differ: {[t.dtype for t in tensors]} ({shapes})")
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"q, k, v devices differ: {[str(t.device) for t in tensors]} ({shapes})")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if config is not None:
        if hkv % config.proxy_groups:
            raise ValueError(
                f"proxy_groups ({config.proxy_groups}) must divide KV heads ({hkv}); got {shapes}"
            )
        if q_offset % config.block_size:
            raise ValueError(f"q_offset ({q_offset}) must be a multiple of block_size ({config.block_size})")


def check_index(q: torch.Tensor, k: torch.Tensor, index: BlockSparseIndex, q_offset: int) -> None:
    """Raise ValueError unless `index` was built for this chunk's shapes and q_offset."""
    bs = index.block_size
    mq, nkb = -(-q.shape[2] // bs), -(-k.shape[2] // bs)
    if index.block_counts.shape != (q.shape[0], q.shape[1], mq):
        raise ValueError(
            f"index.block_counts has shape {tuple(index.block_counts.shape)}, expected "
            f"{(q.shape[0], q.shape[1], mq)} for q {tuple(q.shape)} and block_size {bs}"
        )
    if index.block_order.shape[0] != q.shape[0] or index.block_order.shape[2:] != (mq, nkb):
        raise ValueError(
            f"index.block_order has shape {tuple(index.block_order.shape)}, expected "
            f"({q.shape[0]}, g, {mq}, {nkb})"
        )
    if q.shape[1] % index.num_groups or k.shape[1] % index.num_groups:
        raise ValueError(f"index has {index.num_groups} groups, which must divide the heads")
    if index.q_offset != q_offset:
        raise ValueError(f"index was built for q_offset {index.q_offset}, called with {q_offset}")


def check_scores_and_budgets(scores: torch.Tensor, budgets: torch.Tensor) -> None:
    """Raise ValueError unless scores [B, g, Mq, Nk_blocks] and budgets [B, Hq, Mq] belong together."""
    if scores.dim() != 4 or budgets.dim() != 3:
        raise ValueError(
            f"scores must be [B, g, Mq, Nk_blocks] and budgets [B, Hq, Mq]; got "
            f"{tuple(scores.shape)} and {tuple(budgets.shape)}"
        )
    b, g, mq, _ = scores.shape
    if budgets.shape[0] != b or budgets.shape[2] != mq or budgets.shape[1] % g:
        raise ValueError(f"budgets {tuple(budgets.shape)} do not match scores {tuple(scores.shape)}")
