"""The Triton backend on a CUDA device, at real sizes, against a float32 reference.

Each check draws fresh random inputs, poisons the outputs with NaN before the kernel writes
them (so an unwritten element fails), and compares ||out - ref|| / ||ref|| with the reference
computed in float32 from the same (rounded) inputs. Skipped without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch

from proxyprefill import kernels
from proxyprefill.kernels import BlockSparseIndex, ProxyAttnConfig
from proxyprefill.kernels import reference as ref

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

pytest.importorskip("triton")
from proxyprefill.kernels import triton_attention as tattn  # noqa: E402
from proxyprefill.kernels import triton_budgets as tbudgets  # noqa: E402
from proxyprefill.kernels import triton_common  # noqa: E402
from proxyprefill.kernels import triton_index as tindex  # noqa: E402
from proxyprefill.kernels import triton_scores as tscores  # noqa: E402

DEVICE = "cuda"


def make_qkv(b, hq, hkv, nq, d, q_offset, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    nk = q_offset + nq
    q = torch.randn(b, hq, nq, d, generator=gen, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=gen, device=DEVICE).to(dtype)
    return q, k, v


def random_index(b, hq, g, nq, nk, bs, q_offset, density, seed):
    """Random scores, budgets ~ density x the row's causal blocks, forced sink + diagonal."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cfg = ProxyAttnConfig(dense_below_tokens=0, block_size=bs, min_budget_tokens=0)
    mq, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    causal = q_offset // bs + torch.arange(mq, device=DEVICE) + 1
    scores = torch.rand(b, g, mq, nkb, generator=gen, device=DEVICE)
    scores = scores.masked_fill(torch.arange(nkb, device=DEVICE)[None, :] >= causal[:, None], float("-inf"))
    jitter = torch.rand(b, hq, mq, generator=gen, device=DEVICE) * 0.5 + 0.75
    budgets = torch.minimum((density * causal * jitter).long(), causal)
    return tindex.build_block_mask(scores, budgets, cfg, q_offset)


def rel_err(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


CASES = [
    # b, hq, hkv, g, nq, q_offset, d, dtype, density
    (1, 32, 8, 1, 8192, 0, 128, torch.bfloat16, 0.3),
    (1, 32, 8, 2, 4096 + 77, 4096, 128, torch.bfloat16, 0.5),  # chunked prefill, ragged
    (2, 16, 4, 1, 3000, 0, 64, torch.float16, 0.4),  # batch 2, d=64, ragged
    (1, 8, 8, 1, 2048, 2048, 64, torch.bfloat16, 1.0),  # no GQA, dense index through the sparse path
    (1, 12, 4, 4, 1024 + 5, 0, 128, torch.float16, 0.6),
]


@pytest.mark.parametrize("b,hq,hkv,g,nq,q_offset,d,dtype,density", CASES)
@pytest.mark.parametrize("tma", [None, False], ids=["auto", "pointers"])
def test_sparse_attention_against_float32_reference(b, hq, hkv, g, nq, q_offset, d, dtype, density, tma):
    q, k, v = make_qkv(b, hq, hkv, nq, d, q_offset, dtype, seed=nq + d)
    index = random_index(b, hq, g, nq, q_offset + nq, 128, q_offset, density, seed=b * 7 + g)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq, nq), float("nan"), device=DEVICE)
    tattn.block_sparse_attention(q, k, v, index, q_offset, out=out, lse=lse, tma=tma)
    ref_out, ref_lse = ref.block_sparse_attention(q.float(), k.float(), v.float(), index, q_offset)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()  # every element written
    assert rel_err(out, ref_out) <= 1e-2
    assert rel_err(lse, ref_lse) <= 1e-3


@pytest.mark.parametrize("tiles", [(128, 64, 8, 3), (128, 128, 8, 3)])
def test_gqa_packed_variant_against_float32_reference(tiles):
    """Heads of a KV head stacked in one program; per-head budgets differ (jittered)."""
    q, k, v = make_qkv(1, 32, 8, 8192 + 40, 128, 0, torch.bfloat16, seed=17)
    index = random_index(1, 32, 1, 8192 + 40, 8192 + 40, 128, 0, 0.3, seed=3)
    assert (index.block_counts != index.block_counts[:, :1]).any()
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 32, 8192 + 40), float("nan"), device=DEVICE)
    tattn.block_sparse_attention(q, k, v, index, out=out, lse=lse, tiles=tiles, gqa_packed=True)
    ref_out, ref_lse = ref.block_sparse_attention(q.float(), k.float(), v.float(), index)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref_out) <= 1e-2
    assert rel_err(lse, ref_lse) <= 1e-3


