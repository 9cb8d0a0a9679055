"""The Triton backend against the PyTorch reference, on CPU tensors through Triton's interpreter.

The interpreter is chosen when a kernel is decorated, so the backend module is loaded here a
second time, under its own name, with TRITON_INTERPRET=1 set only while it loads: the rest of
the test session (and any GPU test) keeps the compiled kernels. Sizes are small and dtypes are
float32/float16 (bfloat16 is wrong under the interpreter).

Boundary ties: budgets compare a cumulative share with gamma and the index sorts scores; both
backends compute in float32 but in a different summation order, so a share landing exactly on
gamma, or two scores equal to the last bit, could round differently. Random normal inputs make
either event vanishingly rare; the index test builds exact ties on purpose and feeds both
backends the same scores, so there the results must agree exactly.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from proxyprefill import kernels  # noqa: E402
from proxyprefill.kernels import BlockSparseIndex, ProxyAttnConfig  # noqa: E402
from proxyprefill.kernels import reference as ref  # noqa: E402
from proxyprefill.kernels.meanpool import estimate_block_scores_meanpool  # noqa: E402

BACKEND_NAME = "proxyprefill.kernels.triton_backend"
# The Triton modules, those that others import first (each binds the jit functions it imports).
TRITON_MODULES = [
    "proxyprefill.kernels.triton_common",
    "proxyprefill.kernels.triton_scores",
    "proxyprefill.kernels.triton_budgets",
    "proxyprefill.kernels.triton_index",
    "proxyprefill.kernels.triton_attention",
    BACKEND_NAME,
]


def _load_interpreted_modules() -> dict[str, object]:
    """Import the Triton modules afresh with TRITON_INTERPRET=1, then put the compiled ones (if
    any were loaded) back in sys.modules and on the package: only this file sees the fresh set."""
    saved_modules = {name: sys.modules.pop(name) for name in TRITON_MODULES if name in sys.modules}
    saved_attrs = {
        name.rsplit(".", 1)[1]: getattr(kernels, name.rsplit(".", 1)[1], None) for name in TRITON_MODULES
    }
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        fresh = {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in TRITON_MODULES}
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
        for name in TRITON_MODULES:
            sys.modules.pop(name, None)
            attr = name.rsplit(".", 1)[1]
            if saved_attrs[attr] is None and hasattr(kernels, attr):
                delattr(kernels, attr)
            elif saved_attrs[attr] is not None:
                setattr(kernels, attr, saved_attrs[attr])
        sys.modules.update(saved_modules)
    return fresh


interpreted = _load_interpreted_modules()
tb = interpreted["triton_backend"]
tattn = interpreted["triton_attention"]
tscores = interpreted["triton_scores"]
tbudgets = interpreted["triton_budgets"]
tindex = interpreted["triton_index"]


def make_qkv(b, hq, hkv, nq, d, q_offset=0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    nk = q_offset + nq
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=gen).to(dtype)
    return q, k, v


def random_index(b, hq, g, nq, nk, bs, q_offset, seed, cfg=None):
    """An index built by the reference from random scores and random per-(head,row) budgets."""
    gen = torch.Generator().manual_seed(seed)
    cfg = cfg or ProxyAttnConfig(dense_below_tokens=0, block_size=bs, min_budget_tokens=0)
    mq, nkb = math.ceil(nq / bs), math.ceil(nk / bs)
    causal = q_offset // bs + torch.arange(mq) + 1
    scores = torch.rand(b, g, mq, nkb, generator=gen)
    scores = scores.masked_fill(torch.arange(nkb)[None, :] >= causal[:, None], float("-inf"))
    budgets = torch.minimum(torch.randint(0, nkb + 1, (b, hq, mq), generator=gen), causal)
    return ref.build_block_mask(scores, budgets, cfg, q_offset)


def rel_err(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


# ----------------------------------------------------------------------------------------------
# Block-sparse attention
# ----------------------------------------------------------------------------------------------
ATTENTION_CASES = [
    # b, hq, hkv, g, nq, q_offset, d, bs
    (1, 4, 2, 1, 96, 0, 32, 16),  # whole blocks, GQA 2
    (2, 4, 1, 1, 75, 0, 16, 16),  # ragged last block, batch 2, MQA
    (1, 6, 2, 2, 50, 64, 32, 32),  # chunked prefill (q_offset), 2 groups, ragged
    (1, 2, 2, 2, 40, 32, 64, 32),  # no GQA, d=64
    (1, 4, 2, 1, 150, 64, 32, 64),  # mask block larger than the key tile (several tiles per block)
]


@pytest.mark.parametrize("b,hq,hkv,g,nq,q_offset,d,bs", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_sparse_attention_matches_reference(b, hq, hkv, g, nq, q_offset, d, bs, dtype, tma):
    q, k, v = make_qkv(b, hq, hkv, nq, d, q_offset, seed=nq + d, dtype=dtype)
    # sink and diagonal blocks forced, plus random top-k picks: every row keeps its diagonal
    index = random_index(b, hq, g, nq, q_offset + nq, bs, q_offset, seed=bs)
    assert index.density() < 1.0
    out, lse = tattn.block_sparse_attention(q, k, v, index, q_offset, tma=tma)
    ref_out, ref_lse = ref.block_sparse_attention(q.float(), k.float(), v.float(), index, q_offset)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (b, hq, nq)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert rel_err(out, ref_out) < tol
    assert (lse - ref_lse).abs().max().item() < (1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("q_offset,nq", [(0, 70), (48, 33)])
def test_dense_index_equals_plain_causal_attention(q_offset, nq):
    b, hq, hkv, d, bs = 1, 4, 2, 32, 16
    q, k, v = make_qkv(b, hq, hkv, nq, d, q_offset, seed=7)
    index = BlockSparseIndex.dense(b, hq, 1, nq, q_offset + nq, bs, q_offset)
    out, lse = tattn.block_sparse_attention(q, k, v, index, q_offset, scale=0.3)
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    logits = q @ kr.transpose(-1, -2) * 0.3
    causal = torch.arange(q_offset + nq)[None, :] <= (q_offset + torch.arange(nq))[:, None]
    logits = logits.masked_fill(~causal, float("-inf"))
    assert torch.allclose(out, torch.softmax(logits, -1) @ vr, atol=1e-5)
    assert torch.allclose(lse, torch.logsumexp(logits, -1), atol=1e-5)


@pytest.mark.parametrize("b", [1, 2])
def test_sparse_attention_reads_non_contiguous_inputs(b):
    """Hugging Face hands over views ([B, N, H, d] storage transposed); strides must be honoured.
    With batch 1 such a view is still a [H, N, d] strided tensor for TMA; with batch 2 its batch
    stride is not H head strides, so TMA cannot describe it and asking for it is an error."""
    hq, hkv, nq, d, bs = 4, 2, 48, 32, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, nq, hq, d, generator=gen).transpose(1, 2)
    k = torch.randn(b, nq, hkv, d, generator=gen).transpose(1, 2)
    v = torch.randn(b, nq, hkv, d, generator=gen).transpose(1, 2)
    cfg = ProxyAttnConfig(dense_below_tokens=0, block_size=bs, min_budget_tokens=bs)
    index = random_index(b, hq, 1, nq, nq, bs, 0, seed=5, cfg=cfg)
    ref_out, ref_lse = ref.block_sparse_attention(q, k, v, index)
    for tma in [False, True] if b == 1 else [False]:
        out, lse = tattn.block_sparse_attention(q, k, v, index, tma=tma)
        assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)
    if b > 1:
        with pytest.raises(ValueError, match="tma=True"):
            tattn.block_sparse_attention(q, k, v, index, tma=True)


def test_tma_reads_a_kv_cache_slice_and_zero_fills_past_its_end():
    """The engine's K/V are slices [:, :, :N] of a longer cache buffer. The TMA descriptors are
    bounded at N, so the NaN-poisoned tail of the buffer is never read (the last block is
    ragged and its tail keys would otherwise reach it)."""
    b, hq, hkv, nq, q_offset, d, bs = 2, 4, 2, 37, 16, 32, 16
    nk, capacity = q_offset + nq, 96
    q, k, v = make_qkv(b, hq, hkv, nq, d, q_offset, seed=21)
    k_cache = torch.full((b, hkv, capacity, d), float("nan"))
    v_cache = torch.full((b, hkv, capacity, d), float("nan"))
    k_cache[:, :, :nk], v_cache[:, :, :nk] = k, v
    index = random_index(b, hq, 2, nq, nk, bs, q_offset, seed=4)
    out, lse = tattn.block_sparse_attention(
        q, k_cache[:, :, :nk], v_cache[:, :, :nk], index, q_offset, tma=True
    )
    ref_out, ref_lse = ref.block_sparse_attention(q, k, v, index, q_offset)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_auto_tma_stays_off_without_a_gpu():
    q, k, v = make_qkv(1, 2, 1, 32, 128, 0, seed=2, dtype=torch.float16)
    assert not tattn._use_tma(q, k, v, 128)


# ----------------------------------------------------------------------------------------------
# Estimation: proxy scores and budgets
# ----------------------------------------------------------------------------------------------
SCORE_CASES = [
    # b, hq, hkv, g, nq, q_offset, d, bs, stride
    (1, 4, 2, 1, 128, 0, 32, 32, 4),
    (2, 4, 2, 2, 90, 0, 16, 16, 2),  # ragged, batch 2, two groups, 8 strided rows per block
    (1, 8, 4, 2, 60, 64, 32, 32, 4),  # chunked prefill, ragged
    (1, 4, 1, 1, 64, 32, 64, 16, 1),  # stride 1 (every token)
]


@pytest.mark.parametrize("b,hq,hkv,g,nq,q_offset,d,bs,stride", SCORE_CASES)
def test_block_scores_match_reference(b, hq, hkv, g, nq, q_offset, d, bs, stride):
    q, k, _ = make_qkv(b, hq, hkv, nq, d, q_offset, seed=11)
    cfg = ProxyAttnConfig(dense_below_tokens=0, block_size=bs, stride=stride, proxy_groups=g)
    got = tscores.estimate_block_scores(q, k, cfg, q_offset)
    want = ref.estimate_block_scores(q, k, cfg, q_offset)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(got[finite], want[finite], atol=1e-6, rtol=1e-5)


def test_block_scores_float16_close_to_reference():
    q, k, _ = make_qkv(1, 4, 2, 96, 32, 32, seed=2, dtype=torch.float16)
    cfg = ProxyAttnConfig(dense_below_tokens=0, block_size=32, stride=4)
    got = tscores.estimate_block_scores(q, k, cfg, 32)
    want = ref.estimate_block_scores(q, k, cfg, 32)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert rel_err(got[finite], want[finite]) < 5e-3


@pytest.mark.parametrize(
    "budget,row_rule,gamma",
    [("gamma", "fixed", 0.9), ("gamma", "scaled", 0.6), ("gamma+power", "fixed", 0.5)],
)
@pytest.mark.parametrize("q_offset,nq", [(0, 150), (64, 70)])
def test_head_budgets_match_reference(budget, row_rule, gamma, q_offset, nq):
    q, k, _ = make_qkv(1, 4, 2, nq, 32, q_offset, seed=nq)
    # a sharper distribution than randn gives budgets well inside (0, causal blocks)
    q = q * 3
    cfg = ProxyAttnConfig(
        dense_below_tokens=0,
        block_size=16,
        gamma=gamma,
        budget=budget,
        row_rule=row_rule,
        min_budget_tokens=16,
        alpha=0.5,
    )
    got = tbudgets.head_budgets(q, k, cfg, q_offset)
    want = ref.head_budgets(q, k, cfg, q_offset)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_last_block_budgets_span_a_range_and_match():
    """Heads with different attention spread get different budgets, identical to the reference's."""
    q, k, _ = make_qkv(1, 4, 1, 128, 32, 0, seed=4)
    q = q * torch.tensor([0.1, 1.0, 3.0, 6.0])[None, :, None, None]  # flat ... peaked heads
    for gamma in (0.5, 0.8, 0.95, 1.0):
        cfg = ProxyAttnConfig(dense_below_tokens=0, block_size=16, gamma=gamma)
        got = tbudgets.last_block_budgets(q, k, cfg)
        assert torch.equal(got, ref.last_block_budgets(q, k, cfg))
    spread = tbudgets.last_block_budgets(
        q, k, ProxyAttnConfig(dense_below_tokens=0, block_size=16, gamma=0.8)
    )
    assert len(set(spread.flatten().tolist())) > 1


