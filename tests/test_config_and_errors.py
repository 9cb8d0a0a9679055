"""Invalid settings and shapes fail early, with messages that name the field or the shapes."""

from __future__ import annotations

import pytest
import torch

from proxyprefill.kernels import (
    BlockSparseIndex,
    ProxyAttnConfig,
    block_sparse_attention,
    estimate_block_scores,
    proxy_attention,
)


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_size", 0),
        ("block_size", 96),
        ("block_size", 8),
        ("stride", 0),
        ("stride", 3),
        ("proxy_groups", 0),
        ("gamma", 0.0),
        ("gamma", 1.5),
        ("gamma", "high"),
        ("min_budget_tokens", -1),
        ("budget", "topk"),
        ("alpha", 0),
        ("alpha", float("inf")),
        ("exponent", 0),
        ("exponent", 1.2),
        ("row_rule", "linear"),
        ("sink_blocks", -1),
        ("local_blocks", 0),
        ("dense_below_tokens", 1.5),
        ("estimator", "oracle"),
        ("block_size", True),
    ],
)
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ProxyAttnConfig(**{field: value})


def test_config_round_trips_through_a_dict():
    cfg = ProxyAttnConfig(gamma=0.9, budget="gamma+power", row_rule="scaled")
    assert ProxyAttnConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        ProxyAttnConfig.from_dict({"gama": 0.9})
    assert ProxyAttnConfig(block_size=128, min_budget_tokens=2049).min_budget_blocks == 17


def _qkv(hq=4, hkv=2, nq=32, nk=32, d=16, b=1):
    return torch.randn(b, hq, nq, d), torch.randn(b, hkv, nk, d), torch.randn(b, hkv, nk, d)


CFG = ProxyAttnConfig(block_size=16, min_budget_tokens=0)


def test_heads_not_a_multiple():
    q, k, v = _qkv(hq=5, hkv=2)
    with pytest.raises(ValueError, match=r"multiple of KV heads.*\(1, 5, 32, 16\)"):
        proxy_attention(q, k, v, CFG)


def test_groups_must_divide_kv_heads():
    q, k, v = _qkv(hq=6, hkv=3)
    with pytest.raises(ValueError, match=r"proxy_groups \(2\) must divide KV heads \(3\)"):
        proxy_attention(q, k, v, CFG.replace(proxy_groups=2))


def test_prefix_length_must_match():
    q, k, v = _qkv(nq=32, nk=40)
    with pytest.raises(ValueError, match=r"Nk \(40\) != q_offset \(0\) \+ Nq \(32\)"):
        proxy_attention(q, k, v, CFG)
    with pytest.raises(ValueError, match="multiple of block_size"):
        proxy_attention(q, k, v, CFG, q_offset=8)


def test_dtype_device_and_rank_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="dtypes differ"):
        proxy_attention(q, k.half(), v, CFG)
    with pytest.raises(ValueError, match="4-D"):
        proxy_attention(q[0], k, v, CFG)
    with pytest.raises(ValueError, match="v must have k's shape"):
        proxy_attention(q, k, v[:, :, :16], CFG)
    with pytest.raises(ValueError, match="head_dim"):
        proxy_attention(q, torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), CFG)
    with pytest.raises(ValueError, match="backend"):
        estimate_block_scores(q, k, CFG, backend="cuda")


def test_index_shape_mismatch():
    q, k, v = _qkv()
    index = BlockSparseIndex.dense(1, 4, 1, num_queries=16, num_keys=16, block_size=16)
    with pytest.raises(ValueError, match="block_counts has shape"):
        block_sparse_attention(q, k, v, index)
