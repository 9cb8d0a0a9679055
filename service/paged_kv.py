"""KV in the paged layout that paged-attention decoders keep, and a cache that decodes from it.

The prefill hands KV over as one [Hkv, N, d] tensor per layer. A decoder that pages its cache
keeps, per layer, a pool of fixed-size blocks for K and one for V, each [num_blocks, block_size,
Hkv, d], and per sequence a **block table**: entry j names the physical block that holds tokens
[j * block_size, (j + 1) * block_size). All layers share the sequence's table. The last block may
be partly filled; the table may list blocks in any order (the decoder's allocator picks them).

    pages = PagedKV.from_layers(transfer.keys, transfer.values, block_size=16)    # a fresh pool
    write_paged(pool_k, pool_v, table, keys, values)        # or into a decoder's own pool
    cache = PagedDecodeCache(pages)                          # stock transformers decode from it

`PagedDecodeCache` is the reference decoder's proof that the pages are right: every decode step
writes the new token's K/V into the table's last block (allocating a free block when that one is
full) and the model attends to K/V gathered through the table, never to the original tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PagedLayoutError(ValueError):
    """A block table or page pool that cannot hold the KV; the message names the field."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _check_table(block_table: torch.Tensor, num_blocks: int, needed: int) -> None:
    if block_table.dim() != 1 or block_table.dtype not in (torch.int32, torch.int64):
        raise PagedLayoutError(
            "block_table: expected a 1-D int32/int64 tensor, "
            f"got {tuple(block_table.shape)} {block_table.dtype}"
        )
    if block_table.numel() < needed:
        raise PagedLayoutError(f"block_table: {block_table.numel()} entries, the KV needs {needed}")
    used = block_table[:needed]
    if needed and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
        raise PagedLayoutError(f"block_table: ids must lie in [0, {num_blocks}), got {used.tolist()}")
    if used.unique().numel() != needed:
        raise PagedLayoutError("block_table: a physical block is listed twice")