# ----------------------------------------------------------------------------------------------
# The index build (torch ops; exact agreement expected, ties included)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(12))
def test_build_block_mask_matches_reference_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    b = 1 + seed % 2
    g = (1, 2)[seed % 2]
    hq = g * (1 + seed % 3)
    bs = 16
    mq = 1 + int(torch.randint(1, 9, (1,), generator=gen))
    q_offset = bs * int(torch.randint(0, 5, (1,), generator=gen))
    nkb = q_offset // bs + mq
    cfg = ProxyAttnConfig(
        dense_below_tokens=0,
        block_size=bs,
        sink_blocks=int(torch.randint(0, 3, (1,), generator=gen)),
        local_blocks=int(torch.randint(1, 4, (1,), generator=gen)),
        min_budget_tokens=0,
    )
    causal = q_offset // bs + torch.arange(mq) + 1
    # few distinct values: many exact ties, which must break towards the lower block
    scores = torch.randint(0, 4, (b, g, mq, nkb), generator=gen).float() / 4
    scores = scores.masked_fill(torch.arange(nkb)[None, :] >= causal[:, None], float("-inf"))
    budgets = torch.minimum(torch.randint(0, nkb + 1, (b, hq, mq), generator=gen), causal)
    got = tindex.build_block_mask(scores, budgets, cfg, q_offset)
    want = ref.build_block_mask(scores, budgets, cfg, q_offset)
    assert torch.equal(got.block_order, want.block_order)
    assert torch.equal(got.block_counts, want.block_counts)
    assert got.block_order.dtype == torch.int32 and got.block_counts.dtype == torch.int32
    assert (got.block_size, got.q_offset) == (bs, q_offset)


