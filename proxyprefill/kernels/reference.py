"""ProxyAttn in plain PyTorch: the oracle every other backend is checked against.

Runs on any device, computes in float32, and follows the steps of ARCHITECTURE.md ("The algorithm").
It favours clarity over speed but never materialises more than a bounded tile of any token-level matrix,
so it serves real models on the CPU at a few thousand tokens.

Shapes follow Hugging Face's attention interface:
    q [B, Hq, Nq, d]        queries of one chunk, absolute positions [q_offset, q_offset + Nq)
    k, v [B, Hkv, Nk, d]    keys/values of the whole prefix, Nk = q_offset + Nq
Query head h reads KV head h // (Hq // Hkv). Proxy group j holds KV heads
[j * Hkv/g, (j+1) * Hkv/g) and their query heads [j * Hq/g, (j+1) * Hq/g).

Blocks: query block m of the chunk covers absolute positions [q_offset + m*B, ... + B);
key block n covers [n*B, n*B + B). `q_offset` is a multiple of B, so query block m's diagonal
key block is `q_offset // B + m` and the row sees `q_offset // B + m + 1` causal key blocks.
"""

from __future__ import annotations

import math

import torch

from .backend import AttentionBackend
from .config import ProxyAttnConfig
from .index import BlockSparseIndex, causal_block_mask, causal_blocks_per_row, forced_block_mask

