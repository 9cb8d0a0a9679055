"""The worker / pool / lease lifecycle under cancellation, races and lost workers: the real server
(grpc.aio on loopback) and real worker code (PrefillWorker, the tiny random Llama) joined by an
in-process pool (inprocess.py) instead of Ray, so that a test controls when a worker stops."""

import threading
import time

import grpc
import pytest

pytest.importorskip("grpc_health")

from _support import save_tiny_llama, wait_for  # noqa: E402

from proxyprefill.protos import prefill_pb2 as pb  # noqa: E402
from proxyprefill.service import config as config_mod  # noqa: E402
from proxyprefill.service.admission import Admission, AdmissionError  # noqa: E402
from proxyprefill.service.client import PrefillClient  # noqa: E402
from proxyprefill.service.leases import LeaseTable  # noqa: E402
from proxyprefill.service.local import LocalService  # noqa: E402
from proxyprefill.workers.engine import PrefillCancelled, PrefillEngine  # noqa: E402
from proxyprefill.workers.protocol import PrefillDone, PrefillOptions  # noqa: E402
from proxyprefill.workers.streaming import PREFILL_THREADS  # noqa: E402

from .inprocess import InProcessPool  # noqa: E402

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, NUM_LAYERS)
    return str(path)


def _config(model_dir, **overrides):
    values = dict(listen="127.0.0.1:0", model=model_dir, attention="dense", num_workers=1)
    values.update(overrides)
    return config_mod.load(environ={}, **values)


@pytest.fixture
def served(model_dir):
    config = _config(model_dir)
    pool = InProcessPool(config.engine_kwargs())
    with LocalService(config, pool=pool) as service, PrefillClient(service.target) as client:
        yield service.server, pool, client


def prompt(num_tokens: int) -> list[int]:
    return [(i * 37) % 250 + 3 for i in range(num_tokens)]


def status_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_stop_is_seen_between_layers_inside_one_chunk(model_dir):
    engine = PrefillEngine.from_pretrained(model_dir, attention="dense", device="cpu")
    layers_run = []
    for index, layer in enumerate(engine.runner.layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: layers_run.append(index))
    with pytest.raises(PrefillCancelled):  # one chunk covers the prompt: no check between chunks
        engine.prefill(prompt(300), chunk_size=8192, should_stop=lambda: len(layers_run) >= 2)
    assert layers_run == [0, 1]


def test_a_missed_deadline_holds_slot_and_tokens_until_the_worker_has_stopped(served):
    server, pool, client = served
    worker = pool.workers[0]
    inside, gate = threading.Event(), threading.Event()

    def hold_in_layer(module, args):
        inside.set()
        gate.wait(30)

    hook = worker.engine.runner.layers[1].register_forward_pre_hook(hold_in_layer)
    try:
        error = status_of(lambda: client.prefill(token_ids=prompt(600), kv="handle", timeout=0.5))
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert inside.is_set()
        time.sleep(0.3)  # the worker is still inside the chunk: nothing may be given back yet
        assert worker.stats()["running"] == 1
        assert server.admission.running == 1 and server.admission.pending_tokens == 600
    finally:
        gate.set()
        hook.remove()
    assert wait_for(lambda: server.admission.pending_tokens == 0 and server.admission.running == 0, 10)
    stats = worker.stats()
    assert stats["running"] == 0 and stats["handles"] == 0 and stats["prefills_result"] == 0
    assert client.prefill(token_ids=prompt(50), kv="none").summary.num_tokens == 50


def test_cancel_after_the_worker_kept_the_kv_frees_it(served):
    server, pool, client = served
    worker = pool.workers[0]
    kept, gate = threading.Event(), threading.Event()
    finish = worker._finish

    def finish_then_wait(*args):  # the KV is stored; its result item has not reached the server
        item = finish(*args)
        kept.set()
        gate.wait(30)
        return item

    worker._finish = finish_then_wait
    call = client.prefill_events(client.request(token_ids=prompt(300), kv="handle"))
    next(iter(call))  # accepted
    assert kept.wait(30) and worker.stats()["handles"] == 1
    call.cancel()
    time.sleep(0.2)
    gate.set()
    assert wait_for(lambda: worker.stats()["handles"] == 0 and server.admission.running == 0, 10)
    assert len(server.leases) == 0 and server.leases.held_bytes == 0 and server.leases.reserved_bytes == 0


def test_a_stop_without_grace_still_frees_the_kv_of_cancelled_prefills(model_dir):
    config = _config(model_dir)
    pool = InProcessPool(config.engine_kwargs())
    worker = pool.workers[0]
    kept, gate = threading.Event(), threading.Event()
    finish = worker._finish

    def finish_then_wait(*args):  # the KV is stored; its result item has not reached the server
        item = finish(*args)
        kept.set()
        gate.wait(30)
        return item

    worker._finish = finish_then_wait
    service = LocalService(config, pool=pool).start()
    with PrefillClient(service.target) as client:
        call = client.prefill_events(client.request(token_ids=prompt(300), kv="handle"))
        next(iter(call))
        assert kept.wait(30)
        threading.Timer(0.5, gate.set).start()
        service.stop(grace=0)  # the front end goes away with the prefill in flight
    assert wait_for(lambda: worker.stats()["handles"] == 0, 10)
    assert worker.stats()["running"] == 0


