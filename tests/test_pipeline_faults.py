"""A pipeline stage that dies mid-prefill: the request fails fast (or retries once), no KV is left
behind on the surviving stages, Ray restarts the dead one and the pipeline works again."""

from __future__ import annotations

import time

import pytest
import torch

ray = pytest.importorskip("ray")
transformers = pytest.importorskip("transformers")

from _support import save_tiny_llama  # noqa: E402

from proxyprefill.workers.engine import PrefillEngine  # noqa: E402
from proxyprefill.workers.pipeline import ShardedPrefill, StageUnavailableError  # noqa: E402

pytestmark = pytest.mark.slow

PROMPT = 512
CHUNK = 32  # 16 chunks, so a kill after the first one lands while the others are in flight


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-faults")
    save_tiny_llama(path, num_layers=3)
    return str(path)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (PROMPT,), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def expected(model_dir, tokens):
    engine = PrefillEngine.from_pretrained(model_dir, attention="dense", device="cpu")
    return engine.prefill(tokens, CHUNK, logits="last")


@pytest.fixture(scope="module")
def pipe(ray_cluster, model_dir):
    pipeline = ShardedPrefill(model_dir, num_stages=3, attention="dense", actor_options={"num_cpus": 0.5})
    pipeline.wait_ready(timeout_s=180)
    yield pipeline
    pipeline.shutdown()


def held_per_stage(pipeline) -> list[int]:
    return [ray.get(stage.held_bytes.remote(), timeout=60) for stage in pipeline.stages]


def assert_matches(result, expected):
    scale = expected.logits.abs().max()
    assert ((result.logits - expected.logits).abs().max() / scale) <= 1e-5
    for k, k_ref in zip(result.keys, expected.keys, strict=True):
        assert ((k - k_ref).abs().max() / k_ref.abs().max()) <= 1e-5


@pytest.mark.timeout(300)
def test_killed_stage_fails_the_request_frees_kv_and_comes_back(pipe, tokens, expected):
    pids = pipe.wait_ready()
    victim = 1

    def kill_mid_prefill(chunk: int) -> None:
        if chunk == 0:
            ray.kill(pipe.stages[victim], no_restart=False)

    started = time.monotonic()
    with pytest.raises(StageUnavailableError) as failure:
        pipe.prefill(tokens, CHUNK, logits="last", timeout_s=120, on_chunk_done=kill_mid_prefill)
    assert time.monotonic() - started < 60  # detected promptly, not by the deadline
    assert "died" in str(failure.value) or "failed" in str(failure.value)

    new_pids = pipe.wait_restarted(timeout_s=120)
    assert new_pids[victim] != pids[victim]  # Ray restarted the killed actor
    assert [new_pids[s] for s in (0, 2)] == [pids[0], pids[2]]  # the others survived...
    assert held_per_stage(pipe) == [0, 0, 0]  # ...and kept no KV of the failed request
    # back to full strength: the same request now succeeds and is right
    assert_matches(pipe.prefill(tokens, CHUNK, logits="last"), expected)
    assert held_per_stage(pipe) == [0, 0, 0]


@pytest.mark.timeout(300)
def test_retry_once_runs_the_request_again_after_the_restart(pipe, tokens, expected):
    pids = pipe.wait_ready()
    kills = []

    def kill_first_attempt(chunk: int) -> None:
        if chunk == 2 and not kills:
            kills.append(chunk)
            ray.kill(pipe.stages[0], no_restart=False)

    result = pipe.prefill(
        tokens, CHUNK, logits="last", retry=True, timeout_s=120, on_chunk_done=kill_first_attempt
    )
    assert kills == [2] and result.extra["attempts"] == 2
    assert pipe.wait_ready()[0] != pids[0]
    assert_matches(result, expected)
    assert held_per_stage(pipe) == [0, 0, 0]


@pytest.mark.timeout(300)
def test_a_failing_stage_task_is_unavailable_and_releases_everything(pipe, tokens):
    # a stage losing the request mid-way (as after an out-of-memory error) fails its next chunk
    request_id = "lost-on-stage-2"

    def drop_kv_on_last_stage(chunk: int) -> None:
        if chunk == 0:
            ray.get(pipe.stages[2].release.remote(request_id), timeout=60)

    with pytest.raises(StageUnavailableError, match="failed"):
        pipe.prefill(tokens, CHUNK, request_id=request_id, window=2, on_chunk_done=drop_kv_on_last_stage)
    assert held_per_stage(pipe) == [0, 0, 0]


@pytest.mark.timeout(300)
def test_the_deadline_bounds_the_wait(pipe, tokens):
    started = time.monotonic()
    with pytest.raises(StageUnavailableError, match="deadline"):
        pipe.prefill(tokens, CHUNK, timeout_s=0.001)
    assert time.monotonic() - started < 60
    assert held_per_stage(pipe) == [0, 0, 0]


@pytest.mark.timeout(300)
def test_collective_transport_recovers_from_a_killed_stage(ray_cluster, model_dir, tokens, expected):
    # with send/recv between ranks a survivor may wait on the dead peer: every stage is restarted
    # (their KV goes with their processes) and a fresh group is formed for the next request
    pipe = ShardedPrefill(
        model_dir, num_stages=3, attention="dense", transport="collective", actor_options={"num_cpus": 0.25}
    )
    try:
        assert_matches(pipe.prefill(tokens, CHUNK, logits="last"), expected)
        pids = pipe.wait_ready()

        def kill_middle(chunk: int) -> None:
            if chunk == 0:
                ray.kill(pipe.stages[1], no_restart=False)

        started = time.monotonic()
        with pytest.raises(StageUnavailableError):
            pipe.prefill(tokens, CHUNK, logits="last", timeout_s=120, on_chunk_done=kill_middle)
        assert time.monotonic() - started < 60  # well before the group's 120 s timeout
        new_pids = pipe.wait_restarted(timeout_s=120)
        assert all(new != old for new, old in zip(new_pids, pids))
        assert held_per_stage(pipe) == [0, 0, 0]
        assert_matches(pipe.prefill(tokens, CHUNK, logits="last"), expected)
    finally:
        pipe.shutdown()
