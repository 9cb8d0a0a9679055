"""Public entry points: input checks, backend dispatch, and the whole ProxyAttn forward.

backend="torch"  the reference (kernels/reference.py), any device.
backend="triton" the Triton kernels (kernels/triton_*.py): CUDA tensors, or CPU tensors under
                 TRITON_INTERPRET=1 (float32/float16 only).
backend="auto"   Triton on CUDA tensors, the reference otherwise.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

import torch

from . import coarse, reference
from .config import ProxyAttnConfig
from .dense import dense_causal_attention
from .index import BlockSparseIndex

BACKENDS = ("auto", "torch", "triton")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
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


def _check_index(q: torch.Tensor, k: torch.Tensor, index: BlockSparseIndex, q_offset: int) -> None:
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


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------
def _use_triton(backend: str, tensor: torch.Tensor) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        return True
    return tensor.is_cuda and triton_available()


def triton_available() -> bool:
    try:
        importlib.import_module("proxyprefill.kernels.triton_backend")
    except ImportError:
        return False
    return True


def _triton():
    return importlib.import_module("proxyprefill.kernels.triton_backend")


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Proxy block scores, float32 [B, g, Mq, Nk_blocks] (see reference.estimate_block_scores)."""
    check_qkv(q, k, None, q_offset, config)
    if config.estimator == "meanpool":  # the coarse baseline is plain PyTorch on any device
        return coarse.estimate_block_scores_meanpool(q, k, config, q_offset, scale)
    impl = _triton() if _use_triton(backend, q) else reference
    return impl.estimate_block_scores(q, k, config, q_offset, scale)


def head_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-head, per-row block budgets, int64 [B, Hq, Mq] (see reference.head_budgets)."""
    check_qkv(q, k, None, q_offset, config)
    impl = _triton() if _use_triton(backend, q) else reference
    return impl.head_budgets(q, k, config, q_offset, scale)


def build_block_mask(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    backend: str = "auto",
) -> BlockSparseIndex:
    """The nested block index from block scores and budgets (see reference.build_block_mask)."""
    if scores.dim() != 4 or budgets.dim() != 3:
        raise ValueError(
            f"scores must be [B, g, Mq, Nk_blocks] and budgets [B, Hq, Mq]; got "
            f"{tuple(scores.shape)} and {tuple(budgets.shape)}"
        )
    b, g, mq, _ = scores.shape
    if budgets.shape[0] != b or budgets.shape[2] != mq or budgets.shape[1] % g:
        raise ValueError(f"budgets {tuple(budgets.shape)} do not match scores {tuple(scores.shape)}")
    impl = _triton() if _use_triton(backend, scores) else reference
    return impl.build_block_mask(scores, budgets, config, q_offset)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    q_offset: int = 0,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the index's kept blocks: (out like q, lse float32 [B, Hq, Nq])."""
    check_qkv(q, k, v, q_offset, None)
    _check_index(q, k, index, q_offset)
    impl = _triton() if _use_triton(backend, q) else reference
    return impl.block_sparse_attention(q, k, v, index, q_offset, scale)


# --------------------------------------------------------------------------------------------
# The whole forward
# --------------------------------------------------------------------------------------------
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
    backend: str = "auto",
    return_stats: bool = False,
    scale: float | None = None,
):
    """ProxyAttn causal attention for one prefill chunk.

    q [B, Hq, Nq, d]; k, v [B, Hkv, Nk, d] with Nk = q_offset + Nq. Returns out [B, Hq, Nq, d]
    (q's dtype), or (out, ProxyAttnStats) when return_stats. `scale` defaults to 1/sqrt(d) and
    is used for estimation and attention alike. Contexts of at most `dense_below_tokens` keys
    skip estimation and run dense causal attention (cuDNN on CUDA tensors).
    """
    config = config or ProxyAttnConfig()
    check_qkv(q, k, v, q_offset, config)
    use_triton = _use_triton(backend, q)
    impl = _triton() if use_triton else reference
    b, hq, nq, _ = q.shape
    nk = k.shape[2]
    dense = nk <= config.dense_below_tokens
    if dense and use_triton and q.is_cuda:
        # cuDNN through SDPA is the fastest dense kernel on the GPU (bench/results/kernels-*.json)
        out = dense_causal_attention(q, k, v, q_offset, scale)
        index = BlockSparseIndex.dense(
            b, hq, config.proxy_groups, nq, nk, config.block_size, q_offset, device=q.device
        )
        return (out, ProxyAttnStats(index=index, dense_fallback=True)) if return_stats else out
    if dense:
        index = BlockSparseIndex.dense(
            b, hq, config.proxy_groups, nq, nk, config.block_size, q_offset, device=q.device
        )
    else:
        if config.estimator == "meanpool":
            scores = coarse.estimate_block_scores_meanpool(q, k, config, q_offset, scale)
        else:
            scores = impl.estimate_block_scores(q, k, config, q_offset, scale)
        budgets = impl.head_budgets(q, k, config, q_offset, scale)
        index = impl.build_block_mask(scores, budgets, config, q_offset)
    out, _ = impl.block_sparse_attention(q, k, v, index, q_offset, scale)
    if return_stats:
        return out, ProxyAttnStats(index=index, dense_fallback=dense)
    return out
