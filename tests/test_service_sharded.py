"""Sharded (pipeline) requests through the service: a real grpc.aio server on loopback serving a tiny
random Llama (fp32, CPU) with one replica and a 2-stage pipeline, all on one local Ray instance.

The sharded route must be invisible to the client except for speed: a forced 2-stage request's
FetchKV stream and logits equal a 1-worker request's; its KV is held on the stages under the
usual handle and freed by ReleaseKV; a request too big for the stages is refused up front with
RESOURCE_EXHAUSTED naming the bytes; a stage killed mid-prefill gives UNAVAILABLE promptly, Ray
restarts it and the next sharded request succeeds.
"""

import re
import time

import grpc
import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")
pytest.importorskip("grpc_health")

from _support import save_tiny_llama, wait_for  # noqa: E402

from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service.client import PrefillClient  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402

pytestmark = pytest.mark.slow

NUM_LAYERS = 4
VOCAB = 256
STAGE_MEMORY = 8 * 1024 * 1024  # per stage: 2 layers x 512 B of KV per token -> ~15k tokens fit
KV_BYTES_PER_TOKEN = NUM_LAYERS * 2 * 2 * 16 * 4  # layers x (K, V) x Hkv x d x fp32
SHARD_ABOVE = 4096


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-service")
    save_tiny_llama(path, NUM_LAYERS, max_position_embeddings=32768)
    return str(path)


@pytest.fixture(scope="module")
def config(model_dir):
    return config_mod.load(
        environ={},
        listen="127.0.0.1:0",
        model=model_dir,
        dtype="float32",
        num_workers=1,
        pipeline_workers=2,
        shard_above_tokens=SHARD_ABOVE,
        pipeline_stage_memory_bytes=STAGE_MEMORY,
        dense_below_tokens=0,
        min_budget_tokens=128,
        min_budget_tokens_floor=128,
    )


@pytest.fixture(scope="module")
def pool(config):
    from proxyprefill.workers.ray_pool import WorkerPool

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = WorkerPool.start(config.engine_kwargs(), **config.pool_kwargs())
    yield pool
    pool.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def service(config, pool):
    service = LocalService(config, pool=pool).start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def client(service):
    with PrefillClient(service.target) as client:
        yield client


def prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def pipeline_stats(pool) -> dict:
    return ray.get(pool.stats(pool.pipeline_index), timeout=120)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def assert_clean(service, client, pool):
    """Serving, nothing pending or reserved, and no KV on the stages or the replica."""
    assert client.health() == "SERVING"
    server = service.server
    assert server.admission.pending_tokens == 0 and server.admission.queue_depth == 0
    assert server.leases.reserved_bytes == 0 and server.leases.held_bytes == 0
    assert pipeline_stats(pool)["kv_bytes"] == 0
    assert ray.get(pool.stats(0), timeout=60)["kv_bytes"] == 0


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.details(), "every error carries a message"
    return caught.value


# ---------------------------------------------------------------------------------------------
def test_model_info_reports_the_sharding_limits(client):
    limits = client.model_info().limits
    assert limits.max_pipeline_stages == 2 and limits.shard_above_tokens == SHARD_ABOVE
    error = status_of(lambda: client.prefill(token_ids=prompt(8), pipeline_stages=3))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details().startswith("pipeline_stages")


def test_forced_two_stages_equal_one_worker_through_fetch_kv(service, client, pool):
    ids = prompt(1024, seed=1)
    # gamma 0.5: the random model's attention is near uniform, so this keeps about half the blocks
    options = dict(token_ids=ids, kv="handle", logits="last", chunk_size=128, gamma=0.5)
    one = client.prefill(pipeline_stages=1, **options)
    two = client.prefill(pipeline_stages=2, **options)
    assert (one.accepted.worker, one.accepted.pipeline_stages) == ("worker-0", 1)
    assert (two.accepted.worker, two.accepted.pipeline_stages) == ("pipeline", 2)
    assert two.handle.worker == "pipeline"

    # last logits, and the sparse path took the same decisions on both routes
    assert two.logit_positions == one.logit_positions == [1023]
    assert relative_error(two.logits, one.logits) <= 1e-5
    assert two.summary.attention_mode == "proxy" and two.summary.sparsity > 0.05
    assert list(two.summary.layer_sparsity) == pytest.approx(list(one.summary.layer_sparsity), abs=1e-6)

    # the stages hold exactly the handle's KV, and the lease accounts for it
    assert two.handle.kv_bytes == one.handle.kv_bytes == 1024 * KV_BYTES_PER_TOKEN
    assert pipeline_stats(pool)["kv_bytes"] == two.handle.kv_bytes
    assert service.server.leases.held_bytes == one.handle.kv_bytes + two.handle.kv_bytes

    # FetchKV: the same header and tensors, streamed from both stages in layer order
    mine = client.fetch_kv(two.handle.handle, max_chunk_bytes=16 * 1024, include_token_ids=True)
    theirs = client.fetch_kv(one.handle.handle, max_chunk_bytes=16 * 1024, include_token_ids=True)
    assert mine.header == theirs.header and mine.header.num_layers == NUM_LAYERS
    assert mine.token_ids.tolist() == ids and mine.bytes_received == theirs.bytes_received
    for layer in range(NUM_LAYERS):
        for a, b in ((mine.keys[layer], theirs.keys[layer]), (mine.values[layer], theirs.values[layer])):
            assert a.shape == b.shape == (2, 1024, 16) and a.dtype == b.dtype == torch.float32
            assert relative_error(a, b) <= 1e-5, f"layer {layer}"
    # the same computation in the same order: measured bit-equal here (not promised in general)
    assert all(torch.equal(a, b) for a, b in zip(mine.keys + mine.values, theirs.keys + theirs.values))
    # a layer range across the stage boundary
    middle = client.fetch_kv(two.handle.handle, layer_start=1, layer_end=3)
    assert len(middle.keys) == 2 and torch.equal(middle.values[1], theirs.values[2])

    # release frees the stages' memory
    assert client.release(two.handle.handle).released_bytes == two.handle.kv_bytes
    assert pipeline_stats(pool)["kv_bytes"] == 0
    assert status_of(lambda: client.fetch_kv(two.handle.handle)).code() == grpc.StatusCode.NOT_FOUND
    client.release(one.handle.handle)
    assert_clean(service, client, pool)


