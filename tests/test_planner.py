"""The sharding planner: stage counts, layer splits, worker choice and up-front refusals."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxyprefill.workers.planner import (
    GIB,
    InsufficientResources,
    ModelShape,
    WorkerState,
    balanced_layer_ranges,
    plan_prefill,
    stage_bytes,
)

LLAMA_8B = ModelShape(32, 4096, 14336, 32, 8, 128, 128256)
LLAMA_1B = ModelShape(16, 2048, 8192, 32, 8, 64, 128256, tied_embeddings=True)
H200 = 139 * GIB
M = 1 << 20


def test_shape_arithmetic_matches_the_published_models():
    # Llama-3.1-8B: ~8.0e9 parameters, KV 128 KiB per token in bf16 (128 GiB at 1M tokens)
    assert LLAMA_8B.param_bytes / 2 == pytest.approx(8.03e9, rel=0.01)
    assert LLAMA_8B.kv_bytes(1) == 128 * 1024
    assert LLAMA_8B.kv_bytes(M) == 128 * GIB
    # Llama-3.2-1B: ~1.24e9 parameters (tied embeddings), KV 32 GiB at 1M tokens
    assert LLAMA_1B.param_bytes / 2 == pytest.approx(1.24e9, rel=0.01)
    assert LLAMA_1B.kv_bytes(M) == 32 * GIB


def test_from_config_reads_a_transformers_config():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        num_hidden_layers=16,
        hidden_size=2048,
        intermediate_size=8192,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    )
    assert ModelShape.from_config(cfg) == LLAMA_1B


def test_a_short_prompt_takes_one_stage_on_the_least_loaded_worker():
    workers = [WorkerState("a", H200, pending_tokens=50_000), WorkerState("b", H200, pending_tokens=10)]
    plan = plan_prefill(8192, LLAMA_8B, workers)
    assert plan.num_stages == 1 and plan.worker_ids == ["b"] and plan.layer_ranges == [(0, 32)]


def test_a_million_tokens_of_8b_needs_two_h200s_and_is_refused_on_one():
    plan = plan_prefill(M, LLAMA_8B, [WorkerState(0, H200), WorkerState(1, H200)])
    assert plan.layer_ranges == [(0, 16), (16, 32)]
    assert sorted(plan.worker_ids) == [0, 1]
    assert all(stage.needed_bytes <= stage.free_bytes - 2 * GIB for stage in plan.stages)
    assert all(stage.needed_bytes > 64 * GIB for stage in plan.stages)  # half the KV each
    with pytest.raises(InsufficientResources) as refused:
        plan_prefill(M, LLAMA_8B, [WorkerState(0, H200)])
    assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert refused.value.needed_bytes > refused.value.available_bytes
    assert refused.value.needed_bytes >= 128 * GIB + LLAMA_8B.param_bytes
    assert "1048576 tokens" in str(refused.value) and "GiB" in str(refused.value)


def test_memory_forces_more_stages_even_for_a_short_threshold():
    # 1B at 1M tokens (32 GiB of KV) fits one H200 but not one 32 GiB card: 2 of those are needed
    small = [WorkerState(i, 32 * GIB) for i in range(3)]
    plan = plan_prefill(M, LLAMA_1B, small, shard_above_tokens=10 * M)
    assert plan.num_stages == 2 and plan.reason.startswith("memory")
    assert plan_prefill(M, LLAMA_1B, [WorkerState(0, H200)]).num_stages == 1


def test_long_prompts_spread_over_idle_workers_only():
    idle = [WorkerState(i, H200) for i in range(4)]
    assert plan_prefill(131072, LLAMA_8B, idle).num_stages == 4
    busy = [WorkerState(0, H200), WorkerState(1, H200, pending_tokens=100_000), WorkerState(2, H200)]
    plan = plan_prefill(131072, LLAMA_8B, busy)
    assert plan.num_stages == 2 and sorted(plan.worker_ids) == [0, 2]
    # few chunks: more stages than chunks / 4 would mostly idle
    assert plan_prefill(65536, LLAMA_8B, idle, chunk_tokens=16384).num_stages == 1


def test_forced_stage_counts():
    workers = [WorkerState(i, H200) for i in range(3)]
    assert plan_prefill(4096, LLAMA_8B, workers, force_stages=3).layer_ranges == [(0, 11), (11, 22), (22, 32)]
    with pytest.raises(ValueError, match="1..3"):
        plan_prefill(4096, LLAMA_8B, workers, force_stages=4)
    with pytest.raises(InsufficientResources):
        plan_prefill(M, LLAMA_8B, workers, force_stages=1)


def test_resident_weights_are_not_counted_twice():
    need = stage_bytes(LLAMA_8B, (0, 32), 1, 0, 65536, 8192)
    resident = stage_bytes(LLAMA_8B, (0, 32), 1, 0, 65536, 8192, weights_resident=True)
    assert need - resident == LLAMA_8B.param_bytes


def test_no_workers_is_a_refusal():
    with pytest.raises(InsufficientResources):
        plan_prefill(10, LLAMA_8B, [])


@settings(max_examples=60, deadline=None)
@given(
    layers=st.integers(1, 12),
    tokens=st.integers(1, 1 << 22),
    free=st.lists(st.integers(0, 200), min_size=1, max_size=5),
    pending=st.lists(st.integers(0, 3), min_size=5, max_size=5),
)
def test_plans_fit_and_refusals_are_honest(layers, tokens, free, pending):
    shape = ModelShape(layers, 1024, 4096, 16, 4, 64, 32000)
    workers = [WorkerState(i, f * GIB // 4, pending[i]) for i, f in enumerate(free)]
    try:
        plan = plan_prefill(tokens, shape, workers, chunk_tokens=4096, headroom_bytes=0)
    except InsufficientResources as refused:
        # even the finest split over the largest workers does not fit
        count = min(len(workers), layers)
        ranges = balanced_layer_ranges(layers, count)
        needs = sorted(
            (stage_bytes(shape, r, count, i, tokens, 4096) for i, r in enumerate(ranges)), reverse=True
        )
        capacity = sorted((w.free_bytes for w in workers), reverse=True)[:count]
        assert any(n > c for n, c in zip(needs, capacity))
        assert refused.needed_bytes == sum(needs)
        return
    starts = [a for a, _ in plan.layer_ranges]
    stops = [b for _, b in plan.layer_ranges]
    assert starts[0] == 0 and stops[-1] == layers and starts[1:] == stops[:-1]
    assert len(set(plan.worker_ids)) == plan.num_stages
    by_id = {w.worker_id: w for w in workers}
    for stage in plan.stages:
        assert stage.needed_bytes <= by_id[stage.worker_id].free_bytes