# ----------------------------------------------------------------------------------------------
# Dispatch and the whole forward
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def interpreted_dispatch(monkeypatch):
    """backend='triton' on CPU tensors: the api module finds the interpreted backend."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, BACKEND_NAME, tb)
    return tb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_proxy_attention_triton_matches_torch_backend(interpreted_dispatch, dtype):
    q, k, v = make_qkv(1, 4, 2, 100, 32, 64, seed=9, dtype=dtype)
    q = q * 2
    cfg = ProxyAttnConfig(dense_below_tokens=0, block_size=16, min_budget_tokens=16, gamma=0.8)
    out, stats = kernels.proxy_attention(q, k, v, cfg, q_offset=64, backend="triton", return_stats=True)
    ref_out, ref_stats = kernels.proxy_attention(
        q, k, v, cfg, q_offset=64, backend="torch", return_stats=True
    )
    assert not stats.dense_fallback
    assert stats.index.density() < 1.0  # the test exercises a sparse mask
    assert torch.equal(stats.index.block_counts, ref_stats.index.block_counts)
    assert torch.equal(stats.index.block_order, ref_stats.index.block_order)
    assert out.dtype == dtype
    assert rel_err(out, ref_out) < (1e-5 if dtype == torch.float32 else 3e-3)


def test_auto_backend_on_cpu_uses_the_reference(monkeypatch):
    """Without CUDA tensors, 'auto' never reaches Triton (even when the interpreter is on)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    steps = ("estimate_block_scores", "head_budgets", "build_block_mask", "block_sparse_attention")

    class TrappedTriton(tb.TritonBackend):
        def __getattribute__(self, name):
            if name in steps or name == "dense_attention":
                raise AssertionError(f"the Triton backend was called ({name})")
            return super().__getattribute__(name)

    monkeypatch.setitem(sys.modules, BACKEND_NAME, types.SimpleNamespace(TritonBackend=TrappedTriton))
    q, k, v = make_qkv(1, 2, 1, 40, 16, 0, seed=1)
    cfg = ProxyAttnConfig(dense_below_tokens=0, block_size=16, min_budget_tokens=16)
    out = kernels.proxy_attention(q, k, v, cfg, backend="auto")
    assert torch.allclose(out, kernels.proxy_attention(q, k, v, cfg, backend="torch"))
    with pytest.raises(AssertionError, match="Triton backend was called"):
        kernels.proxy_attention(q, k, v, cfg, backend="triton")  # the trap is live


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_meanpool_estimator_under_the_triton_backend(monkeypatch, dtype):
    """The mean-pool estimator plugs into the Triton backend as into the reference: its scores,
    then the Triton budgets, index and attention."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the backend accept CPU tensors
    q, k, v = make_qkv(1, 4, 2, 80, 32, 48, seed=17, dtype=dtype)
    cfg = ProxyAttnConfig(
        dense_below_tokens=0, block_size=16, min_budget_tokens=16, gamma=0.8, estimator="meanpool"
    )
    chunk = kernels.attention_chunk(q, k, v, cfg, q_offset=48, backend=tb.TritonBackend())
    scores = estimate_block_scores_meanpool(q, k, cfg, 48)
    want_index = tindex.build_block_mask(scores, tbudgets.head_budgets(q, k, cfg, 48), cfg, 48)
    assert torch.equal(chunk.index.block_order, want_index.block_order)
    assert torch.equal(chunk.index.block_counts, want_index.block_counts)
    assert chunk.index.density() < 1.0
    want_out, _ = tattn.block_sparse_attention(q, k, v, want_index, 48)
    assert torch.equal(chunk.out, want_out)


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_index_without_the_diagonal_block(tma):
    """A hand-made index whose rows stop before their diagonal block (no built index does that):
    no causal mask is needed then, and both K/V load paths must still match the reference."""
    b, hq, hkv, nq, d, bs, q_offset = 1, 2, 1, 80, 16, 16, 32
    q, k, v = make_qkv(b, hq, hkv, nq, d, q_offset, seed=13)
    index = BlockSparseIndex.dense(b, hq, 1, nq, q_offset + nq, bs, q_offset)
    # head 0 drops its diagonal block, head 1 keeps only the first block of each row
    index.block_counts[:, 0] -= 1
    index.block_counts[:, 1] = 1
    out, lse = tattn.block_sparse_attention(q, k, v, index, q_offset, tma=tma)
    ref_out, ref_lse = ref.block_sparse_attention(q, k, v, index, q_offset)
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


@pytest.mark.parametrize(
    "b,hq,hkv,g,nq,q_offset,d,bs,tiles",
    [
        (1, 8, 2, 1, 150, 64, 32, 64, (64, 32, 4, 2)),  # 4 heads x 16 rows per program, ragged
        (2, 4, 2, 2, 100, 32, 16, 32, (32, 16, 4, 2)),  # 2 heads x 16 rows, two groups, batch 2
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gqa_packed_attention_matches_reference(b, hq, hkv, g, nq, q_offset, d, bs, tiles, dtype):
    """The variant that stacks a KV head's query heads in one program: heads keep different
    prefixes of the shared list (random per-head budgets), so rows stop at different entries."""
    q, k, v = make_qkv(b, hq, hkv, nq, d, q_offset, seed=21, dtype=dtype)
    index = random_index(b, hq, g, nq, q_offset + nq, bs, q_offset, seed=4)
    assert (index.block_counts != index.block_counts[:, :1]).any()  # heads differ
    out, lse = tattn.block_sparse_attention(q, k, v, index, q_offset, tiles=tiles, gqa_packed=True)
    ref_out, ref_lse = ref.block_sparse_attention(q.float(), k.float(), v.float(), index, q_offset)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref_out) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert (lse - ref_lse).abs().max().item() < (1e-4 if dtype == torch.float32 else 1e-2)
