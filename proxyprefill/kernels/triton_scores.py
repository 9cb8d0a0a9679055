"""Step 2 on the GPU: the proxy block scores (torch definition: `reference.estimate_block_scores`).

- `_strided_group_mean`: the strided proxy heads, each the mean of its group's heads.
- `_proxy_block_scores`: the fused score kernel (two passes over the causal strided keys: row
  max/sum, then block max), writing only [B, g, Mq, Nk_blocks].
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .config import ProxyAttnConfig
from .triton_common import (
    LOG2E,
    cdiv,
    dot_precision,
    last_dim_contiguous,
    record_launch,
    reduce_max,
    reduce_sum,
)

# Proxy scores: query blocks per program (rows = that x B/s strided queries) and key blocks per
# tile, with num_warps and num_stages, by head dim (bench/NOTES-kernels.md has the measurements).
SCORE_TILES: dict[int, tuple[int, int, int, int]] = {
    64: (2, 4, 4, 3),
    128: (2, 4, 8, 3),
}


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
        m_new = tl.maximum(m_i, reduce_max(qk, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + reduce_sum(tl.exp2(qk - m_new[:, None]), 1)
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
        block_max = reduce_max(reduce_max(p, 3), 1)  # [Q_BLOCKS, K_BLOCKS]
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
        rows = cdiv(n, s)
        out = torch.empty(b * g, rows, d, dtype=store, device=x.device)
        block_r = 64
        _strided_group_mean[(cdiv(rows, block_r), b * g)](
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
    (query blocks per program, key blocks per tile, num_warps, num_stages) for tuning runs.
    These are the proxy estimator's scores; `config.estimator` is read by the caller
    (proxyprefill/kernels/registry.py), not here."""
    bs, s, g = config.block_size, config.stride, config.proxy_groups
    b, _, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mq, nkb = cdiv(nq, bs), cdiv(nk, bs)
    q, k = last_dim_contiguous(q), last_dim_contiguous(k)
    proxy_q, proxy_k = _proxy_heads(q, k, config)
    scores = torch.full((b * g, mq, nkb), float("-inf"), dtype=torch.float32, device=q.device)
    per_block = bs // s
    q_blocks, k_blocks, warps, stages = tiles or SCORE_TILES.get(d, (2, 4, 4, 2))
    # tl.dot needs at least 16 rows and keys per tile
    q_blocks = max(q_blocks, cdiv(16, per_block))
    k_blocks = max(k_blocks, cdiv(16, per_block))
    grid = (cdiv(mq, q_blocks), b * g)
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
        DOT_PRECISION=dot_precision(proxy_q.dtype),
        num_warps=warps,
        num_stages=stages,
    )
    record_launch("scores", kernel)
    return scores.reshape(b, g, mq, nkb)
