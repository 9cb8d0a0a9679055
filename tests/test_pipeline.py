"""Sharded (chunked pipeline) prefill over Ray CPU workers equals the single-worker prefill."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")

from _support import save_tiny_llama  # noqa: E402

from proxyprefill.kernels.config import ProxyAttnConfig  # noqa: E402
from proxyprefill.workers.engine import PrefillEngine, PrefillError  # noqa: E402
from proxyprefill.workers.kv_wire import LayerPiece, TokenPiece  # noqa: E402
from proxyprefill.workers.pipeline import ShardedPrefill  # noqa: E402
from proxyprefill.workers.pipeline_stage import PipelineStage  # noqa: E402
from proxyprefill.workers.pipeline_timeline import ChunkRecord, PipelineTimeline  # noqa: E402
from proxyprefill.workers.planner import (  # noqa: E402
    InsufficientResources,
    ModelShape,
    WorkerState,
    balanced_layer_ranges,
    plan_prefill,
)
from proxyprefill.workers.protocol import KVMissing  # noqa: E402
from proxyprefill.workers.stage_model import StageSpec  # noqa: E402

pytestmark = pytest.mark.slow

NUM_LAYERS = 4
PROMPT = 320  # 10 blocks of 32: with a 1-block budget the last rows skip most causal blocks
CHUNK = 64
SPARSE = ProxyAttnConfig(dense_below_tokens=0, block_size=32, stride=4, gamma=0.5, min_budget_tokens=32)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def assert_same_prefill(result, expected, tolerance=1e-5):
    """Logits and every layer's K and V agree to `tolerance` (max abs error / max abs value)."""
    assert result.logit_positions == expected.logit_positions
    assert relative_error(result.logits, expected.logits) <= tolerance
    assert len(result.keys) == len(result.values) == len(expected.keys) == NUM_LAYERS
    for layer in range(NUM_LAYERS):
        assert result.keys[layer].shape == expected.keys[layer].shape
        assert relative_error(result.keys[layer], expected.keys[layer]) <= tolerance, f"keys of layer {layer}"
        assert relative_error(result.values[layer], expected.values[layer]) <= tolerance, (
            f"values of layer {layer}"
        )


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, NUM_LAYERS)
    return str(path)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def engine(model_dir):
    """The single-worker chunked prefill the sharded one must reproduce."""
    return PrefillEngine.from_pretrained(model_dir, attention="proxy", config=SPARSE, device="cpu")


@pytest.fixture(scope="module")
def dense_pipeline(ray_cluster, model_dir):
    # laid out by the planner: a 4-layer model over 2 workers, forced, splits 2/2
    shape = ModelShape.from_config(transformers.AutoConfig.from_pretrained(model_dir), dtype_bytes=4)
    workers = [WorkerState(0, 1 << 30), WorkerState(1, 1 << 30)]
    plan = plan_prefill(PROMPT, shape, workers, chunk_tokens=CHUNK, force_stages=2, headroom_bytes=0)
    pipe = ShardedPrefill.from_plan(model_dir, plan, attention="dense", actor_options={"num_cpus": 0.25})
    assert pipe.layer_ranges == [(0, 2), (2, 4)]
    pipe.wait_ready(timeout_s=180)
    yield pipe
    pipe.shutdown()


@pytest.fixture(scope="module")
def sparse_pipeline(ray_cluster, model_dir):
    pipe = ShardedPrefill(
        model_dir, layer_ranges=[(0, 1), (1, 3), (3, 4)], config=SPARSE, actor_options={"num_cpus": 0.25}
    )
    pipe.wait_ready(timeout_s=180)
    yield pipe
    pipe.shutdown()


@pytest.fixture(scope="module")
def collective_pipeline(ray_cluster, model_dir):
    pipe = ShardedPrefill(
        model_dir, num_stages=3, config=SPARSE, transport="collective", actor_options={"num_cpus": 0.25}
    )
    pipe.wait_ready(timeout_s=180)
    yield pipe
    pipe.shutdown()


