"""Step 6 on the GPU: block-sparse attention (torch definition: `reference.block_sparse_attention`).

FlashAttention forward over each row's kept key blocks, causal mask only on the diagonal block,
K/V read through the KV head (GQA, no repeat in memory): by TMA tensor descriptors on Hopper and
later, by pointers elsewhere (`_sparse_attention_fwd`), or with a KV head's query heads stacked
in one program (`_sparse_attention_gqa_fwd`). Both kernels walk the kept blocks with the same
online-softmax step, `_attend_tile`.
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

from .index import BlockSparseIndex
from .triton_common import (
    LOG2E,
    cdiv,
    cuda_index,
    dot_precision,
    last_dim_contiguous,
    record_launch,
    reduce_max,
    reduce_sum,
)

# Tile choices, per head dim (see bench/NOTES-kernels.md for the measurements behind them).
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
        and _has_tma(cuda_index(q.device))
        and _tma_layout_ok(k)
        and _tma_layout_ok(v)
    )


def _kv_descriptor(x: torch.Tensor, block_n: int):
    """A tensor descriptor over x [B, H, N, D] seen as [B * H, N, D], loading [1, block_n, D]
    tiles; rows past N read as zeros."""
    b, h, n, d = x.shape
    return TensorDescriptor(x, [b * h, n, d], [x.stride(1), x.stride(2), 1], [1, block_n, d])


@triton.jit
def _attend_tile(
    q,
    k,
    v,
    keys,
    q_pos,
    block,  # the key block of this tile
    diag,  # the query block's diagonal key block
    m_i,
    l_i,
    acc,
    qk_scale_log2,
    entry,  # HEADS_STOP_EARLY: this tile's position in the keep-first list
    min_count,  # HEADS_STOP_EARLY: the shortest count among the tile's rows
    row_count,  # HEADS_STOP_EARLY: each row's count [BLOCK_M]
    DOT_PRECISION: tl.constexpr,
    HEADS_STOP_EARLY: tl.constexpr,
):
    """One step of the online softmax over a K/V tile, shared by both attention kernels:

        S = Q K^T (causal mask on the diagonal block only),  m' = max(m, rowmax(S) * c),
        P = exp2(S * c - m'),  l' = l * exp2(m - m') + rowsum(P),  acc' = acc * exp2(m - m') + P @ V

    with c = scale * log2(e). Returns (m', l', acc'). With HEADS_STOP_EARLY (the GQA-packed
    kernel, whose rows belong to heads with different counts) rows past their count are masked
    to -inf from the shortest count on, and a row that has seen no key yet keeps m = -inf, so the
    exponent is taken against 0 instead (no -inf - -inf). Triton inlines this function, so each
    kernel compiles to the code it had when the step was written out in its loop."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if block == diag:
        qk = tl.where(keys[None, :] <= q_pos[:, None], qk, float("-inf"))
    if HEADS_STOP_EARLY:
        if entry >= min_count:
            qk = tl.where((entry < row_count)[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, reduce_max(qk, 1) * qk_scale_log2)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, reduce_max(qk, 1) * qk_scale_log2)
        m_ref = m_new
    p = tl.exp2(qk * qk_scale_log2 - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + reduce_sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


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
        m_i, l_i, acc = _attend_tile(
            q, k, v, keys, q_pos, block, diag, m_i, l_i, acc, qk_scale_log2, None, None, None,
            DOT_PRECISION=DOT_PRECISION, HEADS_STOP_EARLY=False,
        )  # fmt: skip

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
    max_count = reduce_max(row_count, 0)
    min_count = -reduce_max(-row_count, 0)

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
        m_i, l_i, acc = _attend_tile(
            q, k, v, keys, q_pos, block, diag, m_i, l_i, acc, qk_scale_log2, entry, min_count, row_count,
            DOT_PRECISION=DOT_PRECISION, HEADS_STOP_EARLY=True,
        )  # fmt: skip

    out = acc / l_i[:, None]
    tl.store(
        Out + b * stride_ob + head[:, None] * stride_oh + query[:, None] * stride_on + dims[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + (b * num_heads + head) * num_queries + query, lse, mask=row_ok)


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
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
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
        num_tiles = cdiv(nq, rows)
        kernel = _sparse_attention_gqa_fwd[(b * hkv, num_tiles)](
            q, k, v, out, lse, order, counts,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            order.stride(0), order.stride(1), order.stride(2), counts.stride(0), counts.stride(1),
            hq, hkv, hkv // index.num_groups, num_tiles, nq, nk, q_offset, scale * LOG2E,
            MASK_BLOCK=bs, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, REP=rep,
            DOT_PRECISION=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
        )  # fmt: skip
        record_launch("attention_gqa", kernel)
        return out, lse
    num_tiles = cdiv(nq, block_m)
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
        DOT_PRECISION=dot_precision(q.dtype), TMA=bool(tma), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    record_launch("attention_tma" if tma else "attention", kernel)
    return out, lse
