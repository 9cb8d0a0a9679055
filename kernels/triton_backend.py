"""ProxyAttn on the GPU: Triton kernels with exactly the reference's semantics and return types.

Exports the four stages of kernels/reference.py:

    estimate_block_scores(q, k, config, q_offset, scale)  -> float32 [B, g, Mq, Nk_blocks]
    head_budgets(q, k, config, q_offset, scale)           -> int64 [B, Hq, Mq]
    build_block_mask(scores, budgets, config, q_offset)    -> BlockSparseIndex
    block_sparse_attention(q, k, v, index, q_offset, scale) -> (out like q, lse float32 [B, Hq, Nq])

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (float32/float16 only). Nothing
here synchronises with the host: every launch size is derived from tensor shapes.

Numerics: every kernel accumulates in float32 and exponentiates with exp2, the softmax scale
folded with log2(e); log-sum-exp values are returned in natural log. Half-precision inputs feed
the tensor cores directly; float32 inputs use full-precision ("ieee") dots.

Kernels:
- `_proxy_block_scores`: the fused proxy score kernel (strided group-mean Q/K, two passes over
  the causal strided keys: row max/sum, then block max), writing only [B, g, Mq, Nk_blocks].
- `_last_block_row_stats` + `_last_block_mass`: per-head budget measurement on the last query
  block, split over key ranges for parallelism (partial row max/sum, merged, then per key block
  probability mass).
- `_sparse_attention_fwd`: FlashAttention forward over each row's kept key blocks, causal mask
  only on the diagonal block, K/V read through the KV head (GQA, no repeat in memory), by TMA
  tensor descriptors on Hopper and later, by pointers elsewhere.
The index build uses torch sort/gather on the device (cheap at Nk_blocks <= a few thousand).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4: the pointer path only
    TensorDescriptor = None

from . import coarse
from .config import ProxyAttnConfig
from .index import BlockSparseIndex, causal_blocks_per_row
from .reference import power_budgets

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(_cuda_index(device))
    return 4  # interpreter: keep grids small


# Reductions through tl.reduce with the standard combine functions: the same code tl.max/tl.sum
# generate, but callable from kernels that Triton's interpreter runs while the rest of the process
# keeps compiled kernels (tl.max/tl.sum are themselves jit functions, bound to one mode at import).
@triton.jit
def _row_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _row_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


# --------------------------------------------------------------------------------------------
# Tile choices (per head dim; see bench/NOTES-kernels.md for the measurements behind them)
# --------------------------------------------------------------------------------------------
# Block-sparse attention: (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim. BLOCK_M and
# BLOCK_N are capped at the mask block size so one query tile sits in one mask row.
# With K/V through pointers:
ATTENTION_TILES: dict[int, tuple[int, int, int, int]] = {
    64: (128, 64, 4, 3),
    128: (128, 64, 8, 3),
}
# With K/V through TMA tensor descriptors (Hopper and later; head dims measured so far). The
# (128, 128) tile with 3 stages takes 233 registers and 224 KiB of shared memory on an H100.
TMA_ATTENTION_TILES: dict[int, tuple[int, int, int, int]] = {
    128: (128, 128, 8, 3),
}
# Proxy scores: query blocks per program (rows = that x B/s strided queries) and key blocks per tile.
SCORE_TILES: dict[int, tuple[int, int, int, int]] = {
    64: (2, 4, 4, 3),
    128: (2, 4, 8, 3),
}


# Resource use of the last compiled launch of each kernel (registers, spills, shared memory),
# filled on the GPU for the benchmark's record.
KERNEL_RESOURCES: dict[str, dict] = {}


def _record(name: str, kernel) -> None:
    if kernel is not None and hasattr(kernel, "n_regs"):
        shared = getattr(getattr(kernel, "metadata", None), "shared", None)
        KERNEL_RESOURCES[name] = {
            "registers": kernel.n_regs,
            "spills": kernel.n_spills,
            "shared_bytes": shared,
        }


def _attention_tiles(head_dim: int, mask_block: int) -> tuple[int, int, int, int]:
    block_m, block_n, warps, stages = ATTENTION_TILES.get(head_dim, (64, 64, 4, 2))
    return min(block_m, mask_block), min(block_n, mask_block), warps, stages


@functools.cache
def _has_tma(index: int) -> bool:
    return TensorDescriptor is not None and torch.cuda.get_device_capability(index)[0] >= 9


def _tma_layout_ok(x: torch.Tensor) -> bool:
    """Whether x [B, H, N, D] can be described as [B * H, N, D]: the batch stride is H head
    strides (or B is 1), and base and strides are 16-byte aligned (a TMA requirement)."""
    b, h = x.shape[0], x.shape[1]
    size = x.element_size()
    return (
        x.stride(-1) == 1
        and (b == 1 or x.stride(0) == h * x.stride(1))
        and x.data_ptr() % 16 == 0
        and (x.stride(1) * size) % 16 == 0
        and (x.stride(2) * size) % 16 == 0
    )


def _use_tma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_block: int) -> bool:
    """The TMA path where it was measured to pay: Hopper or later, half precision, a head dim
    with a measured TMA tile, mask blocks that hold whole tiles, and describable K/V."""
    tiles = TMA_ATTENTION_TILES.get(q.shape[-1])
    return (
        q.is_cuda
        and tiles is not None
        and q.dtype in (torch.float16, torch.bfloat16)
        and mask_block % tiles[0] == 0
        and mask_block % tiles[1] == 0
        and _has_tma(_cuda_index(q.device))
        and _tma_layout_ok(k)
        and _tma_layout_ok(v)
    )


def _kv_descriptor(x: torch.Tensor, block_n: int):
    """A tensor descriptor over x [B, H, N, D] seen as [B * H, N, D], loading [1, block_n, D]
    tiles; rows past N read as zeros."""
    b, h, n, d = x.shape
    return TensorDescriptor(x, [b * h, n, d], [x.stride(1), x.stride(2), 1], [1, block_n, d])


# --------------------------------------------------------------------------------------------
# 2. Proxy block scores
# --------------------------------------------------------------------------------------------
@triton.jit
def _proxy_block_scores(
    PQ,
    PK,
    Scores,
    stride_qbg,
    stride_qn,
    stride_kbg,
    stride_kn,
    stride_sbg,
    stride_sm,
    num_rows,  # strided queries of the chunk
    num_keys,  # strided keys of the prefix
    q_offset_s,  # q_offset // stride
    num_q_blocks,
    num_k_blocks,
    qk_scale_log2,
    Q_BLOCKS: tl.constexpr,  # query blocks per program
    PER_BLOCK: tl.constexpr,  # strided rows (and keys) per block: block_size // stride
    K_BLOCKS: tl.constexpr,  # key blocks per tile
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """A[m, n] = max over strided queries p of block m, strided keys t <= p of block n of
    softmax_t(scale * pq_p . pk_t). Pass 1: row max and sum over the causal strided keys;
    pass 2: normalised probabilities, max-pooled per (query block, key block)."""
    ROWS: tl.constexpr = Q_BLOCKS * PER_BLOCK
    KEYS: tl.constexpr = K_BLOCKS * PER_BLOCK
    pid_m = tl.program_id(0)
    bg = tl.program_id(1)
    first_block = pid_m * Q_BLOCKS
    rows = first_block * PER_BLOCK + tl.arange(0, ROWS)
    row_ok = rows < num_rows
    q_pos = q_offset_s + rows  # strided absolute positions
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        PQ + bg * stride_qbg + rows[:, None] * stride_qn + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    # strided keys visible to the program's last row
    key_end = tl.minimum(q_offset_s + (first_block + Q_BLOCKS) * PER_BLOCK, num_keys)

    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.full([ROWS], 0.0, dtype=tl.float32)
    for t0 in range(0, key_end, KEYS):
        keys = t0 + tl.arange(0, KEYS)
        k = tl.load(
            PK + bg * stride_kbg + keys[:, None] * stride_kn + dims[None, :],
            mask=keys[:, None] < num_keys,
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < num_keys)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, _row_max(qk, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + _row_sum(tl.exp2(qk - m_new[:, None]), 1)
        m_i = m_new

    inv_l = tl.where(row_ok, 1.0 / l_i, 0.0)  # padded rows contribute probability 0
    q_blocks = first_block + tl.arange(0, Q_BLOCKS)
    diag = q_offset_s // PER_BLOCK + q_blocks  # diagonal key block of each query block
    for t0 in range(0, key_end, KEYS):
        keys = t0 + tl.arange(0, KEYS)
        k = tl.load(
            PK + bg * stride_kbg + keys[:, None] * stride_kn + dims[None, :],
            mask=keys[:, None] < num_keys,
            other=0.0,
        )
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = (keys[None, :] <= q_pos[:, None]) & (keys[None, :] < num_keys)
        p = tl.where(visible, tl.exp2(qk - m_i[:, None]), 0.0) * inv_l[:, None]
        p = tl.reshape(p, [Q_BLOCKS, PER_BLOCK, K_BLOCKS, PER_BLOCK])
        block_max = _row_max(_row_max(p, 3), 1)  # [Q_BLOCKS, K_BLOCKS]
        k_blocks = t0 // PER_BLOCK + tl.arange(0, K_BLOCKS)
        keep = (q_blocks[:, None] < num_q_blocks) & (k_blocks[None, :] <= diag[:, None])
        keep = keep & (k_blocks[None, :] < num_k_blocks)
        tl.store(
            Scores + bg * stride_sbg + q_blocks[:, None] * stride_sm + k_blocks[None, :],
            block_max,
            mask=keep,
        )


@triton.jit
def _strided_group_mean(
    X,
    Out,
    stride_xb,
    stride_xh,
    stride_xn,
    num_groups,
    heads_per_group,
    num_rows,  # strided rows written: ceil(N / stride)
    stride,
    inv_heads,
    BLOCK_R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Out[b*g + j, r] = mean over the heads of group j of X[b, h, r * stride] (float32 sum)."""
    pid_r = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // num_groups
    group = bg % num_groups
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    dims = tl.arange(0, HEAD_DIM)
    offsets = (rows * stride)[:, None] * stride_xn + dims[None, :]
    acc = tl.full([BLOCK_R, HEAD_DIM], 0.0, dtype=tl.float32)
    for j in range(0, heads_per_group):
        head = group * heads_per_group + j
        x = tl.load(X + b * stride_xb + head * stride_xh + offsets, mask=row_ok[:, None], other=0.0)
        acc += x.to(tl.float32)
    out = Out + bg * num_rows * HEAD_DIM + rows[:, None] * HEAD_DIM + dims[None, :]
    tl.store(out, (acc * inv_heads).to(Out.dtype.element_ty), mask=row_ok[:, None])