def test_planner_shards_long_prompts_and_refuses_what_fits_nowhere(service, client, pool):
    short = client.prefill(token_ids=prompt(SHARD_ABOVE), kv="none", chunk_size=128)
    assert (short.accepted.worker, short.accepted.pipeline_stages) == ("worker-0", 1)
    long = client.prefill(token_ids=prompt(SHARD_ABOVE + 1024), kv="none", chunk_size=128, logits="last")
    assert (long.accepted.worker, long.accepted.pipeline_stages) == ("pipeline", 2)
    assert long.summary.num_tokens == SHARD_ABOVE + 1024 and long.logits.shape == (1, VOCAB)

    before = pipeline_stats(pool)
    too_long = 20000  # 2.5 MiB of KV... per layer: 10 MiB per stage, over the 8 MiB cap
    for stages in (2, 0):  # forced, and left to the planner
        started = time.monotonic()
        error = status_of(
            lambda stages=stages: client.prefill(token_ids=prompt(too_long), pipeline_stages=stages)
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        needed = int(re.search(r"needs (\d+) bytes", error.details()).group(1))
        assert needed > too_long * KV_BYTES_PER_TOKEN // 2 > STAGE_MEMORY
        assert f"{too_long} tokens" in error.details()
        assert time.monotonic() - started < 30
    after = pipeline_stats(pool)  # refused before any work
    assert {k: after[k] for k in after if k.startswith("prefills_")} == {
        k: before[k] for k in before if k.startswith("prefills_")
    }
    assert_clean(service, client, pool)


def test_client_cancel_stops_a_sharded_prefill_and_frees_its_stages(service, client, pool):
    before = pipeline_stats(pool)
    request = client.request(token_ids=prompt(12288, seed=5), kv="handle", chunk_size=128, pipeline_stages=2)
    call = client.prefill_events(request, timeout=300)
    for event in call:
        if event.WhichOneof("event") == "progress":
            call.cancel()
            break
    assert call.code() == grpc.StatusCode.CANCELLED
    assert wait_for(
        lambda: pipeline_stats(pool)["prefills_cancelled"] == before["prefills_cancelled"] + 1, seconds=30
    )
    assert pipeline_stats(pool)["prefills_result"] == before["prefills_result"]
    assert wait_for(lambda: service.server.admission.pending_tokens == 0, seconds=30)
    assert_clean(service, client, pool)


def test_stage_killed_mid_prefill_answers_unavailable_and_the_pipeline_recovers(service, client, pool):
    """Runs last in this module: it kills a stage actor, which Ray restarts."""
    stages = ray.get(pool.stage_actors(2), timeout=60)
    pids = ray.get([stage.ping.remote() for stage in stages], timeout=60)
    request = client.request(token_ids=prompt(12288, seed=3), kv="handle", chunk_size=128, pipeline_stages=2)
    call = client.prefill_events(request, timeout=300)
    started = time.monotonic()
    events = iter(call)
    assert next(events).accepted.pipeline_stages == 2
    first = next(events)
    assert first.WhichOneof("event") == "progress" and first.progress.tokens_done < 12288
    ray.kill(stages[1], no_restart=False)
    error = status_of(lambda: list(events))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "stage" in error.details()
    assert time.monotonic() - started < 60  # noticed at once, not at the request deadline

    # the server stays healthy; Ray restarts the stage; the survivor kept nothing
    assert client.health() == "SERVING"
    deadline = time.monotonic() + 120
    while True:
        try:
            new_pids = ray.get([stage.ping.remote() for stage in stages], timeout=10)
            break
        except ray.exceptions.RayError:
            assert time.monotonic() < deadline, "the killed stage did not come back"
            time.sleep(0.5)
    assert new_pids[1] != pids[1] and new_pids[0] == pids[0]
    assert pipeline_stats(pool)["kv_bytes"] == 0
    assert pipeline_stats(pool)["prefills_error"] >= 1

    # back to full strength: a sharded request works and matches one worker
    ids = prompt(512, seed=4)
    again = client.prefill(token_ids=ids, kv="none", logits="last", chunk_size=128, pipeline_stages=2)
    single = client.prefill(token_ids=ids, kv="none", logits="last", chunk_size=128, pipeline_stages=1)
    assert again.accepted.worker == "pipeline"
    assert relative_error(again.logits, single.logits) <= 1e-5
    assert_clean(service, client, pool)
