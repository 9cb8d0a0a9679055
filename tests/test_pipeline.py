"""Sharded (chunked pipeline) prefill over Ray CPU workers equals the single-worker prefill."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")

from proxyprefill.kernels.config import ProxyAttnConfig  # noqa: E402
from proxyprefill.workers.pipeline import (  # noqa: E402
    ChunkRecord,
    PipelineStage,
    PipelineTimeline,
    ShardedPrefill,
    StageSpec,
    balanced_layer_ranges,
)

pytestmark = pytest.mark.slow

NUM_LAYERS = 4
PROMPT = 320  # 10 blocks of 32: with a 1-block budget the last rows skip most causal blocks
CHUNK = 64
SPARSE = ProxyAttnConfig(block_size=32, stride=4, gamma=0.5, min_budget_tokens=32)


def tiny_llama(path):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=NUM_LAYERS,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(path)
    return str(path)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_reference(model_dir, tokens):
    """The stock model on the whole prompt at once (dense attention): logits and every layer's KV."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(tokens[None], use_cache=True)
    cache = out.past_key_values
    keys = [cache.layers[i].keys[0] for i in range(NUM_LAYERS)]
    values = [cache.layers[i].values[0] for i in range(NUM_LAYERS)]
    return out.logits[0], keys, values


def single_worker(model_dir, tokens, config):
    """All layers in one in-process stage: the unsharded chunked prefill."""
    stage = PipelineStage(StageSpec(model_dir, 0, NUM_LAYERS, config.to_dict() if config else None), 0, 1, 4)
    stage.begin("r", PROMPT, 32)
    logits = [
        stage.forward("r", c, q0, tokens[q0 : q0 + CHUNK], list(range(min(CHUNK, PROMPT - q0))))
        for c, q0 in enumerate(range(0, PROMPT, CHUNK))
    ]
    kv = [stage.kv("r", layer) for layer in range(NUM_LAYERS)]
    return torch.cat(logits), [k for k, _ in kv], [v for _, v in kv]


@pytest.fixture(scope="module")
def dense_pipeline(ray_cluster, model_dir):
    pipe = ShardedPrefill(model_dir, num_stages=2, actor_options={"num_cpus": 0.5})
    pipe.block_size = 32
    pipe.wait_ready()
    yield pipe
    pipe.shutdown()


@pytest.fixture(scope="module")
def sparse_pipeline(ray_cluster, model_dir):
    pipe = ShardedPrefill(
        model_dir, layer_ranges=[(0, 1), (1, 3), (3, 4)], proxy_config=SPARSE, actor_options={"num_cpus": 0.5}
    )
    pipe.wait_ready()
    yield pipe
    pipe.shutdown()


def test_balanced_layer_ranges():
    assert balanced_layer_ranges(32, 2) == [(0, 16), (16, 32)]
    assert balanced_layer_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        balanced_layer_ranges(3, 4)


def test_dense_two_stages_match_the_stock_model(dense_pipeline, tokens, hf_reference):
    logits, keys, values = hf_reference
    result = dense_pipeline.prefill(tokens, CHUNK, logits="all")
    assert result.logit_positions == list(range(PROMPT))
    assert relative_error(result.logits, logits) <= 1e-5
    assert len(result.keys) == len(result.values) == NUM_LAYERS
    for layer in range(NUM_LAYERS):
        assert result.keys[layer].shape == (2, PROMPT, 16)
        assert relative_error(result.keys[layer], keys[layer]) <= 1e-5, (layer, result.timeline.records)
        assert relative_error(result.values[layer], values[layer]) <= 1e-5, layer
    assert dense_pipeline.held_bytes() == [0, 0]  # gathered, then released


def test_proxyattn_three_stages_match_single_worker(sparse_pipeline, model_dir, tokens, hf_reference):
    ref_logits, ref_keys, ref_values = single_worker(model_dir, tokens, SPARSE)
    result = sparse_pipeline.prefill(tokens, CHUNK, logits="all")
    assert relative_error(result.logits, ref_logits) <= 1e-5
    for layer in range(NUM_LAYERS):
        assert relative_error(result.keys[layer], ref_keys[layer]) <= 1e-5
        assert relative_error(result.values[layer], ref_values[layer]) <= 1e-5
    # the sparse path really skipped blocks: its logits are not the dense model's
    assert relative_error(result.logits, hf_reference[0]) > 1e-3


def test_kv_left_on_stages_is_gathered_in_layer_order_then_released(sparse_pipeline, tokens):
    result = sparse_pipeline.prefill(tokens, CHUNK, logits=[5, PROMPT - 1], gather=False)
    assert result.keys == [] and result.logits.shape == (2, 256)
    held = sparse_pipeline.held_bytes()
    per_layer = 2 * 2 * PROMPT * 16 * 4  # keys + values, Hkv=2, d=16, fp32
    assert held == [per_layer * 1, per_layer * 2, per_layer * 1]
    assert result.kv_bytes == sum(held)
    layers = [layer for layer, _, _ in sparse_pipeline.gather_kv(result.request_id)]
    assert layers == list(range(NUM_LAYERS))
    assert sparse_pipeline.release(result.request_id) == sum(held)
    assert sparse_pipeline.held_bytes() == [0, 0, 0]


def test_logit_positions_select_rows(dense_pipeline, tokens, hf_reference):
    result = dense_pipeline.prefill(tokens, CHUNK, logits=[0, 63, 64, PROMPT - 1])
    assert relative_error(result.logits, hf_reference[0][[0, 63, 64, PROMPT - 1]]) <= 1e-5
    last = dense_pipeline.prefill(tokens, CHUNK, logits="last", gather=False)
    dense_pipeline.release(last.request_id)
    assert relative_error(last.logits, hf_reference[0][-1:]) <= 1e-5


def test_timeline_covers_every_stage_and_chunk(dense_pipeline, tokens):
    result = dense_pipeline.prefill(tokens, CHUNK, logits="last")
    timeline = result.timeline
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


def test_bad_requests_are_refused_before_any_work(dense_pipeline, tokens):
    with pytest.raises(ValueError, match="multiple of block_size"):
        dense_pipeline.prefill(tokens, 48)
    with pytest.raises(ValueError, match="empty"):
        dense_pipeline.prefill([], CHUNK)
    with pytest.raises(ValueError, match="logit positions"):
        dense_pipeline.prefill(tokens, CHUNK, logits=[PROMPT])
    assert dense_pipeline.held_bytes() == [0, 0]