def _proxy_heads(
    q: torch.Tensor, k: torch.Tensor, config: ProxyAttnConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided proxy heads [B*g, ceil(N/s), d]: the mean over the group's heads of every s-th token.

    The mean is summed in float32 and stored in q's dtype when that is a half type, so the score
    kernel's dots run on the tensor cores (float32 otherwise). One launch per tensor."""
    s, g = config.stride, config.proxy_groups
    store = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    proxies = []
    for x in (q, k):
        b, heads, n, d = x.shape
        rows = _cdiv(n, s)
        out = torch.empty(b * g, rows, d, dtype=store, device=x.device)
        block_r = 64
        _strided_group_mean[(_cdiv(rows, block_r), b * g)](
            x,
            out,
            x.stride(0),
            x.stride(1),
            x.stride(2),
            g,
            heads // g,
            rows,
            s,
            1.0 / (heads // g),
            BLOCK_R=block_r,
            HEAD_DIM=d,
            num_warps=4,
        )
        proxies.append(out)
    return proxies[0], proxies[1]


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
    tiles: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Proxy block scores, float32 [B, g, Mq, Nk_blocks]; -inf past each row's diagonal
    (see reference.estimate_block_scores for the definition). `tiles` overrides
    (query blocks per program, key blocks per tile, num_warps, num_stages) for tuning runs."""
    if config.estimator == "meanpool":
        return coarse.estimate_block_scores_meanpool(q, k, config, q_offset, scale)
    bs, s, g = config.block_size, config.stride, config.proxy_groups
    b, _, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mq, nkb = _cdiv(nq, bs), _cdiv(nk, bs)
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    proxy_q, proxy_k = _proxy_heads(q, k, config)
    scores = torch.full((b * g, mq, nkb), float("-inf"), dtype=torch.float32, device=q.device)
    per_block = bs // s
    q_blocks, k_blocks, warps, stages = tiles or SCORE_TILES.get(d, (2, 4, 4, 2))
    # tl.dot needs at least 16 rows and keys per tile
    q_blocks = max(q_blocks, _cdiv(16, per_block))
    k_blocks = max(k_blocks, _cdiv(16, per_block))
    grid = (_cdiv(mq, q_blocks), b * g)
    kernel = _proxy_block_scores[grid](
        proxy_q,
        proxy_k,
        scores,
        proxy_q.stride(0),
        proxy_q.stride(1),
        proxy_k.stride(0),
        proxy_k.stride(1),
        scores.stride(0),
        scores.stride(1),
        proxy_q.shape[1],
        proxy_k.shape[1],
        q_offset // s,
        mq,
        nkb,
        scale * LOG2E,
        Q_BLOCKS=q_blocks,
        PER_BLOCK=per_block,
        K_BLOCKS=k_blocks,
        HEAD_DIM=d,
        DOT_PRECISION=_dot_precision(proxy_q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    _record("scores", kernel)
    return scores.reshape(b, g, mq, nkb)


# --------------------------------------------------------------------------------------------
# 3./4. Budgets
# --------------------------------------------------------------------------------------------
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
        m_new = tl.maximum(m_i, _row_max(qk, 1))
        # a split that sees no key of a row keeps m = -inf; guard the -inf - -inf subtraction
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + _row_sum(tl.exp2(qk - m_safe[:, None]), 1)
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
    row_max = _row_max(part_max, 0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # rows that see no key (padding)
    row_total = _row_sum(part_sum * tl.exp2(part_max - row_max[None, :]), 0)
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
        tl.store(Mass + bh * num_key_blocks + n, _row_sum(_row_sum(p, 1), 0) * inv_rows)


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
    total = _row_sum(mass, 0)
    hits = tl.full([CHUNK], 0, dtype=tl.int32)
    for j0 in range(0, num_key_blocks, CHUNK):
        js = j0 + tl.arange(0, CHUNK)
        mass_j = tl.load(base + js, mask=js < num_key_blocks, other=-1.0)
        before = (ranked[None, :] > mass_j[:, None]) | (
            (ranked[None, :] == mass_j[:, None]) & (cols[None, :] < js[:, None])
        )
        preceding = _row_sum(tl.where(before, mass[None, :], 0.0), 1)
        hits += ((preceding / total < gamma) & (js < num_key_blocks)).to(tl.int32)
    k_last = _row_sum(hits, 0)
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


def _gamma_budgets_and_last(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_last int64 [B, Hq], gamma budgets with row rule, floor and clamp int64 [B, Hq, Mq])."""
    bs = config.block_size
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nkb = _cdiv(nk, bs)
    first_row = (_cdiv(nq, bs) - 1) * bs
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    # split the keys so that about four programs per multiprocessor run
    splits = max(1, min(nkb, 64, _cdiv(4 * _num_sms(q.device), b * hq)))
    blocks_per_split = _cdiv(nkb, splits)
    splits = _cdiv(nkb, blocks_per_split)
    precision = _dot_precision(q.dtype)
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
    _record("row_stats", kernel)
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
    _record("mass", kernel)
    mq = _cdiv(nq, bs)
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
    _record("gamma_budgets", kernel)
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
    mq = _cdiv(nq, bs)
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


# --------------------------------------------------------------------------------------------
# 5. The nested index
# --------------------------------------------------------------------------------------------
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
    rank = _row_sum((before & col_ok[None, :]).to(tl.int32), 1)
    num_forced = _row_sum(valid.to(tl.int32), 0)
    for j in range(0, heads_per_group):
        head = group * heads_per_group + j
        budget = tl.load(Budgets + b * stride_bb + head * stride_bh + m).to(tl.int32)
        overlap = _row_sum((valid & (rank < budget)).to(tl.int32), 0)
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
    nkb_p2 = max(16, triton.next_power_of_2(nkb))
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
    _record("index_rows", kernel)
    by_key = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    order = torch.empty(b, g, mq, nkb, dtype=torch.int32, device=scores.device)
    _finish_order[(mq, b * g)](by_key, order, nkb, q_offset // bs + 1, NKB=nkb_p2, num_warps=warps)
    return BlockSparseIndex(block_order=order, block_counts=counts, block_size=bs, q_offset=q_offset)


# --------------------------------------------------------------------------------------------
# 6. Block-sparse attention
# --------------------------------------------------------------------------------------------
@triton.jit
def _sparse_attention_fwd(
    Q,
    K,
    V,
    KDesc,
    VDesc,
    Out,
    Lse,
    Order,
    Counts,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    stride_order_b,
    stride_order_g,
    stride_order_m,
    stride_counts_b,
    stride_counts_h,
    num_heads,
    num_kv_heads,
    heads_per_kv,
    heads_per_group,
    num_query_tiles,
    num_queries,
    num_keys,
    q_offset,
    qk_scale_log2,
    MASK_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """One program per (batch x head, query tile). It walks its mask row's first `count` entries
    of the group's keep-first list, BLOCK_N keys at a time, with an online softmax:

        m' = max(m, rowmax(S) * c),  P = exp2(S * c - m'),  l' = l * exp2(m - m') + rowsum(P),
        acc' = acc * exp2(m - m') + P @ V,    out = acc / l,  lse = (m + log2 l) * ln 2

    with S = Q K^T and c = scale * log2(e). Heads run fastest in the grid, so the heads of one KV
    head, which read the same (nested) K/V blocks, run side by side and share them through L2.

    Only the diagonal key block needs the causal mask (every other kept block precedes every
    query of the row), applied under a uniform branch; only the last key block can be ragged.
    K/V tiles come either through pointers, bounds-checked, or (TMA) through tensor descriptors
    over [B * H_kv, N_k, D], which Hopper's bulk copy engine loads without per-element address
    arithmetic and zero-fills past N_k. With TMA the (128, 128) tile fits the register and shared
    memory budget and runs 10-12% faster on an H100 (bench/NOTES-kernels.md)."""
    TILES: tl.constexpr = MASK_BLOCK // BLOCK_N
    bh = tl.program_id(0)
    # longest rows first: better tail balance
    tile_m = num_query_tiles - 1 - tl.program_id(1)
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // heads_per_kv
    group = h // heads_per_group
    row0 = tile_m * BLOCK_M  # chunk-relative first query of the tile
    mask_row = row0 // MASK_BLOCK
    diag = q_offset // MASK_BLOCK + mask_row

    rows = row0 + tl.arange(0, BLOCK_M)
    q_pos = q_offset + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qn + dims[None, :],
        mask=rows[:, None] < num_queries,
        other=0.0,
    )
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    kv_row = b * num_kv_heads + kvh  # the descriptors' leading index
    order_row = Order + b * stride_order_b + group * stride_order_g + mask_row * stride_order_m
    count = tl.load(Counts + b * stride_counts_b + h * stride_counts_h + mask_row)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(0, count * TILES):
        block = tl.load(order_row + it // TILES)
        start = block * MASK_BLOCK + (it % TILES) * BLOCK_N
        keys = start + offs_n
        if TMA:
            k = KDesc.load([kv_row, start, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = VDesc.load([kv_row, start, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            in_range = keys[:, None] < num_keys
            k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=in_range, other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=in_range, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if block == diag:
            qk = tl.where(keys[None, :] <= q_pos[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, _row_max(qk, 1) * qk_scale_log2)
        p = tl.exp2(qk * qk_scale_log2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + _row_sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    row_ok = rows < num_queries
    tl.store(
        Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + bh * num_queries + rows, lse, mask=row_ok)


@triton.jit
def _sparse_attention_gqa_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    Order,
    Counts,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_on,
    stride_order_b,
    stride_order_g,
    stride_order_m,
    stride_counts_b,
    stride_counts_h,
    num_heads,
    num_kv_heads,
    kv_per_group,
    num_query_tiles,
    num_queries,
    num_keys,
    q_offset,
    qk_scale_log2,
    MASK_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    REP: tl.constexpr,  # query heads per KV head
    DOT_PRECISION: tl.constexpr,
):
    """GQA-packed variant: one program per (batch x KV head, tile of BLOCK_M / REP queries) holds
    the same queries of all REP query heads of the KV head, stacked in M (row r: head r // rows,
    query r % rows), so every K/V tile is loaded once for the REP heads. The heads' kept sets
    are nested prefixes of one list, so the program walks the longest prefix; from the shortest
    count on, rows whose head has stopped are masked to -inf (they add nothing)."""
    ROWS: tl.constexpr = BLOCK_M // REP
    TILES: tl.constexpr = MASK_BLOCK // BLOCK_N
    bkv = tl.program_id(0)
    tile_m = num_query_tiles - 1 - tl.program_id(1)
    b = bkv // num_kv_heads
    kvh = bkv % num_kv_heads
    group = kvh // kv_per_group
    q0 = tile_m * ROWS  # chunk-relative first query of the tile
    mask_row = q0 // MASK_BLOCK
    diag = q_offset // MASK_BLOCK + mask_row

    r = tl.arange(0, BLOCK_M)
    head = kvh * REP + r // ROWS
    query = q0 + r % ROWS
    q_pos = q_offset + query
    row_ok = query < num_queries
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + query[:, None] * stride_qn + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    order_row = Order + b * stride_order_b + group * stride_order_g + mask_row * stride_order_m
    row_count = tl.load(Counts + b * stride_counts_b + head * stride_counts_h + mask_row)
    max_count = _row_max(row_count, 0)
    min_count = -_row_max(-row_count, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(0, max_count * TILES):
        entry = it // TILES
        block = tl.load(order_row + entry)
        keys = block * MASK_BLOCK + (it % TILES) * BLOCK_N + offs_n
        in_range = keys[:, None] < num_keys
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=in_range, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=in_range, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if block == diag:
            qk = tl.where(keys[None, :] <= q_pos[:, None], qk, float("-inf"))
        if entry >= min_count:
            qk = tl.where((entry < row_count)[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, _row_max(qk, 1) * qk_scale_log2)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * qk_scale_log2 - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + _row_sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        Out + b * stride_ob + head[:, None] * stride_oh + query[:, None] * stride_on + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + (b * num_heads + head) * num_queries + query, lse, mask=row_ok)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    q_offset: int = 0,
    scale: float | None = None,
    tiles: tuple[int, int, int, int] | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    gqa_packed: bool = False,
    tma: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the index's kept blocks: (out like q, lse float32 [B, Hq, Nq]).

    `tiles` overrides (BLOCK_M, BLOCK_N, num_warps, num_stages) for tuning runs; `out` (q's shape
    and dtype) and `lse` (contiguous float32 [B, Hq, Nq]) are optional destinations, e.g. slices
    of a preallocated buffer. `gqa_packed` runs the variant that stacks a KV head's query heads
    in one program (needs a power-of-two ratio with BLOCK_M / ratio >= 16); see
    bench/NOTES-kernels.md for whether it pays. `tma` picks how K/V tiles are loaded: None
    chooses TMA descriptors where `_use_tma` allows (and then the TMA tiles), True asks for them
    (an error if K/V cannot be described), False keeps pointers; the GQA-packed variant always
    loads through pointers."""
    bs = index.block_size
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"the Triton backend needs a power-of-two head_dim >= 16, got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    if tma is None:
        tma = not gqa_packed and _use_tma(q, k, v, bs)
    elif tma and not (TensorDescriptor is not None and _tma_layout_ok(k) and _tma_layout_ok(v)):
        raise ValueError(
            "tma=True needs Triton's TensorDescriptor and K/V describable as [B*H, N, D] with 16-byte "
            f"aligned strides; got k strides {k.stride()}, v strides {v.stride()}"
        )
    if tiles is None:
        tiles = TMA_ATTENTION_TILES[d] if tma and not gqa_packed and d in TMA_ATTENTION_TILES else None
    block_m, block_n, warps, stages = tiles or _attention_tiles(d, bs)
    order = index.block_order
    counts = index.block_counts
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must match q {tuple(q.shape)} {q.dtype} with a unit last stride")
    if lse.shape != (b, hq, nq) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous float32 tensor of shape {(b, hq, nq)}")
    rep = hq // hkv
    if gqa_packed and rep > 1 and not rep & (rep - 1) and block_m // rep >= 16:
        rows = block_m // rep
        num_tiles = _cdiv(nq, rows)
        kernel = _sparse_attention_gqa_fwd[(b * hkv, num_tiles)](
            q, k, v, out, lse, order, counts,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            order.stride(0), order.stride(1), order.stride(2), counts.stride(0), counts.stride(1),
            hq, hkv, hkv // index.num_groups, num_tiles, nq, nk, q_offset, scale * LOG2E,
            MASK_BLOCK=bs, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, REP=rep,
            DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip
        _record("attention_gqa", kernel)
        return out, lse
    num_tiles = _cdiv(nq, block_m)
    kdesc = vdesc = None
    if tma:
        kdesc, vdesc = _kv_descriptor(k, block_n), _kv_descriptor(v, block_n)
    kernel = _sparse_attention_fwd[(b * hq, num_tiles)](
        q, k, v, kdesc, vdesc, out, lse, order, counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        order.stride(0), order.stride(1), order.stride(2), counts.stride(0), counts.stride(1),
        hq, hkv, hq // hkv, hq // index.num_groups, num_tiles, nq, nk, q_offset, scale * LOG2E,
        MASK_BLOCK=bs, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        DOT_PRECISION=_dot_precision(q.dtype), TMA=bool(tma), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _record("attention_tma" if tma else "attention", kernel)
    return out, lse
