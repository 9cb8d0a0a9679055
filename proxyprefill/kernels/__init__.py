"""ProxyAttn block-sparse attention: configuration, reference, Triton kernels, backends, dispatch."""

from .api import (
    BACKENDS,
    ProxyAttnStats,
    block_sparse_attention,
    build_block_mask,
    estimate_block_scores,
    head_budgets,
    proxy_attention,
    triton_available,
)
from .backend import AttentionBackend, BlockScoreEstimator
from .checks import check_qkv
from .chunk import ChunkAttention, attention_chunk
from .config import ProxyAttnConfig
from .index import BlockSparseIndex
from .registry import select_backend

__all__ = [
    "BACKENDS",
    "AttentionBackend",
    "BlockScoreEstimator",
    "BlockSparseIndex",
    "ChunkAttention",
    "ProxyAttnConfig",
    "ProxyAttnStats",
    "attention_chunk",
    "block_sparse_attention",
    "build_block_mask",
    "check_qkv",
    "estimate_block_scores",
    "head_budgets",
    "proxy_attention",
    "select_backend",
    "triton_available",
]
