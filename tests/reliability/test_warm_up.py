"""Start-up warm-up: the engine's warm-up runs the configured chunk shapes, and the server reports
SERVING only once every worker has warmed up (the real server and worker code, an in-process
pool instead of Ray, the tiny random Llama on the CPU)."""

import threading

import pytest

pytest.importorskip("grpc_health")

from _support import save_tiny_llama, wait_for  # noqa: E402

from proxyprefill.kernels.config import ProxyAttnConfig  # noqa: E402
from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service.client import PrefillClient  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402
from proxyprefill.workers.engine import WARM_UP_TAIL, PrefillEngine  # noqa: E402
from proxyprefill.workers.prefill_worker import WarmUpPlan  # noqa: E402

from .inprocess import InProcessPool  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, 2)
    return str(path)


def test_engine_warm_up_runs_a_dense_a_sparse_and_a_ragged_chunk(model_dir):
    config = ProxyAttnConfig(block_size=16, dense_below_tokens=64, min_budget_tokens=0, gamma=0.5)
    engine = PrefillEngine.from_pretrained(model_dir, attention="proxy", config=config, device="cpu")
    chunks = []
    messages = []
    original = engine.prefill

    def recording_prefill(ids, chunk_size, **options):
        result = original(ids, chunk_size=chunk_size, **options)
        chunks.append((len(ids), chunk_size, float(result.sparsity.mean())))
        return result

    engine.prefill = recording_prefill
    report = engine.warm_up(chunk_size=32, max_tokens=1000, progress=messages.append)
    # dense_below 64 with chunks of 32: two dense chunks, then sparse ones, the last one ragged
    assert len(chunks) == 1 and chunks[0][:2] == (4 * 32 + WARM_UP_TAIL, 32)
    assert chunks[0][2] > 0  # the sparse path ran
    assert report.prompt_tokens == 4 * 32 + WARM_UP_TAIL and report.chunk_size == 32
    assert report.key_lengths == ()  # the torch backend on the CPU compiles nothing
    assert report.seconds > 0 and messages[-1].startswith("warm-up done")
    # the prompt is capped by max_tokens
    assert engine.warm_up(chunk_size=32, max_tokens=100).prompt_tokens == 100


def test_warm_up_plan_follows_the_config():
    config = config_mod.load(
        environ={}, listen="127.0.0.1:0", default_chunk_size=4096, max_prompt_tokens=1000
    )
    assert config.pool_kwargs()["warm_up"] == WarmUpPlan("auto", 4096, 1000)
    assert WarmUpPlan("auto").wanted("cuda") and not WarmUpPlan("auto").wanted("cpu")
    assert WarmUpPlan("on").wanted("cpu") and not WarmUpPlan("off").wanted("cuda")
    with pytest.raises(config_mod.ConfigError, match="warm_up"):
        config_mod.load(environ={}, listen="127.0.0.1:0", warm_up="sometimes")


def test_health_turns_serving_only_after_the_warm_up(model_dir, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    original = PrefillEngine.warm_up

    def held_warm_up(self, *args, **kwargs):
        started.set()
        assert gate.wait(60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrefillEngine, "warm_up", held_warm_up)
    config = config_mod.load(
        environ={}, listen="127.0.0.1:0", model=model_dir, attention="dense", num_workers=1, warm_up="on",
        default_chunk_size=128,
    )  # fmt: skip
    pool = InProcessPool(config.engine_kwargs(), warm_up=config.pool_kwargs()["warm_up"])
    with LocalService(config, pool=pool) as service, PrefillClient(service.target) as client:
        assert started.wait(30)
        assert client.health() == "NOT_SERVING"
        assert not pool.workers[0].stats()["warmed_up"]
        gate.set()
        assert wait_for(lambda: client.health() == "SERVING", 30)
        stats = pool.workers[0].stats()
        assert stats["warmed_up"] and stats["warm_up_seconds"] > 0 and stats["warm_up_error"] == ""
