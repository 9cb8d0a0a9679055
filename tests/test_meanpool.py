"""The mean-pooled block estimator against a loop-by-loop definition, and its routing."""

from __future__ import annotations

import math

import pytest
import torch

from proxyprefill.kernels import ProxyAttnConfig, api, reference, registry
from proxyprefill.kernels.meanpool import estimate_block_scores_meanpool


def _brute_force(q, k, config, q_offset, scale):
    """Block by block, group by group, straight from the definition."""
    bs, g = config.block_size, config.proxy_groups
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    mq, nkb = -(-nq // bs), -(-nk // bs)
    out = torch.full((b, g, mq, nkb), float("-inf"), dtype=torch.float64)
    for batch in range(b):
        for j in range(g):
            qh = q[batch, j * hq // g : (j + 1) * hq // g].double().mean(dim=0)  # [Nq, d]
            kh = k[batch, j * hkv // g : (j + 1) * hkv // g].double().mean(dim=0)  # [Nk, d]
            for m in range(mq):
                pooled_q = qh[m * bs : (m + 1) * bs].mean(dim=0)
                diagonal = (q_offset + m * bs) // bs
                logits = torch.stack(
                    [pooled_q @ kh[n * bs : (n + 1) * bs].mean(dim=0) * scale for n in range(diagonal + 1)]
                )
                out[batch, j, m, : diagonal + 1] = torch.softmax(logits, dim=0)
    return out


@pytest.mark.parametrize(
    "hq, hkv, groups, nq, q_offset",
    [(4, 2, 1, 64, 0), (4, 2, 2, 80, 0), (6, 3, 3, 48, 32), (2, 1, 1, 40, 48)],
)
def test_matches_definition(hq, hkv, groups, nq, q_offset):
    torch.manual_seed(hq * 100 + nq + q_offset)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, stride=4, proxy_groups=groups)
    q = torch.randn(2, hq, nq, 32)
    k = torch.randn(2, hkv, q_offset + nq, 32)
    scale = 1.0 / math.sqrt(32)
    got = estimate_block_scores_meanpool(q, k, config, q_offset)
    want = _brute_force(q, k, config, q_offset, scale)
    assert got.dtype == torch.float32 and got.shape == want.shape
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-6)


def test_rows_are_distributions_over_causal_blocks():
    torch.manual_seed(1)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, proxy_groups=1)
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 96, 16)
    scores = estimate_block_scores_meanpool(q, k, config, q_offset=32)
    for m in range(4):
        row = scores[0, 0, m]
        diagonal = 2 + m
        assert torch.isinf(row[diagonal + 1 :]).all()
        assert torch.isclose(row[: diagonal + 1].sum(), torch.tensor(1.0), atol=1e-5)


def test_chunk_scores_are_rows_of_the_whole_prompt():
    """Pooled queries of a block do not depend on other blocks, so a chunk's rows equal the
    corresponding rows of a single-chunk estimate."""
    torch.manual_seed(2)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, proxy_groups=1)
    q, k = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16)
    whole = estimate_block_scores_meanpool(q, k, config, q_offset=0)
    chunk = estimate_block_scores_meanpool(q[:, :, 48:], k, config, q_offset=48)
    torch.testing.assert_close(chunk, whole[:, :, 3:])


def test_planted_block_ranks_first():
    """A key block whose keys all align with every query outranks the others (sinks aside)."""
    torch.manual_seed(3)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, proxy_groups=1)
    direction = torch.randn(16)
    q = 0.1 * torch.randn(1, 2, 128, 16) + direction
    k = 0.1 * torch.randn(1, 1, 128, 16)
    k[:, :, 3 * 16 : 4 * 16] += 3 * direction
    scores = estimate_block_scores_meanpool(q, k, config)
    assert (scores[0, 0, 4:].argmax(dim=-1) == 3).all()


def test_proxy_attention_routes_meanpool_and_keeps_budgets():
    torch.manual_seed(4)
    config = ProxyAttnConfig(
        dense_below_tokens=0, block_size=16, gamma=0.8, min_budget_tokens=16, estimator="meanpool"
    )
    q, k, v = torch.randn(1, 4, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    out, stats = api.proxy_attention(q, k, v, config, backend="torch", return_stats=True)

    scores = estimate_block_scores_meanpool(q, k, config)
    budgets = reference.head_budgets(q, k, config)
    want = reference.build_block_mask(scores, budgets, config)
    assert torch.equal(stats.index.block_order, want.block_order)
    assert torch.equal(stats.index.block_counts, want.block_counts)
    torch.testing.assert_close(out, reference.block_sparse_attention(q, k, v, want)[0])
    torch.testing.assert_close(api.estimate_block_scores(q, k, config, backend="torch"), scores)

    proxy_scores = reference.estimate_block_scores(q, k, config.replace(estimator="proxy"))
    assert not torch.equal(proxy_scores, scores)  # the two estimators really differ


def test_registered_estimator_is_the_function_on_every_backend():
    """Behind the estimator interface the mean-pool scores are exactly the function's output,
    whichever backend runs the other steps (the scores never go through the backend)."""
    torch.manual_seed(5)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, proxy_groups=2, estimator="meanpool")
    q, k = torch.randn(1, 4, 80, 16), torch.randn(1, 2, 112, 16)
    want = estimate_block_scores_meanpool(q, k, config, q_offset=32)

    class NoProxyScores(reference.ReferenceBackend):
        def estimate_block_scores(self, *args):
            raise AssertionError("the proxy score step ran for the mean-pool estimator")

    estimator = registry.load_estimator("meanpool")
    assert estimator.name == "meanpool"
    assert torch.equal(estimator.estimate(NoProxyScores(), q, k, config, 32, None), want)
    assert torch.equal(api.estimate_block_scores(q, k, config, q_offset=32, backend=NoProxyScores()), want)
