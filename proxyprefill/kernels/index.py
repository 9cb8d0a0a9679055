"""The compact block-sparse index shared by every backend.

Heads of a proxy group rank key blocks identically, so their kept sets are nested: one
keep-first list of key blocks per (batch, group, query block) and one count per
(batch, head, query block) describe every head's mask. Kernels read the first `count` entries
of their group's list; heads of a group can share K/V tiles over the common prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ProxyAttnConfig


def causal_blocks_per_row(num_rows: int, q_offset: int, block_size: int, device=None) -> torch.Tensor:
    """Causal key blocks seen by each query block: its diagonal block index + 1. int64 [Mq]."""
    return q_offset // block_size + torch.arange(num_rows, device=device) + 1


def causal_block_mask(num_rows: int, num_key_blocks: int, q_offset: int, block_size: int, device=None):
    """Key blocks at or before each query block's diagonal. bool [Mq, Nk_blocks]."""
    causal = causal_blocks_per_row(num_rows, q_offset, block_size, device)
    return torch.arange(num_key_blocks, device=device)[None, :] < causal[:, None]


def forced_block_mask(
    num_rows: int, num_key_blocks: int, q_offset: int, config: ProxyAttnConfig, device=None
) -> torch.Tensor:
    """Blocks every head keeps: the first `sink_blocks` and the `local_blocks` ending at the
    diagonal, within the row's causal blocks. bool [Mq, Nk_blocks]."""
    diag = causal_blocks_per_row(num_rows, q_offset, config.block_size, device) - 1
    col = torch.arange(num_key_blocks, device=device)[None, :]
    sink = col < config.sink_blocks
    local = (col <= diag[:, None]) & (col > diag[:, None] - config.local_blocks)
    return (sink | local) & (col <= diag[:, None])


@dataclass
class BlockSparseIndex:
    """Which key blocks each (head, query block) attends to.

    block_order: int32 [B, g, Mq, Nk_blocks]. Row m lists its causal key blocks in keep-first
        order; entries at and past the row's causal count are -1.
    block_counts: int32 [B, Hq, Mq]. Head h keeps the first block_counts[b, h, m] entries of its
        group's row (group = h // (Hq // g)).
    block_size: tokens per block; q_offset: absolute position of the chunk's first query.
    """

    block_order: torch.Tensor
    block_counts: torch.Tensor
    block_size: int
    q_offset: int = 0

    @property
    def num_groups(self) -> int:
        return self.block_order.shape[1]

    @property
    def num_heads(self) -> int:
        return self.block_counts.shape[1]

    @property
    def num_query_blocks(self) -> int:
        return self.block_order.shape[2]

    @property
    def num_key_blocks(self) -> int:
        return self.block_order.shape[3]

    def causal_blocks(self) -> torch.Tensor:
        """Causal key blocks of each row, int64 [Mq]."""
        return causal_blocks_per_row(
            self.num_query_blocks, self.q_offset, self.block_size, self.block_order.device
        )

    def to_dense(self, rows: slice | None = None) -> torch.Tensor:
        """Boolean block mask [B, Hq, Mq, Nk_blocks] (optionally only the given query-block rows)."""
        order = self.block_order if rows is None else self.block_order[:, :, rows]
        counts = self.block_counts if rows is None else self.block_counts[:, :, rows]
        b, g, mq, nkb = order.shape
        hq = counts.shape[1]
        per_group = hq // g
        # position of each key block inside its row's order (nkb where absent)
        position = torch.full((b, g, mq, nkb + 1), nkb, dtype=torch.long, device=order.device)
        slots = torch.arange(nkb, device=order.device).expand(b, g, mq, nkb)
        target = torch.where(order >= 0, order.long(), torch.full_like(slots, nkb))
        position.scatter_(-1, target, slots)
        position = position[..., :nkb].repeat_interleave(per_group, dim=1)
        return position < counts[..., None].long()

    def kept_blocks(self) -> torch.Tensor:
        """Kept key blocks per (batch, head), int64 [B, Hq]."""
        return self.block_counts.long().sum(dim=-1)

    def causal_sparsity(self) -> torch.Tensor:
        """Fraction of causal (lower-triangle) blocks skipped, per (batch, head): float [B, Hq]."""
        total = self.causal_blocks().sum().item()
        return 1.0 - self.kept_blocks().double() / total

    def density(self) -> float:
        """Kept causal blocks over all causal blocks, averaged over batch and heads."""
        return 1.0 - self.causal_sparsity().mean().item()

    @classmethod
    def dense(
        cls,
        batch: int,
        num_heads: int,
        num_groups: int,
        num_queries: int,
        num_keys: int,
        block_size: int,
        q_offset: int = 0,
        device=None,
    ) -> BlockSparseIndex:
        """Every causal block kept (the dense-attention index)."""
        mq = -(-num_queries // block_size)
        nkb = -(-num_keys // block_size)
        causal = causal_blocks_per_row(mq, q_offset, block_size, device)
        col = torch.arange(nkb, device=device)
        order = torch.where(col[None, :] < causal[:, None], col[None, :], -1)
        order = order.to(torch.int32).expand(batch, num_groups, mq, nkb).contiguous()
        counts = causal.to(torch.int32).expand(batch, num_heads, mq).contiguous()
        return cls(block_order=order, block_counts=counts, block_size=block_size, q_offset=q_offset)
