"""Property tests of the reference over random shapes and configurations (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxyprefill.kernels import (
    ProxyAttnConfig,
    block_sparse_attention,
    build_block_mask,
    estimate_block_scores,
    head_budgets,
    proxy_attention,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    bs = draw(st.sampled_from([16, 32]))
    stride = draw(st.sampled_from([s for s in (1, 2, 4, 8) if bs % s == 0]))
    hkv = draw(st.integers(1, 3))
    rep = draw(st.sampled_from([1, 2, 3, 4, 7]))
    groups = draw(st.sampled_from([g for g in range(1, hkv + 1) if hkv % g == 0]))
    q_offset = bs * draw(st.integers(0, 3))
    nq = draw(st.integers(1, 3 * bs + 7))
    cfg = ProxyAttnConfig(
        dense_below_tokens=0,
        block_size=bs,
        stride=stride,
        proxy_groups=groups,
        gamma=draw(st.sampled_from([0.3, 0.6, 0.9, 0.99, 1.0])),
        min_budget_tokens=draw(st.sampled_from([0, bs, 3 * bs])),
        budget=draw(st.sampled_from(["gamma", "power", "gamma+power"])),
        alpha=draw(st.sampled_from([0.5, 1.0, 4.0])),
        exponent=draw(st.sampled_from([0.3, 0.7, 1.0])),
        row_rule=draw(st.sampled_from(["fixed", "scaled"])),
        sink_blocks=draw(st.integers(0, 2)),
        local_blocks=draw(st.integers(1, 2)),
    )
    shape = dict(
        b=draw(st.integers(1, 2)),
        hq=hkv * rep,
        hkv=hkv,
        nq=nq,
        d=draw(st.sampled_from([8, 16])),
        q_offset=q_offset,
    )
    sharp = draw(st.sampled_from([1.0, 4.0]))
    return cfg, shape, sharp, draw(st.integers(0, 2**31 - 1))


def tensors(shape, sharp, seed):
    gen = torch.Generator().manual_seed(seed)
    nk = shape["q_offset"] + shape["nq"]
    q = torch.randn(shape["b"], shape["hq"], shape["nq"], shape["d"], generator=gen) * sharp
    k = torch.randn(shape["b"], shape["hkv"], nk, shape["d"], generator=gen)
    v = torch.randn(shape["b"], shape["hkv"], nk, shape["d"], generator=gen)
    return q, k, v


def masked_attention(q, k, v, block_mask, bs, q_offset):
    """Independent vectorised check: float64 softmax under block mask & causal mask."""
    rep = q.shape[1] // k.shape[1]
    nq, nk = q.shape[2], k.shape[2]
    kk, vv = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    qi = torch.arange(nq)[:, None] + q_offset
    kj = torch.arange(nk)[None, :]
    allowed = block_mask[:, :, (qi - q_offset).squeeze(1) // bs][..., kj.squeeze(0) // bs] & (kj <= qi)
    logits = (q.double() @ kk.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, -1) @ vv, torch.logsumexp(logits, -1)


@SETTINGS
@given(problems())
def test_index_invariants(problem):
    cfg, shape, sharp, seed = problem
    q, k, _ = tensors(shape, sharp, seed)
    off, bs = shape["q_offset"], cfg.block_size
    scores = estimate_block_scores(q, k, cfg, q_offset=off, backend="torch")
    budgets = head_budgets(q, k, cfg, q_offset=off, backend="torch")
    index = build_block_mask(scores, budgets, cfg, q_offset=off, backend="torch")
    mq = math.ceil(shape["nq"] / bs)
    causal = torch.arange(mq) + off // bs + 1
    counts = index.block_counts.long()
    assert (counts >= 1).all() and (counts <= causal).all()
    assert (counts >= budgets).all()
    dense = index.to_dense()
    assert torch.equal(dense.sum(-1), counts)
    diag = causal - 1
    assert dense[:, :, torch.arange(mq), diag].all(), "diagonal block always kept"
    if cfg.sink_blocks:
        assert dense[..., 0].all(), "sink block always kept"
    col = torch.arange(index.num_key_blocks)
    assert not (dense & (col > diag[:, None])).any(), "no block after the diagonal"
    sparsity = index.causal_sparsity()
    assert ((sparsity >= 0) & (sparsity < 1)).all()


@SETTINGS
@given(problems())
def test_block_sparse_attention_matches_masked_softmax(problem):
    cfg, shape, sharp, seed = problem
    q, k, v = tensors(shape, sharp, seed)
    off = shape["q_offset"]
    out, stats = proxy_attention(q, k, v, cfg, q_offset=off, backend="torch", return_stats=True)
    _, lse = block_sparse_attention(q, k, v, stats.index, q_offset=off, backend="torch")
    want_out, want_lse = masked_attention(q, k, v, stats.index.to_dense(), cfg.block_size, off)
    torch.testing.assert_close(out.double(), want_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(problems())
def test_chunk_scores_are_rows_of_the_full_scores(problem):
    cfg, shape, sharp, seed = problem
    q, k, _ = tensors(shape, sharp, seed)
    off, bs = shape["q_offset"], cfg.block_size
    if off == 0:
        return
    # the full call sees queries for the prefix too; take its rows for the chunk
    gen = torch.Generator().manual_seed(seed + 1)
    q_prefix = torch.randn(shape["b"], shape["hq"], off, shape["d"], generator=gen)
    full = estimate_block_scores(torch.cat([q_prefix, q], 2), k, cfg, backend="torch")
    chunk = estimate_block_scores(q, k, cfg, q_offset=off, backend="torch")
    torch.testing.assert_close(chunk, full[:, :, off // bs :], rtol=1e-5, atol=1e-7)