def test_stages_read_only_their_share_of_a_tied_checkpoint(tmp_path, tokens):
    # in-process stages (no Ray): tied embeddings, so the last stage needs the embedding as LM head
    cfg = transformers.Qwen2Config(
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    torch.manual_seed(3)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    engine = PrefillEngine.from_pretrained(str(tmp_path), attention="dense", device="cpu")
    expected = engine.prefill(tokens, CHUNK, logits=[PROMPT - 1])
    stages = [
        PipelineStage(StageSpec(str(tmp_path), start, stop, attention="dense"), s, 2)
        for s, (start, stop) in enumerate([(0, 1), (1, 3)])
    ]
    assert [len(stage.layers) for stage in stages] == [1, 2]
    assert stages[0].runner.lm_head is None and stages[1].runner.embed is None
    for stage in stages:
        stage.begin("r", PROMPT)
    for c, q0 in enumerate(range(0, PROMPT, CHUNK)):
        hidden = stages[0].forward("r", c, q0, tokens[q0 : q0 + CHUNK], None)
        logits = stages[1].forward("r", c, q0, hidden, [CHUNK - 1] if q0 + CHUNK == PROMPT else [])
    assert relative_error(logits, expected.logits) <= 1e-5
    for layer in range(3):
        keys, values = stages[0 if layer == 0 else 1].kv("r", layer)
        assert relative_error(keys, expected.keys[layer]) <= 1e-5
        assert relative_error(values, expected.values[layer]) <= 1e-5


def test_constructor_refuses_bad_options_before_starting_workers():
    with pytest.raises(ValueError, match="transport"):
        ShardedPrefill(None, transport="pigeon")
    with pytest.raises(ValueError, match="attention"):
        ShardedPrefill(None, attention="sparse")


def test_balanced_layer_ranges():
    assert balanced_layer_ranges(32, 2) == [(0, 16), (16, 32)]
    assert balanced_layer_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        balanced_layer_ranges(3, 4)


def test_dense_two_stages_match_the_engine_and_the_stock_model(dense_pipeline, engine, model_dir, tokens):
    result = dense_pipeline.prefill(tokens, CHUNK, logits="all")
    assert_same_prefill(result, engine.prefill(tokens, CHUNK, logits="all", attention="dense"))
    assert result.header.num_layers == NUM_LAYERS and result.header.num_tokens == PROMPT
    assert dense_pipeline.held_bytes() == [0, 0]  # gathered, then released
    # and the stock model run on the whole prompt at once agrees too
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        stock = model(tokens[None], use_cache=True)
    assert relative_error(result.logits, stock.logits[0]) <= 1e-5
    for layer in range(NUM_LAYERS):
        assert relative_error(result.keys[layer], stock.past_key_values.layers[layer].keys[0]) <= 1e-5
        assert relative_error(result.values[layer], stock.past_key_values.layers[layer].values[0]) <= 1e-5


def test_proxyattn_three_stages_match_the_engine(sparse_pipeline, engine, tokens):
    result = sparse_pipeline.prefill(tokens, CHUNK, logits="all")
    expected = engine.prefill(tokens, CHUNK, logits="all")
    assert_same_prefill(result, expected)
    assert result.sparsity.shape == expected.sparsity.shape == (NUM_LAYERS, 4)
    assert torch.allclose(result.sparsity, expected.sparsity, atol=1e-6)
    assert result.sparsity.mean() > 0.1  # the sparse path really skipped blocks
    dense = engine.prefill(tokens, CHUNK, logits="all", attention="dense")
    assert relative_error(result.logits, dense.logits) > 1e-3


def test_collective_transport_matches_the_engine(collective_pipeline, engine, tokens):
    # hidden states travel rank to rank through torch.distributed (gloo on the CPU)
    result = collective_pipeline.prefill(tokens, CHUNK, logits="all")
    assert_same_prefill(result, engine.prefill(tokens, CHUNK, logits="all"))
    timeline = result.extra["timeline"]
    # the same bytes as through the object store: token ids, fp32 hidden states twice, logits
    assert timeline.bytes_moved() == PROMPT * 8 + 2 * PROMPT * 64 * 4 + PROMPT * 256 * 4
    assert collective_pipeline.held_bytes() == [0, 0, 0]
    again = collective_pipeline.prefill(tokens, CHUNK, logits="last")  # the group is reused
    assert relative_error(again.logits, result.logits[-1:]) <= 1e-6


def test_fixed_density_matches_the_engine(sparse_pipeline, engine, tokens):
    result = sparse_pipeline.prefill(tokens, CHUNK, logits=[PROMPT - 1, 3], fixed_density=0.25)
    expected = engine.prefill(tokens, CHUNK, logits=[PROMPT - 1, 3], fixed_density=0.25)
    assert_same_prefill(result, expected)


def test_kv_left_on_stages_is_gathered_in_layer_order_then_released(sparse_pipeline, engine, tokens):
    result = sparse_pipeline.prefill(tokens, CHUNK, logits=[5, PROMPT - 1], gather=False)
    assert result.keys == [] and result.logits.shape == (2, 256)
    held = sparse_pipeline.held_bytes()
    per_layer = 2 * 2 * PROMPT * 16 * 4  # keys + values, Hkv=2, d=16, fp32
    assert held == [per_layer * 1, per_layer * 2, per_layer * 1]
    assert result.extra["kv_bytes"] == sum(held)
    rid = result.extra["request_id"]
    gathered = list(sparse_pipeline.gather_kv(rid))
    assert [layer for layer, _, _ in gathered] == list(range(NUM_LAYERS))
    expected = engine.prefill(tokens, CHUNK, logits="none")
    for layer, k, v in gathered:
        assert (
            relative_error(k, expected.keys[layer]) <= 1e-5
            and relative_error(v, expected.values[layer]) <= 1e-5
        )
    assert sparse_pipeline.release(rid) == sum(held)
    assert sparse_pipeline.held_bytes() == [0, 0, 0]


def test_fetch_streams_the_kv_in_layer_order_like_a_pool_worker(sparse_pipeline, engine, tokens):
    result = sparse_pipeline.prefill(tokens, CHUNK, logits="none", gather=False)
    rid = result.extra["request_id"]
    pieces = list(sparse_pipeline.fetch(rid, max_chunk_bytes=4096, include_token_ids=True))
    ids = b"".join(p.data for p in pieces if isinstance(p, TokenPiece))
    assert torch.equal(torch.frombuffer(bytearray(ids), dtype=torch.int64), tokens)
    kv = [p for p in pieces if isinstance(p, LayerPiece)]
    assert [p.layer for p in kv] == sorted(p.layer for p in kv)  # layer order across stages
    assert all(p.keys.nbytes + p.values.nbytes <= 4096 for p in kv)
    expected = engine.prefill(tokens, CHUNK, logits="none")
    for layer in range(NUM_LAYERS):
        parts = [p for p in kv if p.layer == layer]
        assert [(p.start, p.end) for p in parts][0][0] == 0 and parts[-1].end == PROMPT
        keys = torch.cat([torch.from_numpy(p.keys.copy()) for p in parts], dim=1)
        values = torch.cat([torch.from_numpy(p.values.copy()) for p in parts], dim=1)
        assert keys.shape == (2, PROMPT, 16) and parts[0].dtype == "float32"
        assert relative_error(keys, expected.keys[layer]) <= 1e-5
        assert relative_error(values, expected.values[layer]) <= 1e-5
    # a layer range spanning two stages
    middle = [
        p
        for p in sparse_pipeline.fetch(rid, 1 << 20, layer_start=1, layer_end=3)
        if isinstance(p, LayerPiece)
    ]
    assert sorted({p.layer for p in middle}) == [1, 2]
    sparse_pipeline.release(rid)
    assert list(sparse_pipeline.fetch(rid)) == [KVMissing()]
    assert sparse_pipeline.held_bytes() == [0, 0, 0]


def test_logit_positions_keep_the_callers_order(dense_pipeline, engine, tokens):
    positions = [PROMPT - 1, 64, 0, 63, 70]
    result = dense_pipeline.prefill(tokens, CHUNK, logits=positions)
    expected = engine.prefill(tokens, CHUNK, logits=positions, attention="dense")
    assert result.logit_positions == positions
    assert relative_error(result.logits, expected.logits) <= 1e-5


def test_timeline_covers_every_stage_and_chunk(dense_pipeline, tokens):
    result = dense_pipeline.prefill(tokens, CHUNK, logits="last")
    timeline = result.extra["timeline"]
    chunks = PROMPT // CHUNK
    assert sorted((r.stage, r.chunk) for r in timeline.records) == [
        (s, c) for s in range(2) for c in range(chunks)
    ]
    # a stage never starts a chunk before the previous stage finished it
    by_key = {(r.stage, r.chunk): r for r in timeline.records}
    assert all(by_key[1, c].start >= by_key[0, c].end for c in range(chunks))
    # bytes moved: token ids in, fp32 hidden states between the stages, one row of logits out
    assert timeline.bytes_moved() == PROMPT * 8 + PROMPT * 64 * 4 + 256 * 4
    summary = timeline.summary()
    assert 0.0 <= summary["bubble"] <= 1.0 and 0.0 <= summary["overlap"] <= 1.0


def test_timeline_arithmetic():
    # two stages, two chunks, perfectly staggered: stage 1 runs chunk 0 while stage 0 runs chunk 1
    records = [
        ChunkRecord(0, 0, 0.0, 1.0, 0, 10),
        ChunkRecord(0, 1, 1.0, 2.0, 0, 10),
        ChunkRecord(1, 0, 1.0, 2.0, 10, 0),
        ChunkRecord(1, 1, 2.0, 3.0, 10, 4),
    ]
    timeline = PipelineTimeline(records, num_stages=2, num_chunks=2)
    assert timeline.makespan == 3.0
    assert timeline.utilisation() == [2 / 3, 2 / 3]
    assert timeline.bubble() == pytest.approx(1 / 3)
    assert timeline.ideal_bubble() == pytest.approx(1 / 3)
    assert timeline.overlap() == pytest.approx(1 / 3)
    assert timeline.bytes_moved() == 20 + 4


def test_a_request_that_does_not_fit_is_refused_up_front(sparse_pipeline, tokens):
    sparse_pipeline.set_memory_limit(100_000)  # bytes per stage: less than one layer's KV + a chunk
    try:
        with pytest.raises(InsufficientResources, match="320 tokens needs") as refused:
            sparse_pipeline.prefill(tokens, CHUNK)
        assert refused.value.grpc_code == "RESOURCE_EXHAUSTED"
        assert refused.value.needed_bytes > refused.value.available_bytes
        assert sparse_pipeline.held_bytes() == [0, 0, 0]
    finally:
        sparse_pipeline.set_memory_limit(None)
    assert sparse_pipeline.prefill(tokens, CHUNK).logits.shape == (1, 256)


def test_bad_requests_are_refused_before_any_work(sparse_pipeline, tokens):
    with pytest.raises(PrefillError, match="multiple of block_size"):
        sparse_pipeline.prefill(tokens, 48)
    with pytest.raises(PrefillError, match="non-empty"):
        sparse_pipeline.prefill([], CHUNK)
    with pytest.raises(PrefillError, match="outside the prompt"):
        sparse_pipeline.prefill(tokens, CHUNK, logits=[PROMPT])
    with pytest.raises(PrefillError, match="outside the vocabulary"):
        sparse_pipeline.prefill([1, 2, 256], CHUNK)
    assert sparse_pipeline.held_bytes() == [0, 0, 0]


def test_proxyattn_four_stages_one_layer_each_match_the_engine(ray_cluster, model_dir, engine, tokens):
    """Four workers, one layer each (the layout of a 4-GPU run, on CPU): same logits and KV."""
    pipe = ShardedPrefill(model_dir, num_stages=4, config=SPARSE, actor_options={"num_cpus": 0.25})
    try:
        assert pipe.layer_ranges == [(0, 1), (1, 2), (2, 3), (3, 4)]
        pipe.wait_ready(timeout_s=180)
        result = pipe.prefill(tokens, CHUNK, logits="all")
    finally:
        pipe.shutdown()
    expected = engine.prefill(tokens, CHUNK, logits="all")
    assert_same_prefill(result, expected)
    assert torch.allclose(result.sparsity, expected.sparsity, atol=1e-6)
    assert result.sparsity.mean() > 0.1
