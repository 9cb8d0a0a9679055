"""ProxyAttn block-sparse attention: configuration, reference, Triton kernels, dispatch."""

from .api import (
    BACKENDS,
    ProxyAttnStats,
    block_sparse_attention,
    build_block_mask,
    check_qkv,
    estimate_block_scores,
    head_budgets,
    proxy_attention,
    triton_available,
)
from .config import ProxyAttnConfig
from .index import BlockSparseIndex

__all__ = [
    "BACKENDS",
    "BlockSparseIndex",
    "ProxyAttnConfig",
    "ProxyAttnStats",
    "block_sparse_attention",
    "build_block_mask",
    "check_qkv",
    "estimate_block_scores",
    "head_budgets",
    "proxy_attention",
    "triton_available",
]
