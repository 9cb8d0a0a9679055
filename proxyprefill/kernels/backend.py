"""The attention-backend interface: what an implementation of ProxyAttn provides.

A backend is a class with a name, a capability check (device, dtype, head dim) and the four
ProxyAttn steps of proxyprefill/kernels/reference.py, plus the dense attention used below
`dense_below_tokens`:

    estimate_block_scores(q, k, config, q_offset, scale)      -> float32 [B, g, Mq, Nk_blocks]
    head_budgets(q, k, config, q_offset, scale)               -> int64 [B, Hq, Mq]
    build_block_mask(scores, budgets, config, q_offset)        -> BlockSparseIndex
    block_sparse_attention(q, k, v, index, q_offset, scale)    -> (out like q, lse float32 [B, Hq, Nq])
    dense_attention(q, k, v, q_offset, scale)                  -> out like q

The steps trust their inputs: `proxyprefill/kernels/chunk.attention_chunk` validates a chunk once and then
calls them. A block-score estimator replaces step 2 alone (`ProxyAttnConfig.estimator`), on top
of whichever backend runs the rest. A new backend or estimator is one file with a subclass and
one line in proxyprefill/kernels/registry.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from .dense import dense_causal_attention

if TYPE_CHECKING:
    from .config import ProxyAttnConfig
    from .index import BlockSparseIndex


class AttentionBackend(ABC):
    """One implementation of the ProxyAttn steps (see the module docstring for the contracts)."""

    name: ClassVar[str]

    @abstractmethod
    def unsupported_reason(
        self, device: torch.device, dtype: torch.dtype, head_dim: int, *, emulated: bool = False
    ) -> str | None:
        """None when the backend runs tensors of this device, dtype and head dim, else why not.
        `emulated` also accepts slow stand-ins for the real device (Triton's interpreter on the
        CPU), which backend="auto" never picks but a backend named explicitly may use."""

    @abstractmethod
    def estimate_block_scores(
        self, q: torch.Tensor, k: torch.Tensor, config: ProxyAttnConfig, q_offset: int, scale: float | None
    ) -> torch.Tensor: ...

    @abstractmethod
    def head_budgets(
        self, q: torch.Tensor, k: torch.Tensor, config: ProxyAttnConfig, q_offset: int, scale: float | None
    ) -> torch.Tensor: ...

    @abstractmethod
    def build_block_mask(
        self, scores: torch.Tensor, budgets: torch.Tensor, config: ProxyAttnConfig, q_offset: int
    ) -> BlockSparseIndex: ...

    @abstractmethod
    def block_sparse_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        index: BlockSparseIndex,
        q_offset: int,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def dense_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float | None
    ) -> torch.Tensor:
        """Exact causal attention of the chunk (cuDNN on CUDA tensors, SDPA elsewhere)."""
        return dense_causal_attention(q, k, v, q_offset, scale)


class BlockScoreEstimator(ABC):
    """Step 2 alone: block scores float32 [B, g, Mq, Nk_blocks], -inf past each row's diagonal,
    which the backend's `build_block_mask` ranks."""

    name: ClassVar[str]

    @abstractmethod
    def estimate(
        self,
        backend: AttentionBackend,
        q: torch.Tensor,
        k: torch.Tensor,
        config: ProxyAttnConfig,
        q_offset: int,
        scale: float | None,
    ) -> torch.Tensor: ...


class ProxyScores(BlockScoreEstimator):
    """ProxyAttn's strided proxy-head scores, computed by the backend itself."""

    name = "proxy"

    def estimate(self, backend, q, k, config, q_offset, scale):
        return backend.estimate_block_scores(q, k, config, q_offset, scale)
