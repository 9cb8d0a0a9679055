"""Steps 3-4 on the GPU: per-head budgets (torch definition: `reference.head_budgets`).

The budget is measured on the chunk's last query block, split over key ranges for parallelism:
- `_last_block_row_stats`: partial row max/sum per key split;
- `_last_block_mass`: the splits merged, then each key block's probability mass;
- `_gamma_budgets`: the sorted-cumulative gamma rule without a sort, then the row rule, the floor
  and the causal clamp.
The power policies add the alpha * n**C rule with the reference's own formula.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import ProxyAttnConfig
from .index import causal_blocks_per_row
from .reference import power_budgets
from .triton_common import (
    LOG2E,
    cdiv,
    dot_precision,
    last_dim_contiguous,
    num_sms,
    record_launch,
    reduce_max,
    reduce_sum,
)


@triton.jit
def _last_block_row_stats(
    Q,
    K,
    RowMax,
    RowSum,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    num_heads,
    heads_per_kv,
    num_queries,
    num_keys,
    q_offset,
    first_row,  # chunk-relative first row of the last query block
    blocks_per_split,
    num_splits,
    qk_scale_log2,
    ROWS: tl.constexpr,  # the mask block size
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Partial row max (log2 domain) and sum of exp2 over one split of the keys, per head."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // heads_per_kv
    rows = first_row + tl.arange(0, ROWS)
    row_ok = rows < num_queries
    q_pos = q_offset + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    k_base = K + b * stride_kb + kvh * stride_kh
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    start = split * blocks_per_split * ROWS
    end = tl.minimum(start + blocks_per_split * ROWS, num_keys)
    for t0 in range(start, end, ROWS):
        keys = t0 + tl.arange(0, ROWS)
        k = tl.load(
            k_base + keys[:, None] * stride_kn + dims[None, :], mask=keys[:, None] < num_keys, other=0.0
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        qk = tl.where((keys[None, :] <= q_pos[:, None]) & (keys[None, :] < num_keys), qk, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(qk, 1))
        # a split that sees no key of a row keeps m = -inf; guard the -inf - -inf subtraction
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + reduce_sum(tl.exp2(qk - m_safe[:, None]), 1)
        m_i = m_new
    out = (bh * num_splits + split) * ROWS + tl.arange(0, ROWS)
    tl.store(RowMax + out, m_i)
    tl.store(RowSum + out, l_i)


@triton.jit
def _last_block_mass(
    Q,
    K,
    RowMax,
    RowSum,
    Mass,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    num_heads,
    heads_per_kv,
    num_queries,
    num_keys,
    num_key_blocks,
    q_offset,
    first_row,
    blocks_per_split,
    num_splits,
    inv_rows,
    qk_scale_log2,
    ROWS: tl.constexpr,
    SPLITS: tl.constexpr,  # num_splits rounded up to a power of two
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """mass[b, h, n] = mean over the last block's rows of the probability summed over key block n.

    Merges the splits' partial statistics first: M = max_j m_j, L = sum_j l_j 2^(m_j - M)."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // heads_per_kv
    rows = first_row + tl.arange(0, ROWS)
    row_ok = rows < num_queries
    q_pos = q_offset + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    splits = tl.arange(0, SPLITS)
    partial = (bh * num_splits + splits)[:, None] * ROWS + tl.arange(0, ROWS)[None, :]
    split_ok = splits[:, None] < num_splits
    part_max = tl.load(RowMax + partial, mask=split_ok, other=float("-inf"))
    part_sum = tl.load(RowSum + partial, mask=split_ok, other=0.0)
    row_max = reduce_max(part_max, 0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # rows that see no key (padding)
    row_total = reduce_sum(part_sum * tl.exp2(part_max - row_max[None, :]), 0)
    row_inv_sum = tl.where(row_ok & (row_total > 0), 1.0 / row_total, 0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, num_key_blocks)
    for n in range(first_block, last_block):
        keys = n * ROWS + tl.arange(0, ROWS)
        k = tl.load(
            k_base + keys[:, None] * stride_kn + dims[None, :], mask=keys[:, None] < num_keys, other=0.0
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < num_keys)
        p = tl.where(visible, tl.exp2(qk - row_max[:, None]), 0.0) * row_inv_sum[:, None]
        tl.store(Mass + bh * num_key_blocks + n, reduce_sum(reduce_sum(p, 1), 0) * inv_rows)


@triton.jit
def _gamma_budgets(
    Mass,
    KLast,
    Budgets,
    num_key_blocks,
    num_q_blocks,
    first_causal,  # causal key blocks of the chunk's first query block
    gamma,
    min_blocks,
    SCALED: tl.constexpr,
    NKB: tl.constexpr,  # num_key_blocks rounded up to a power of two
    CHUNK: tl.constexpr,
    ROW_TILE: tl.constexpr,
):
    """k = #{blocks j : (mass ranked before j) / (total mass) < gamma}, the sorted-cumulative rule
    without a sort: "ranked before" = larger mass, or equal mass and a lower index (a tie's
    members get the same set of preceding sums in any order). Then the row rule, the floor and
    the causal clamp give budgets[b, h, m]."""
    bh = tl.program_id(0)
    cols = tl.arange(0, NKB)
    col_ok = cols < num_key_blocks
    base = Mass + bh * num_key_blocks
    mass = tl.load(base + cols, mask=col_ok, other=0.0)
    ranked = tl.where(col_ok, mass, -1.0)  # padding ranks last and weighs nothing
    total = reduce_sum(mass, 0)
    hits = tl.full([CHUNK], 0, dtype=tl.int32)
    for j0 in range(0, num_key_blocks, CHUNK):
        js = j0 + tl.arange(0, CHUNK)
        mass_j = tl.load(base + js, mask=js < num_key_blocks, other=-1.0)
        before = (ranked[None, :] > mass_j[:, None]) | (
            (ranked[None, :] == mass_j[:, None]) & (cols[None, :] < js[:, None])
        )
        preceding = reduce_sum(tl.where(before, mass[None, :], 0.0), 1)
        hits += ((preceding / total < gamma) & (js < num_key_blocks)).to(tl.int32)
    k_last = reduce_sum(hits, 0)
    tl.store(KLast + bh, k_last.to(tl.int64))

    last_causal = first_causal + num_q_blocks - 1
    for m0 in range(0, num_q_blocks, ROW_TILE):
        rows = m0 + tl.arange(0, ROW_TILE)
        causal = first_causal + rows
        if SCALED:
            budget = (k_last * causal + last_causal - 1) // last_causal
        else:
            budget = k_last + causal * 0
        budget = tl.minimum(tl.maximum(budget, min_blocks), causal)
        tl.store(Budgets + bh * num_q_blocks + rows, budget.to(tl.int64), mask=rows < num_q_blocks)


def _last_block_key_mass(
    q: torch.Tensor, k: torch.Tensor, block_size: int, q_offset: int, scale: float | None
) -> torch.Tensor:
    """Each key block's probability mass for the last query block, float32 [B * Hq, Nk_blocks]:
    partial row statistics per key split, then the mass with the splits merged."""
    bs = block_size
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nkb = cdiv(nk, bs)
    first_row = (cdiv(nq, bs) - 1) * bs
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    # split the keys so that about four programs per multiprocessor run
    splits = max(1, min(nkb, 64, cdiv(4 * num_sms(q.device), b * hq)))
    blocks_per_split = cdiv(nkb, splits)
    splits = cdiv(nkb, blocks_per_split)
    precision = dot_precision(q.dtype)
    warps = 8 if d >= 128 else 4
    row_max = torch.empty(b * hq, splits, bs, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    common = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        hq,
        hq // hkv,
        nq,
        nk,
    )
    kernel = _last_block_row_stats[(b * hq, splits)](
        q,
        k,
        row_max,
        row_sum,
        *common,
        q_offset,
        first_row,
        blocks_per_split,
        splits,
        scale * LOG2E,
        ROWS=bs,
        HEAD_DIM=d,
        DOT_PRECISION=precision,
        num_warps=warps,
    )
    record_launch("row_stats", kernel)
    mass = torch.empty(b * hq, nkb, dtype=torch.float32, device=q.device)
    kernel = _last_block_mass[(b * hq, splits)](
        q,
        k,
        row_max,
        row_sum,
        mass,
        *common,
        nkb,
        q_offset,
        first_row,
        blocks_per_split,
        splits,
        1.0 / (nq - first_row),
        scale * LOG2E,
        ROWS=bs,
        SPLITS=triton.next_power_of_2(splits),
        HEAD_DIM=d,
        DOT_PRECISION=precision,
        num_warps=warps,
    )
    record_launch("mass", kernel)
    return mass


def _gamma_budgets_and_last(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_last int64 [B, Hq], gamma budgets with row rule, floor and clamp int64 [B, Hq, Mq])."""
    bs = config.block_size
    b, hq, nq, _ = q.shape
    mass = _last_block_key_mass(q, k, bs, q_offset, scale)
    nkb = mass.shape[1]
    mq = cdiv(nq, bs)
    k_last = torch.empty(b, hq, dtype=torch.int64, device=q.device)
    budgets = torch.empty(b, hq, mq, dtype=torch.int64, device=q.device)
    nkb_p2 = max(16, triton.next_power_of_2(nkb))
    kernel = _gamma_budgets[(b * hq,)](
        mass,
        k_last,
        budgets,
        nkb,
        mq,
        q_offset // bs + 1,
        float(config.gamma),
        config.min_budget_blocks,
        SCALED=config.row_rule == "scaled",
        NKB=nkb_p2,
        CHUNK=max(1, min(64, 8192 // nkb_p2)),
        ROW_TILE=256,
        num_warps=8 if nkb_p2 >= 1024 else 4,
    )
    record_launch("gamma_budgets", kernel)
    return k_last, budgets


def last_block_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-head gamma budget in key blocks, int64 [B, Hq] (see reference.last_block_budgets)."""
    return _gamma_budgets_and_last(q, k, config, q_offset, scale)[0]


def head_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Block budget k_i(m) per head and query block, int64 [B, Hq, Mq] (see reference.head_budgets).

    The gamma policy is finished inside the budget kernel; the power policies add the
    alpha * n**C rule with the reference's own (float64) formula."""
    if config.budget == "gamma":
        return _gamma_budgets_and_last(q, k, config, q_offset, scale)[1]
    bs = config.block_size
    b, hq, nq, _ = q.shape
    mq = cdiv(nq, bs)
    causal = causal_blocks_per_row(mq, q_offset, bs, q.device)
    budget = torch.zeros(b, hq, mq, dtype=torch.long, device=q.device)
    if config.budget == "gamma+power":
        k_last = _gamma_budgets_and_last(q, k, config, q_offset, scale)[0][:, :, None]
        if config.row_rule == "fixed":
            budget = k_last.expand(b, hq, mq)
        else:
            c_last = causal[-1]
            budget = torch.div(k_last * causal + c_last - 1, c_last, rounding_mode="floor")
    power = power_budgets(mq, q_offset, nq, config, q.device).expand(b, hq, mq)
    budget = torch.clamp(torch.maximum(budget, power), min=config.min_budget_blocks)
    return torch.minimum(budget, causal.expand(b, hq, mq))
