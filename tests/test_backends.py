"""The attention-backend registry, the capability choice, and the one chunk function."""

from __future__ import annotations

import importlib.util
import types

import pytest
import torch

from proxyprefill.kernels import (
    ProxyAttnConfig,
    api,
    attention_chunk,
    chunk,
    reference,
    registry,
    select_backend,
)
from proxyprefill.kernels.reference import ReferenceBackend

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs the triton package")


def fake_tensor(device: str, dtype: torch.dtype, head_dim: int):
    """What select_backend reads of a tensor, for devices this machine may not have."""
    return types.SimpleNamespace(device=torch.device(device), dtype=dtype, shape=(1, 4, 128, head_dim))


def make_qkv(nq=64, q_offset=32, hq=4, hkv=2, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, nq, d, generator=gen)
    k = torch.randn(1, hkv, q_offset + nq, d, generator=gen)
    v = torch.randn(1, hkv, q_offset + nq, d, generator=gen)
    return q, k, v


def test_auto_on_cpu_and_by_name():
    q, _, _ = make_qkv()
    assert isinstance(select_backend("auto", q), ReferenceBackend)
    assert select_backend("torch", q).name == "torch"
    assert api.BACKENDS == ("auto", "triton", "torch")


def test_unknown_backend_and_estimator_names_are_refused():
    q, k, v = make_qkv()
    with pytest.raises(
        ValueError, match=r"backend must be one of \('auto', 'triton', 'torch'\), got 'tritonn'"
    ):
        api.proxy_attention(q, k, v, ProxyAttnConfig(block_size=16), q_offset=32, backend="tritonn")
    with pytest.raises(ValueError, match="estimator must be one of"):
        ProxyAttnConfig(estimator="meanpol")


@needs_triton
def test_auto_picks_triton_where_it_runs_natively(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # emulation is for named backends only
    assert select_backend("auto", fake_tensor("cuda", torch.bfloat16, 128)).name == "triton"
    # a head dim the kernels cannot tile falls back to the reference instead of failing later
    assert select_backend("auto", fake_tensor("cuda", torch.bfloat16, 80)).name == "torch"
    assert select_backend("auto", fake_tensor("cpu", torch.float32, 64)).name == "torch"


@needs_triton
def test_named_triton_says_why_it_cannot_run(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        select_backend("triton", fake_tensor("cpu", torch.float32, 64))
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16, got 80"):
        select_backend("triton", fake_tensor("cuda", torch.float16, 80))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("triton", fake_tensor("cpu", torch.float16, 64)).name == "triton"
    with pytest.raises(ValueError, match="float32/float16 only"):
        select_backend("triton", fake_tensor("cpu", torch.bfloat16, 64))


class RecordingBackend(ReferenceBackend):
    """A new backend: the reference's steps, each call recorded (what one registry line adds)."""

    name = "recording"
    calls: list[str] = []

    def estimate_block_scores(self, *args):
        self.calls.append("scores")
        return super().estimate_block_scores(*args)

    def head_budgets(self, *args):
        self.calls.append("budgets")
        return super().head_budgets(*args)

    def build_block_mask(self, *args):
        self.calls.append("index")
        return super().build_block_mask(*args)

    def block_sparse_attention(self, *args):
        self.calls.append("attention")
        return super().block_sparse_attention(*args)

    def dense_attention(self, *args):
        self.calls.append("dense")
        return super().dense_attention(*args)


def test_a_registered_backend_runs_the_chunk_with_one_check(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "recording", f"{__name__}:RecordingBackend")
    RecordingBackend.calls = []
    checks = []
    monkeypatch.setattr(chunk, "check_qkv", lambda *args: checks.append(args))
    q, k, v = make_qkv(seed=3)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, min_budget_tokens=16, gamma=0.7)
    result = attention_chunk(q, k, v, config, q_offset=32, backend="recording")
    assert RecordingBackend.calls == ["scores", "budgets", "index", "attention"]
    assert len(checks) == 1  # the chunk is checked once, the steps are not re-checked
    assert not result.dense_fallback and result.index.density() < 1.0
    want = reference.block_sparse_attention(q, k, v, result.index, 32)[0]
    assert torch.equal(result.out, want)

    RecordingBackend.calls = []
    dense = attention_chunk(q, k, v, config.replace(dense_below_tokens=96), q_offset=32, backend="recording")
    assert RecordingBackend.calls == ["dense"] and dense.dense_fallback and dense.index is None


def test_budget_override_and_estimated_hook():
    q, k, v = make_qkv(seed=5)
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=16, min_budget_tokens=0, sink_blocks=0)
    seen = []

    def keep_one_block(budgets, q_offset, cfg):
        seen.append((tuple(budgets.shape), q_offset, cfg.block_size))
        return torch.ones_like(budgets)

    marks = []
    result = attention_chunk(
        q,
        k,
        v,
        config,
        32,
        backend="torch",
        budget_override=keep_one_block,
        on_estimated=lambda: marks.append(1),
    )
    assert seen == [((1, 4, 4), 32, 16)] and marks == [1]
    # one budget block plus the forced diagonal (which it may be): one or two blocks per row
    assert result.index.block_counts.min() >= 1 and result.index.block_counts.max() <= 2


def test_a_backend_whose_library_is_missing_is_skipped_by_auto(monkeypatch):
    monkeypatch.setattr(
        registry, "BACKENDS", {"missing": "proxyprefill_no_such_module:Backend", **registry.BACKENDS}
    )
    monkeypatch.setattr(registry, "_MISSING", {})
    q, _, _ = make_qkv()
    assert select_backend("auto", q).name == "torch"
    assert not registry.backend_available("missing")
    with pytest.raises(ImportError, match="proxyprefill_no_such_module"):
        select_backend("missing", q)
    assert "missing" in registry._MISSING  # not retried on every call