# Bound on the elements of any float32 token-level tile the reference builds (~256 MiB).
_TILE_ELEMENTS = 64 * 1024 * 1024


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# 1. Proxy heads
# --------------------------------------------------------------------------------------------
def proxy_heads(q: torch.Tensor, k: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each group's query heads and of its KV heads, in float32.

    Returns (proxy_q [B, g, Nq, d], proxy_k [B, g, Nk, d]).
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    proxy_q = q.float().reshape(b, groups, hq // groups, nq, d).mean(dim=2)
    proxy_k = k.float().reshape(b, groups, hkv // groups, nk, d).mean(dim=2)
    return proxy_q, proxy_k


# --------------------------------------------------------------------------------------------
# 2. Proxy block scores
# --------------------------------------------------------------------------------------------
def estimate_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Max-pooled proxy attention probabilities per (query block, key block).

    For every proxy head, keep queries and keys whose absolute position is a multiple of the
    stride s. Each strided query row takes a softmax (scaled logits) over the strided keys at or
    before it. The block score is the largest of those probabilities inside the tile of query
    block m x key block n:

        A[b, j, m, n] = max_{p in qblock m, p % s == 0} max_{t in kblock n, t % s == 0, t <= p} P_j[p, t]

    Key blocks after the row's diagonal are -inf, so they sort last.
    Returns float32 [B, g, Mq, Nk_blocks].
    """
    bs, s, g = config.block_size, config.stride, config.proxy_groups
    b, _, nq, d = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mq, nkb = _cdiv(nq, bs), _cdiv(nk, bs)
    proxy_q, proxy_k = proxy_heads(q, k, g)
    qs = proxy_q[:, :, ::s]  # absolute positions q_offset + i*s (q_offset is a multiple of s)
    ks = proxy_k[:, :, ::s]  # absolute positions j*s
    q_pos = q_offset + torch.arange(qs.shape[2], device=q.device) * s
    k_pos = torch.arange(ks.shape[2], device=q.device) * s
    rows_per_block, keys_per_block = bs // s, bs // s

    scores = torch.full((b, g, mq, nkb), float("-inf"), dtype=torch.float32, device=q.device)
    blocks_per_tile = max(1, _TILE_ELEMENTS // max(1, b * g * rows_per_block * ks.shape[2]))
    for m0 in range(0, mq, blocks_per_tile):
        m1 = min(mq, m0 + blocks_per_tile)
        r0, r1 = m0 * rows_per_block, min(qs.shape[2], m1 * rows_per_block)
        logits = torch.einsum("bgid,bgjd->bgij", qs[:, :, r0:r1], ks) * scale
        visible = k_pos[None, :] <= q_pos[r0:r1, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        # pad rows and keys to whole blocks with zeros (probabilities are >= 0), then max-pool
        pad_rows = (m1 - m0) * rows_per_block - (r1 - r0)
        pad_keys = nkb * keys_per_block - ks.shape[2]
        probs = torch.nn.functional.pad(probs, (0, pad_keys, 0, pad_rows))
        tile = probs.reshape(b, g, m1 - m0, rows_per_block, nkb, keys_per_block).amax(dim=(3, 5))
        scores[:, :, m0:m1] = tile

    causal = causal_block_mask(mq, nkb, q_offset, bs, q.device)
    return scores.masked_fill(~causal, float("-inf"))


# --------------------------------------------------------------------------------------------
# 3./4. Budgets
# --------------------------------------------------------------------------------------------
def last_block_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-head gamma budget, in key blocks, measured on the chunk's last query block.

    For real head i: softmax of the last query block (full resolution) against all its causal
    keys; average-pool the probabilities into key blocks (mean over the block's rows, sum over
    the block's keys: a fixed divisor, so after normalisation this is each block's share of the
    mass); sort descending; k_i = the fewest blocks whose cumulative share reaches gamma.
    Computed as the number of blocks whose *preceding* cumulative share is below gamma, which
    is that minimum and makes gamma = 1 keep every block with any mass.
    Returns int64 [B, Hq] (no minimum budget applied here).
    """
    bs = config.block_size
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    rep = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nkb = _cdiv(nk, bs)
    r0 = (_cdiv(nq, bs) - 1) * bs  # first row of the last query block (chunk-relative)
    q_last = q[:, :, r0:].float()
    q_pos = q_offset + r0 + torch.arange(nq - r0, device=q.device)
    k_pos = torch.arange(nk, device=q.device)
    visible = k_pos[None, :] <= q_pos[:, None]

    mass = torch.empty(b, hq, nkb, dtype=torch.float32, device=q.device)
    for kv_head in range(hkv):  # one KV head at a time bounds the tile to rep x B x Nk
        heads = slice(kv_head * rep, (kv_head + 1) * rep)
        logits = torch.einsum("bhid,bjd->bhij", q_last[:, heads], k[:, kv_head].float()) * scale
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        probs = torch.nn.functional.pad(probs, (0, nkb * bs - nk))
        mass[:, heads] = probs.reshape(b, rep, -1, nkb, bs).sum(dim=-1).mean(dim=2)

    share = mass.sort(dim=-1, descending=True).values
    share = share / share.sum(dim=-1, keepdim=True)
    preceding = torch.cumsum(share, dim=-1) - share
    return (preceding < config.gamma).sum(dim=-1)


def power_budgets(
    num_rows: int, q_offset: int, num_queries: int, config: ProxyAttnConfig, device
) -> torch.Tensor:
    """The alpha * n**C budget per query block, in key blocks: ceil(alpha * n**C / B), where n is
    the number of keys the row's last query sees. Returns int64 [Mq]."""
    bs = config.block_size
    last_query = torch.clamp(torch.arange(1, num_rows + 1, device=device) * bs, max=num_queries)
    n = (q_offset + last_query).double()
    return torch.ceil(config.alpha * n.pow(config.exponent) / bs).long()


def head_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Block budget k_i(m) for every head and query block, before sink/local blocks are added.

    gamma: k_i from `last_block_budgets`, applied to row m by `config.row_rule`:
        fixed  -> k_i
        scaled -> ceil(k_i * c_m / c_last)   (c_m = causal key blocks of row m)
    power: ceil(alpha * n_m**C / B).   gamma+power: the larger of the two.
    Then every row is floored at `min_budget_blocks` and clamped to c_m.
    Returns int64 [B, Hq, Mq].
    """
    bs = config.block_size
    b, hq, nq, _ = q.shape
    mq = _cdiv(nq, bs)
    causal = causal_blocks_per_row(mq, q_offset, bs, q.device)  # [Mq]
    budget = torch.zeros(b, hq, mq, dtype=torch.long, device=q.device)
    if config.budget in ("gamma", "gamma+power"):
        k_last = last_block_budgets(q, k, config, q_offset, scale)[:, :, None]  # [B, Hq, 1]
        if config.row_rule == "fixed":
            budget = k_last.expand(b, hq, mq).clone()
        else:
            c_last = causal[-1]
            budget = torch.div(k_last * causal + c_last - 1, c_last, rounding_mode="floor")
    if config.budget in ("power", "gamma+power"):
        power = power_budgets(mq, q_offset, nq, config, q.device)
        budget = torch.maximum(budget, power.expand(b, hq, mq))
    budget = torch.clamp(budget, min=config.min_budget_blocks)
    return torch.minimum(budget, causal.expand(b, hq, mq))


# --------------------------------------------------------------------------------------------
# 5. Mask (the compact nested index)
# --------------------------------------------------------------------------------------------
def build_block_mask(
    scores: torch.Tensor,
    budgets: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
) -> BlockSparseIndex:
    """Per (group, row): key blocks in keep-first order; per (head, row): how many to keep.

    Head i keeps, in row m, the union of its group's top k_i(m) key blocks by score and the
    forced blocks (sinks and local blocks). The order lists the forced blocks first (ascending),
    then the remaining causal blocks by descending score (ties: lower block first), so every
    head's kept set is a prefix of one shared list, and the sets of a group are nested. The
    prefix length is |forced| + k_i(m) - |forced among the top k_i(m)|.
    """
    bs = config.block_size
    b, g, mq, nkb = scores.shape
    hq = budgets.shape[1]
    device = scores.device
    causal = causal_blocks_per_row(mq, q_offset, bs, device)  # [Mq]
    forced = forced_block_mask(mq, nkb, q_offset, config, device)  # bool [Mq, Nk_blocks]

    # ranks in the plain score order (stable: ties go to the lower block index)
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(by_score)
    rank.scatter_(-1, by_score, torch.arange(nkb, device=device).expand_as(by_score))

    # keep-first order: forced blocks first, then by score; non-causal blocks already -inf
    keyed = scores.masked_fill(forced, float("inf"))
    order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices
    col = torch.arange(nkb, device=device)
    order = torch.where(col < causal[:, None], order, torch.full_like(order, -1))

    heads_per_group = hq // g
    group_rank = rank.repeat_interleave(heads_per_group, dim=1)  # [B, Hq, Mq, Nk_blocks]
    in_top = group_rank < budgets[..., None]
    overlap = (in_top & forced).sum(dim=-1)
    counts = forced.sum(dim=-1) + budgets - overlap
    counts = torch.minimum(counts, causal)
    return BlockSparseIndex(
        block_order=order.to(torch.int32),
        block_counts=counts.to(torch.int32),
        block_size=bs,
        q_offset=q_offset,
    )


# --------------------------------------------------------------------------------------------
# 6. Block-sparse attention
# --------------------------------------------------------------------------------------------
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: BlockSparseIndex,
    q_offset: int = 0,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention restricted to each (head, query block)'s kept key blocks.

    out[b, h, p] = sum_t softmax_t(scale * q_p . k_t) v_t over keys t <= p in kept blocks;
    lse[b, h, p] = log sum_t exp(scale * q_p . k_t) over the same keys (natural log, float32).
    Computed in float32 a tile of query blocks at a time; `out` is returned in q's dtype.
    """
    bs = index.block_size
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    rep = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mq = _cdiv(nq, bs)
    kf = k.float().repeat_interleave(rep, dim=1)
    vf = v.float().repeat_interleave(rep, dim=1)
    out = torch.empty(b, hq, nq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    k_pos = torch.arange(nk, device=q.device)

    blocks_per_tile = max(1, _TILE_ELEMENTS // max(1, b * hq * bs * nk))
    for m0 in range(0, mq, blocks_per_tile):
        m1 = min(mq, m0 + blocks_per_tile)
        r0, r1 = m0 * bs, min(nq, m1 * bs)
        kmax = min(nk, q_offset + r1)  # keys beyond the tile's last query are never visible
        block_mask = index.to_dense(rows=slice(m0, m1))  # [B, Hq, mt, Nk_blocks]
        token_mask = block_mask.repeat_interleave(bs, dim=2)[:, :, : r1 - r0]
        token_mask = token_mask.repeat_interleave(bs, dim=3)[..., :kmax]
        q_pos = q_offset + torch.arange(r0, r1, device=q.device)
        token_mask = token_mask & (k_pos[None, :kmax] <= q_pos[:, None])
        logits = torch.einsum("bhid,bhjd->bhij", q[:, :, r0:r1].float(), kf[:, :, :kmax]) * scale
        logits = logits.masked_fill(~token_mask, float("-inf"))
        tile_lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - tile_lse[..., None])
        out[:, :, r0:r1] = torch.einsum("bhij,bhjd->bhid", probs, vf[:, :, :kmax]).to(q.dtype)
        lse[:, :, r0:r1] = tile_lse
    return out, lse


# --------------------------------------------------------------------------------------------
# The reference as an attention backend (proxyprefill/kernels/registry.py: "torch")
# --------------------------------------------------------------------------------------------
class ReferenceBackend(AttentionBackend):
    """The steps above, on any device, dtype and head dim (they compute in float32)."""

    name = "torch"

    def unsupported_reason(self, device, dtype, head_dim, *, emulated=False):
        return None

    estimate_block_scores = staticmethod(estimate_block_scores)
    head_budgets = staticmethod(head_budgets)
    build_block_mask = staticmethod(build_block_mask)
    block_sparse_attention = staticmethod(block_sparse_attention)
