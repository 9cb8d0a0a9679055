"""Step 5 on the GPU: the nested block index (torch definition: `reference.build_block_mask`).

`_index_rows` writes each row's sort key and every head's count, one stable torch.sort on the
device gives the keep-first order (cheap at Nk_blocks <= a few thousand), `_finish_order` marks
entries past each row's causal blocks -1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import ProxyAttnConfig
from .index import BlockSparseIndex
from .triton_common import record_launch, reduce_sum


@triton.jit
def _index_rows(
    Scores,
    Budgets,
    Keyed,
    Counts,
    stride_sbg,
    stride_sm,
    stride_bb,
    stride_bh,
    stride_cb,
    stride_ch,
    num_groups,
    heads_per_group,
    num_key_blocks,
    first_diag,  # diagonal key block of the chunk's first query block
    SINKS: tl.constexpr,
    LOCAL: tl.constexpr,
    CANDIDATES: tl.constexpr,  # SINKS + LOCAL rounded up to a power of two
    NKB: tl.constexpr,  # num_key_blocks rounded up to a power of two
):
    """One (batch, group, query block) row: the sort key (forced blocks +inf) for the keep-first
    order, and every head's count |forced| + k - |forced among the top k|, clamped to the
    row's causal blocks. The plain-score rank of a forced block is counted directly: blocks
    scoring higher, or equal with a lower index (the stable descending sort's order)."""
    m = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // num_groups
    group = bg % num_groups
    diag = first_diag + m
    cols = tl.arange(0, NKB)
    col_ok = cols < num_key_blocks
    row = Scores + bg * stride_sbg + m * stride_sm
    scores = tl.load(row + cols, mask=col_ok, other=float("-inf"))
    forced = ((cols < SINKS) | (cols > diag - LOCAL)) & (cols <= diag)
    tl.store(
        Keyed + bg * stride_sbg + m * stride_sm + cols, tl.where(forced, float("inf"), scores), mask=col_ok
    )

    # forced candidates: sinks 0..SINKS-1, then local blocks diag, diag-1, ... (a local block
    # that is also a sink counts once); valid inside the row's causal blocks
    slot = tl.arange(0, CANDIDATES)
    cand = tl.where(slot < SINKS, slot, diag - (slot - SINKS))
    valid = (slot < SINKS + LOCAL) & (cand >= 0) & (cand <= diag) & ((slot < SINKS) | (cand >= SINKS))
    cand_score = tl.load(row + cand, mask=valid, other=0.0)
    before = (scores[None, :] > cand_score[:, None]) | (
        (scores[None, :] == cand_score[:, None]) & (cols[None, :] < cand[:, None])
    )
    rank = reduce_sum((before & col_ok[None, :]).to(tl.int32), 1)
    num_forced = reduce_sum(valid.to(tl.int32), 0)
    for j in range(0, heads_per_group):
        head = group * heads_per_group + j
        budget = tl.load(Budgets + b * stride_bb + head * stride_bh + m).to(tl.int32)
        overlap = reduce_sum((valid & (rank < budget)).to(tl.int32), 0)
        count = tl.minimum(num_forced + budget - overlap, diag + 1)
        tl.store(Counts + b * stride_cb + head * stride_ch + m, count)


@triton.jit
def _finish_order(Sorted, Order, num_key_blocks, first_causal, NKB: tl.constexpr):
    """int32 keep-first order: the sorted indices inside the row's causal blocks, -1 past them."""
    m = tl.program_id(0)
    bg = tl.program_id(1)
    num_rows = tl.num_programs(0)
    cols = tl.arange(0, NKB)
    col_ok = cols < num_key_blocks
    offset = (bg * num_rows + m) * num_key_blocks + cols
    idx = tl.load(Sorted + offset, mask=col_ok, other=0)
    tl.store(Order + offset, tl.where(cols < first_causal + m, idx, -1).to(tl.int32), mask=col_ok)


def index_width(num_key_blocks: int) -> int:
    """The NKB the index kernels are compiled for: key blocks rounded up to a power of two."""
    return max(16, triton.next_power_of_2(num_key_blocks))


def warm_up_key_lengths(first_sparse_keys: int, max_keys: int, block_size: int) -> list[int]:
    """Contexts (in keys, multiples of block_size) that between them compile every variant of the
    backend's kernels for contexts of first_sparse_keys..max_keys: the constexpr that follows the
    length is the index kernels' NKB, so one context per power-of-two bucket of key blocks (the
    bucket's largest, capped at max_keys). Integer length arguments are also specialised on
    divisibility by 16, which a whole chunk and a ragged one at each context cover
    (PrefillEngine.warm_up)."""
    last = max_keys // block_size
    first = -(-first_sparse_keys // block_size)
    lengths, seen = [], set()
    width = index_width(first)
    while first <= last:
        blocks = min(width, last)
        if index_width(blocks) not in seen:
            seen.add(index_width(blocks))
            lengths.append(blocks * block_size)
        if blocks == last:
            break
        width *= 2
    return lengths


def build_block_mask(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
) -> BlockSparseIndex:
    """The nested index (see reference.build_block_mask) with one sort per group row.

    A kernel writes each row's sort key (forced blocks +inf) and every head's count; one stable
    descending torch.sort gives the keep-first order; a last kernel marks entries past the
    row's causal blocks -1. No per-head [Hq, Mq, Nk_blocks] tensor is built."""
    bs = config.block_size
    b, g, mq, nkb = scores.shape
    hq = budgets.shape[1]
    scores = scores.contiguous()
    budgets = budgets.contiguous()
    keyed = torch.empty_like(scores)
    counts = torch.empty(b, hq, mq, dtype=torch.int32, device=scores.device)
    nkb_p2 = index_width(nkb)
    warps = 8 if nkb_p2 >= 2048 else 4
    kernel = _index_rows[(mq, b * g)](
        scores,
        budgets,
        keyed,
        counts,
        scores.stride(1),
        scores.stride(2),
        budgets.stride(0),
        budgets.stride(1),
        counts.stride(0),
        counts.stride(1),
        g,
        hq // g,
        nkb,
        q_offset // bs,
        SINKS=config.sink_blocks,
        LOCAL=config.local_blocks,
        CANDIDATES=max(2, triton.next_power_of_2(config.sink_blocks + config.local_blocks)),
        NKB=nkb_p2,
        num_warps=warps,
    )
    record_launch("index_rows", kernel)
    by_key = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    order = torch.empty(b, g, mq, nkb, dtype=torch.int32, device=scores.device)
    _finish_order[(mq, b * g)](by_key, order, nkb, q_offset // bs + 1, NKB=nkb_p2, num_warps=warps)
    return BlockSparseIndex(block_order=order, block_counts=counts, block_size=bs, q_offset=q_offset)