@pytest.mark.skipif(torch.cuda.get_device_capability()[0] < 9, reason="TMA needs Hopper or later")
def test_tma_path_on_a_kv_cache_slice_with_a_poisoned_tail():
    """Auto dispatch takes TMA for d=128 on Hopper; the descriptors stop at N, so the NaN tail of
    the cache buffer (reached by the ragged last block's tiles) never enters the result."""
    b, hq, hkv, nq, q_offset, d = 2, 16, 4, 2048 + 33, 1024, 128
    nk = q_offset + nq
    q, k, v = make_qkv(b, hq, hkv, nq, d, q_offset, torch.bfloat16, seed=29)
    k_cache = torch.full((b, hkv, nk + 500, d), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_cache[:, :, :nk], v_cache[:, :, :nk] = k, v
    k_view, v_view = k_cache[:, :, :nk], v_cache[:, :, :nk]
    assert tattn._use_tma(q, k_view, v_view, 128)
    index = random_index(b, hq, 2, nq, nk, 128, q_offset, 0.5, seed=8)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq, nq), float("nan"), device=DEVICE)
    triton_common.KERNEL_RESOURCES.pop("attention_tma", None)
    tattn.block_sparse_attention(q, k_view, v_view, index, q_offset, out=out, lse=lse)
    assert "attention_tma" in triton_common.KERNEL_RESOURCES  # recorded by this launch
    ref_out, ref_lse = ref.block_sparse_attention(q.float(), k.float(), v.float(), index, q_offset)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref_out) <= 1e-2
    assert rel_err(lse, ref_lse) <= 1e-3


def test_dense_index_matches_sdpa():
    q, k, v = make_qkv(1, 32, 8, 4096, 128, 0, torch.bfloat16, seed=1)
    index = BlockSparseIndex.dense(1, 32, 1, 4096, 4096, 128, device=DEVICE)
    out, _ = tattn.block_sparse_attention(q, k, v, index)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(4, 1), v.float().repeat_interleave(4, 1), is_causal=True
    )
    assert rel_err(out, want) <= 1e-2


@pytest.mark.parametrize("q_offset,nq,g", [(0, 8192, 1), (4096, 2048 + 100, 2)])
def test_estimation_against_reference(q_offset, nq, g):
    q, k, _ = make_qkv(1, 32, 8, nq, 128, q_offset, torch.bfloat16, seed=q_offset + nq)
    cfg = ProxyAttnConfig(dense_below_tokens=0, proxy_groups=g, gamma=0.9, min_budget_tokens=0)
    scores = tscores.estimate_block_scores(q, k, cfg, q_offset)
    want = ref.estimate_block_scores(q, k, cfg, q_offset)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(scores))
    # the proxy heads feed the tensor cores in bf16: scores agree to bf16 rounding of the logits
    assert rel_err(scores[finite], want[finite]) <= 2e-2
    budgets = tbudgets.head_budgets(q, k, cfg, q_offset)
    want_budgets = ref.head_budgets(q, k, cfg, q_offset)
    # a block share near the gamma boundary may round either way: allow one block per head
    assert (budgets - want_budgets).abs().max().item() <= 1
    index = tindex.build_block_mask(want, want_budgets, cfg, q_offset)
    want_index = ref.build_block_mask(want, want_budgets, cfg, q_offset)
    assert torch.equal(index.block_order, want_index.block_order)
    assert torch.equal(index.block_counts, want_index.block_counts)


def test_proxy_attention_auto_uses_triton_without_host_sync():
    q, k, v = make_qkv(1, 32, 8, 8192, 128, 0, torch.bfloat16, seed=5)
    cfg = ProxyAttnConfig(dense_below_tokens=0, gamma=0.9, min_budget_tokens=1024)
    kernels.proxy_attention(q, k, v, cfg, backend="auto")  # compile outside the sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, stats = kernels.proxy_attention(q, k, v, cfg, backend="auto", return_stats=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_out = ref.block_sparse_attention(q.float(), k.float(), v.float(), stats.index)[0]
    assert rel_err(out, ref_out) <= 1e-2
    assert stats.index.density() < 1.0
