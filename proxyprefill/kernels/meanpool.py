"""The mean-pool block-score estimator ("meanpool"): scores from mean-pooled query and key blocks.

Sequence-compressing sparse-prefill methods estimate block importance from one pooled vector
per block instead of from token-level scores. This module implements that idea with the same
grouping and output contract as the proxy estimator (`reference.estimate_block_scores`), so the
accuracy harness can swap the two (`ProxyAttnConfig(estimator="meanpool")`) and show what the
token-level proxy scores buy at the same budgets. It is plain PyTorch on any device, so it runs
under every backend (proxyprefill/kernels/backend.py), which then does the budgets, the index and attention.

For proxy group j (its query heads and KV heads averaged, as in `reference.proxy_heads`):

    pooled_q[m] = mean of proxy queries in query block m   (absolute positions q_offset + m*B ...)
    pooled_k[n] = mean of proxy keys in key block n        (positions n*B ...)
    S[b, j, m, n] = softmax over causal key blocks n <= diag(m) of  scale * pooled_q[m] . pooled_k[n]

A partial last block is averaged over the tokens it holds. Key blocks past the row's diagonal
are -inf, like the proxy scores, so every consumer (`build_block_mask`) works unchanged.
"""

from __future__ import annotations

import math

import torch

from .backend import BlockScoreEstimator
from .config import ProxyAttnConfig
from .index import causal_block_mask
from .reference import proxy_heads


def _block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of x [B, g, N, d] over consecutive blocks of `block_size` tokens -> [B, g, ceil(N/B), d]."""
    b, g, n, d = x.shape
    num_blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(x, (0, 0, 0, num_blocks * block_size - n))
    sums = padded.reshape(b, g, num_blocks, block_size, d).sum(dim=3)
    tokens = torch.full((num_blocks,), float(block_size), dtype=x.dtype, device=x.device)
    tokens[-1] = n - (num_blocks - 1) * block_size
    return sums / tokens[:, None]


def estimate_block_scores_meanpool(
    q: torch.Tensor,
    k: torch.Tensor,
    config: ProxyAttnConfig,
    q_offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Block scores from mean-pooled blocks of the group-mean heads (see the module docstring).

    q [B, Hq, Nq, d], k [B, Hkv, Nk, d] with Nk = q_offset + Nq and q_offset a multiple of the
    block size. Returns float32 [B, g, Mq, Nk_blocks]: each row a probability distribution over
    its causal key blocks, -inf past the diagonal.
    """
    bs = config.block_size
    d = q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    proxy_q, proxy_k = proxy_heads(q, k, config.proxy_groups)
    pooled_q = _block_means(proxy_q, bs)  # [B, g, Mq, d]
    pooled_k = _block_means(proxy_k, bs)  # [B, g, Nk_blocks, d]
    mq, nkb = pooled_q.shape[2], pooled_k.shape[2]
    logits = torch.einsum("bgmd,bgnd->bgmn", pooled_q, pooled_k) * scale
    causal = causal_block_mask(mq, nkb, q_offset, bs, q.device)
    probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    return probs.masked_fill(~causal, float("-inf"))


class MeanPoolScores(BlockScoreEstimator):
    """`estimate_block_scores_meanpool` behind the estimator interface (registered as "meanpool")."""

    name = "meanpool"

    def estimate(self, backend, q, k, config, q_offset, scale):
        return estimate_block_scores_meanpool(q, k, config, q_offset, scale)
