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
  only on the diagonal block, K/V read through the KV head (GQA, no repeat in memory).
The index build uses torch sort/gather on the device (cheap at Nk_blocks <= a few thousand).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
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
ATTENTION_TILES: dict[int, tuple[int, int, int, int]] = {
    64: (128, 64, 4, 3),
    128: (128, 64, 8, 3),
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


def _proxy_heads(
    q: torch.Tensor, k: torch.Tensor, config: ProxyAttnConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Strided proxy heads [B*g, N/s, d]: the mean over the group's heads of every s-th token.

    The mean is taken in float32 and stored in q's dtype when that is a half type, so the score
    kernel's dots run on the tensor cores (float32 otherwise)."""
    s, g = config.stride, config.proxy_groups
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    store = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    qs = q[:, :, ::s]
    ks = k[:, :, ::s]
    proxy_q = qs.reshape(b, g, hq // g, qs.shape[2], d).float().mean(dim=2).to(store)
    proxy_k = ks.reshape(b, g, hkv // g, ks.shape[2], d).float().mean(dim=2).to(store)
    return proxy_q.reshape(b * g, -1, d).contiguous(), proxy_k.reshape(b * g, -1, d).contiguous()


def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Proxy block scores, float32 [B, g, Mq, Nk_blocks]; -inf past each row's diagonal
    (see reference.estimate_block_scores for the definition)."""
    if config.estimator == "meanpool":
        return coarse.estimate_block_scores_meanpool(q, k, config, q_offset, scale)
    bs, s, g = config.block_size, config.stride, config.proxy_groups
    b, _, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mq, nkb = _cdiv(nq, bs), _cdiv(nk, bs)
    proxy_q, proxy_k = _proxy_heads(q, k, config)
    scores = torch.full((b * g, mq, nkb), float("-inf"), dtype=torch.float32, device=q.device)
    per_block = bs // s
    q_blocks, k_blocks, warps, stages = SCORE_TILES.get(d, (2, 4, 4, 2))
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
    RowInvSum,
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
    inv_rows,
    qk_scale_log2,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """mass[b, h, n] = mean over the last block's rows of the probability summed over key block n."""
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
    row_max = tl.load(RowMax + bh * ROWS + tl.arange(0, ROWS))
    row_inv_sum = tl.load(RowInvSum + bh * ROWS + tl.arange(0, ROWS))
    row_inv_sum = tl.where(row_ok, row_inv_sum, 0.0)
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


def last_block_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-head gamma budget in key blocks, int64 [B, Hq] (see reference.last_block_budgets)."""
    bs = config.block_size
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nkb = _cdiv(nk, bs)
    first_row = (_cdiv(nq, bs) - 1) * bs
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    # split the keys so that about four programs per multiprocessor run
    splits = max(1, min(nkb, _cdiv(4 * _num_sms(q.device), b * hq)))
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
    # merge the splits: M = max_j m_j, L = sum_j l_j 2^(m_j - M)
    total_max = row_max.amax(dim=1)
    safe_max = torch.where(torch.isinf(total_max), torch.zeros_like(total_max), total_max)
    total_sum = (row_sum * torch.exp2(row_max - safe_max[:, None])).sum(dim=1)
    inv_sum = torch.where(total_sum > 0, 1.0 / total_sum, torch.zeros_like(total_sum))
    mass = torch.empty(b * hq, nkb, dtype=torch.float32, device=q.device)
    kernel = _last_block_mass[(b * hq, splits)](
        q,
        k,
        safe_max.contiguous(),
        inv_sum.contiguous(),
        mass,
        *common,
        nkb,
        q_offset,
        first_row,
        blocks_per_split,
        1.0 / (nq - first_row),
        scale * LOG2E,
        ROWS=bs,
        HEAD_DIM=d,
        DOT_PRECISION=precision,
        num_warps=warps,
    )
    _record("mass", kernel)
    share = mass.reshape(b, hq, nkb).sort(dim=-1, descending=True).values
    share = share / share.sum(dim=-1, keepdim=True)
    preceding = torch.cumsum(share, dim=-1) - share
    return (preceding < config.gamma).sum(dim=-1)


def head_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Block budget k_i(m) per head and query block, int64 [B, Hq, Mq] (see reference.head_budgets)."""
    bs = config.block_size
    b, hq, nq, _ = q.shape
    mq = _cdiv(nq, bs)
    causal = causal_blocks_per_row(mq, q_offset, bs, q.device)
    budget = torch.zeros(b, hq, mq, dtype=torch.long, device=q.device)
    if config.budget in ("gamma", "gamma+power"):
        k_last = last_block_budgets(q, k, config, q_offset, scale)[:, :, None]
        if config.row_rule == "fixed":
            budget = k_last.expand(b, hq, mq).clone()
        else:
            c_last = causal[-1]
            budget = torch.div(k_last * causal + c_last - 1, c_last, rounding_mode="floor")
    if config.budget in ("power", "gamma+power"):
        budget = torch.maximum(budget, power_budgets(mq, q_offset, nq, config, q.device).expand(b, hq, mq))
    budget = torch.clamp(budget, min=config.min_budget_blocks)
    return torch.minimum(budget, causal.expand(b, hq, mq))


# --------------------------------------------------------------------------------------------
# 5. The nested index
# --------------------------------------------------------------------------------------------
def build_block_mask(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
) -> BlockSparseIndex:
    """The nested index (see reference.build_block_mask), built with one sort per group row.

    The keep-first order sorts each row once with forced blocks (sinks, local) keyed +inf. The
    count |forced| + k - |forced among the top k| needs only the plain-score rank of the few
    forced blocks, counted directly (blocks scoring higher, or equal with a lower index), so no
    per-head [Hq, Mq, Nk_blocks] tensor is ever built."""
    bs = config.block_size
    b, g, mq, nkb = scores.shape
    hq = budgets.shape[1]
    device = scores.device
    causal = causal_blocks_per_row(mq, q_offset, bs, device)  # [Mq]
    diag = causal - 1
    col = torch.arange(nkb, device=device)

    # forced candidates per row: the sinks, then the local blocks (a local block that is also a
    # sink is counted once); valid only inside the row's causal blocks
    sinks = torch.arange(config.sink_blocks, device=device).expand(mq, config.sink_blocks)
    local = diag[:, None] - torch.arange(config.local_blocks, device=device)[None, :]
    candidates = torch.cat([sinks, local], dim=1)  # [Mq, F]
    valid = (candidates >= 0) & (candidates <= diag[:, None])
    valid[:, config.sink_blocks :] &= local >= config.sink_blocks
    safe = candidates.clamp(min=0)

    forced = ((col[None, None, :] == safe[:, :, None]) & valid[:, :, None]).any(dim=1)  # [Mq, Nk_blocks]

    keyed = scores.masked_fill(forced, float("inf"))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    order = torch.where(col < causal[:, None], order, torch.full_like(order, -1))

    # plain-score rank of every forced candidate: [B, g, Mq, F]
    cand_scores = torch.gather(scores, -1, safe.expand(b, g, mq, safe.shape[1]))
    higher = scores[..., None, :] > cand_scores[..., None]
    tied_before = (scores[..., None, :] == cand_scores[..., None]) & (col < safe[..., None])
    rank = (higher | tied_before).sum(dim=-1)  # [B, g, Mq, F]

    per_group = hq // g
    budgets_g = budgets.reshape(b, g, per_group, mq)
    in_top = (rank[:, :, None] < budgets_g[..., None]) & valid  # [B, g, per_group, Mq, F]
    overlap = in_top.sum(dim=-1)
    counts = valid.sum(dim=-1) + budgets_g - overlap
    counts = torch.minimum(counts, causal).reshape(b, hq, mq)
    return BlockSparseIndex(
        block_order=order.to(torch.int32),
        block_counts=counts.to(torch.int32),
        block_size=bs,
        q_offset=q_offset,
    )


# --------------------------------------------------------------------------------------------
# 6. Block-sparse attention
# --------------------------------------------------------------------------------------------
@triton.jit
def _sparse_attention_fwd(
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
):
    """One program per (batch x head, query tile). It walks its mask row's first `count` entries
    of the group's keep-first list, BLOCK_N keys at a time, with an online softmax. Only the
    diagonal key block needs the causal mask: any other kept block precedes every query of the
    row. Heads run fastest in the grid, so the heads of one KV head, which read the same (nested)
    K/V blocks, run side by side and share them through L2."""
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
    order_row = Order + b * stride_order_b + group * stride_order_g + mask_row * stride_order_m
    count = tl.load(Counts + b * stride_counts_b + h * stride_counts_h + mask_row)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for it in range(0, count * TILES):
        block = tl.load(order_row + it // TILES)
        keys = block * MASK_BLOCK + (it % TILES) * BLOCK_N + offs_n
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
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention over the index's kept blocks: (out like q, lse float32 [B, Hq, Nq]).

    `tiles` overrides (BLOCK_M, BLOCK_N, num_warps, num_stages) for tuning runs; `out` (q's shape
    and dtype) and `lse` (contiguous float32 [B, Hq, Nq]) are optional destinations, e.g. slices
    of a preallocated buffer."""
    bs = index.block_size
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"the Triton backend needs a power-of-two head_dim >= 16, got {d}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
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
    num_tiles = _cdiv(nq, block_m)
    kernel = _sparse_attention_fwd[(b * hq, num_tiles)](
        q,
        k,
        v,
        out,
        lse,
        order,
        counts,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        order.stride(0),
        order.stride(1),
        order.stride(2),
        counts.stride(0),
        counts.stride(1),
        hq,
        hq // hkv,
        hq // index.num_groups,
        num_tiles,
        nq,
        nk,
        q_offset,
        scale * LOG2E,
        MASK_BLOCK=bs,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=d,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    _record("attention", kernel)
    return out, lse