def write_paged(
    key_pages: torch.Tensor,
    value_pages: torch.Tensor,
    block_table: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int = 0,
) -> None:
    """Scatters one layer's K/V [Hkv, n, d] (tokens start .. start+n of the sequence) into the
    pages [num_blocks, block_size, Hkv, d] that `block_table` lists for those tokens."""
    num_blocks, block_size, num_heads, head_dim = key_pages.shape
    if value_pages.shape != key_pages.shape:
        raise PagedLayoutError(f"value_pages: shape {tuple(value_pages.shape)} != {tuple(key_pages.shape)}")
    if keys.dim() != 3 or keys.shape[0] != num_heads or keys.shape[2] != head_dim:
        raise PagedLayoutError(f"keys: expected [{num_heads}, n, {head_dim}], got {tuple(keys.shape)}")
    if values.shape != keys.shape:
        raise PagedLayoutError(f"values: shape {tuple(values.shape)} != keys' {tuple(keys.shape)}")
    end = start + keys.shape[1]
    _check_table(block_table, num_blocks, blocks_needed(end, block_size))
    positions = torch.arange(start, end, device=block_table.device)
    physical = block_table.long()[positions // block_size].to(key_pages.device)
    offsets = (positions % block_size).to(key_pages.device)
    # token-major [n, Hkv, d] rows land at (physical block, offset): one indexed copy per tensor
    key_pages[physical, offsets] = keys.transpose(0, 1).to(key_pages.dtype)
    value_pages[physical, offsets] = values.transpose(0, 1).to(value_pages.dtype)


def gather_paged(pages: torch.Tensor, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """One layer's [Hkv, num_tokens, d] K (or V) read back through the block table."""
    num_blocks, block_size, num_heads, head_dim = pages.shape
    needed = blocks_needed(num_tokens, block_size)
    _check_table(block_table, num_blocks, needed)
    blocks = pages[block_table[:needed].long().to(pages.device)]  # [needed, block_size, Hkv, d]
    return blocks.reshape(needed * block_size, num_heads, head_dim)[:num_tokens].transpose(0, 1)


@dataclass
class PagedKV:
    """A sequence's KV in paged form: per layer K and V pools [num_blocks, block_size, Hkv, d],
    one block table (int32) shared by the layers, and the number of tokens it holds."""

    key_pages: list[torch.Tensor]
    value_pages: list[torch.Tensor]
    block_table: torch.Tensor
    num_tokens: int

    @property
    def block_size(self) -> int:
        return int(self.key_pages[0].shape[1])

    @property
    def num_blocks(self) -> int:
        return int(self.key_pages[0].shape[0])

    @classmethod
    def from_layers(
        cls,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        block_size: int = 16,
        num_blocks: int | None = None,
        block_table: torch.Tensor | None = None,
    ) -> PagedKV:
        """Pages per-layer [Hkv, N, d] K/V into a new pool of `num_blocks` blocks (default: just
        enough). `block_table` chooses the physical blocks (default 0, 1, 2, ...)."""
        if block_size < 1:
            raise PagedLayoutError(f"block_size: must be >= 1, got {block_size}")
        if not keys or len(keys) != len(values):
            raise PagedLayoutError(
                f"keys/values: need one tensor each per layer, got {len(keys)}/{len(values)}"
            )
        num_heads, num_tokens, head_dim = keys[0].shape
        needed = blocks_needed(num_tokens, block_size)
        num_blocks = needed if num_blocks is None else num_blocks
        if num_blocks < needed:
            raise PagedLayoutError(f"num_blocks: {num_blocks} blocks cannot hold {num_tokens} tokens")
        if block_table is None:
            block_table = torch.arange(needed, dtype=torch.int32)
        shape = (num_blocks, block_size, num_heads, head_dim)
        key_pages, value_pages = [], []
        for k, v in zip(keys, values, strict=True):
            pool_k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            pool_v = torch.zeros_like(pool_k)
            write_paged(pool_k, pool_v, block_table, k, v)
            key_pages.append(pool_k)
            value_pages.append(pool_v)
        return cls(key_pages, value_pages, block_table[:needed].to(torch.int32).cpu(), num_tokens)

    def to_layers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-layer [Hkv, N, d] K and V gathered back through the block table."""
        keys = [gather_paged(p, self.block_table, self.num_tokens) for p in self.key_pages]
        values = [gather_paged(p, self.block_table, self.num_tokens) for p in self.value_pages]
        return keys, values

    def free_blocks(self) -> list[int]:
        used = set(self.block_table.tolist())
        return [b for b in range(self.num_blocks) if b not in used]

    def append_block(self) -> None:
        """Extends the table by one free block (a decoder's allocator step)."""
        free = self.free_blocks()
        if not free:
            raise PagedLayoutError(f"num_blocks: all {self.num_blocks} blocks are in use")
        extra = torch.tensor([free[0]], dtype=torch.int32)
        self.block_table = torch.cat([self.block_table, extra])


class _PagedLayer(DynamicLayer):
    """One layer of a PagedDecodeCache: writes into the pages, returns K/V gathered from them."""

    def __init__(self, pages: PagedKV, layer_idx: int):
        super().__init__()
        self.pages, self.layer_idx = pages, layer_idx
        self.filled = pages.num_tokens
        self.is_initialized = True
        self.dtype, self.device = pages.key_pages[layer_idx].dtype, pages.key_pages[layer_idx].device
        self._refresh()

    def _refresh(self) -> None:
        table = self.pages.block_table
        self.keys = gather_paged(self.pages.key_pages[self.layer_idx], table, self.filled)[None]
        self.values = gather_paged(self.pages.value_pages[self.layer_idx], table, self.filled)[None]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The pages exist already."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise PagedLayoutError(
                f"key_states: a paged sequence decodes a batch of 1, got {key_states.shape[0]}"
            )
        end = self.filled + key_states.shape[-2]
        while self.pages.block_table.numel() * self.pages.block_size < end:
            self.pages.append_block()
        write_paged(
            self.pages.key_pages[self.layer_idx],
            self.pages.value_pages[self.layer_idx],
            self.pages.block_table,
            key_states[0],
            value_states[0],
            start=self.filled,
        )
        self.filled = end
        if self.layer_idx == len(self.pages.key_pages) - 1:
            self.pages.num_tokens = end
        self._refresh()
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return -1


class PagedDecodeCache(Cache):
    """A transformers Cache over a PagedKV: a stock model decodes from (and into) the pages."""

    def __init__(self, pages: PagedKV):
        super().__init__(layers=[_PagedLayer(pages, i) for i in range(len(pages.key_pages))])
        self.pages = pages