def test_release_during_a_fetch_lets_the_fetch_finish_then_frees(served):
    server, pool, client = served
    worker = pool.workers[0]
    outcome = client.prefill(token_ids=prompt(1000), kv="handle")
    handle, kv_bytes = outcome.handle.handle, outcome.handle.kv_bytes
    stream = client.stub.FetchKV(pb.FetchKVRequest(handle=handle, max_chunk_bytes=1024))
    chunks = [next(stream)]
    released = {}
    releaser = threading.Thread(target=lambda: released.update(response=client.release(handle)))
    releaser.start()
    time.sleep(0.5)  # the release is under way while the fetch is stalled on its reader
    chunks += list(stream)
    releaser.join(30)
    assert sum(len(c.keys) + len(c.values) for c in chunks) == kv_bytes
    assert released["response"].released_bytes == kv_bytes
    assert worker.stats()["handles"] == 0 and worker.stats()["fetching"] == 0
    assert status_of(lambda: client.fetch_kv(handle)).code() == grpc.StatusCode.NOT_FOUND


def test_an_abandoned_fetch_stops_on_the_worker(served):
    server, pool, client = served
    worker = pool.workers[0]
    outcome = client.prefill(token_ids=prompt(1000), kv="handle")
    stream = client.stub.FetchKV(pb.FetchKVRequest(handle=outcome.handle.handle, max_chunk_bytes=1024))
    next(stream)
    assert worker.stats()["fetching"] == 1
    stream.cancel()
    assert wait_for(lambda: worker.stats()["fetching"] == 0, 10)
    assert client.release(outcome.handle.handle).released_bytes == outcome.handle.kv_bytes


def test_a_worker_gone_for_good_turns_health_false_and_is_replaced(served):
    server, pool, client = served
    assert client.health() == "SERVING"
    pool.kill(0)
    seen = []
    assert wait_for(lambda: seen.append(client.health()) or seen[-1] == "NOT_SERVING", 10)
    error = status_of(lambda: client.prefill(token_ids=prompt(20), kv="none"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert wait_for(lambda: client.health() == "SERVING", 30)
    assert pool.replaced == 1
    assert client.prefill(token_ids=prompt(20), kv="none").summary.num_tokens == 20


def test_leases_of_a_restarted_worker_are_dropped(served):
    server, pool, client = served
    outcome = client.prefill(token_ids=prompt(200), kv="handle")
    handle = outcome.handle.handle
    assert server.leases.held_bytes == outcome.handle.kv_bytes
    pool.restart(0)  # a new incarnation: the KV is gone
    assert wait_for(lambda: server.leases.held_bytes == 0, 10)
    for method in (client.renew, client.fetch_kv, client.release):
        assert status_of(lambda: method(handle)).code() == grpc.StatusCode.FAILED_PRECONDITION  # noqa: B023
    assert client.health() == "SERVING"


def test_releasing_kv_lost_with_its_worker_reports_no_phantom_bytes(served):
    server, pool, client = served
    outcome = client.prefill(token_ids=prompt(200), kv="handle")
    pool.restart(0)  # released at once: whether or not the watch has noticed the restart yet
    error = status_of(lambda: client.release(outcome.handle.handle))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "lost" in error.details()
    assert server.leases.held_bytes == 0


def test_prefills_reuse_a_few_threads(model_dir):
    config = _config(model_dir)
    worker = InProcessPool(config.engine_kwargs()).workers[0]
    threads = []  # the Thread objects themselves: an id could be reused once a thread is gone
    worker.engine.runner.layers[0].register_forward_pre_hook(
        lambda module, args: threads.append(threading.current_thread())
    )
    options = PrefillOptions(chunk_size=8192, logits="last", attention="dense", config=config.proxy_config())
    for round_ in range(2 * PREFILL_THREADS + 1):
        items = list(worker.prefill(f"key-{round_}", prompt(40), options))
        assert isinstance(items[-1], PrefillDone)
    assert len(threads) == 2 * PREFILL_THREADS + 1
    assert len(set(threads)) <= PREFILL_THREADS


def test_lease_table_forgets_every_lease_of_a_lost_worker():
    table = LeaseTable(cap_bytes=1000, default_seconds=60, max_seconds=600)
    for handle, worker in (("a" * 32, "worker-0"), ("b" * 32, "worker-1"), ("c" * 32, "worker-0")):
        table.commit(table.reserve(100), handle, "me", worker, kv_bytes=100, num_tokens=4, seconds=60)
    lost = table.lose_worker("worker-0")
    assert sorted(lease.handle for lease in lost) == ["a" * 32, "c" * 32]
    assert table.held_bytes == 100 and len(table) == 1
    table.release("b" * 32, "me")
    assert table.lose("b" * 32) is None  # released stays released
    with pytest.raises(Exception) as caught:
        table.get("b" * 32, "me")
    assert caught.value.code == grpc.StatusCode.NOT_FOUND


def test_admission_routes_around_a_worker_that_is_down():
    admission = Admission(2, max_pending_tokens=1000)
    admission.set_available(0, False)
    assert admission.admit(10).worker == 1
    admission.set_available(1, False)
    with pytest.raises(AdmissionError) as caught:
        admission.admit(10)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    admission.set_available(0, True)
    assert admission.admit(10).worker == 0
