"""Same-host KV handoff (workers/kv_share.py, MapKV): the KV mapped in place equals what FetchKV
streams, bit for bit; the shared memory lives exactly as long as the lease (release and expiry
unlink it), also when a decode process dies holding a mapping; bad requests get clear statuses.

Unit tests share and open in this process; the service tests run a real loopback server over one
Ray worker holding a tiny random Llama (fp32, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from proxyprefill.workers.kv_share import (
    CUDA_IPC,
    SHARED_MEMORY,
    SHM_DIR,
    KVShareError,
    open_share,
    share_from_message,
    share_kv,
    share_to_message,
)

pytestmark = pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")


def _kv(layers=3, dtype=torch.float32, tokens=21):
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(2, tokens, 8, generator=gen).to(dtype) for _ in range(layers)]
    values = [torch.randn(2, tokens, 8, generator=gen).to(dtype) for _ in range(layers)]
    return keys, values, np.arange(tokens, dtype=np.int64)


def _segment(name: str):
    return SHM_DIR / name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shared_memory_round_trip_and_unlink(dtype):
    keys, values, ids = _kv(dtype=dtype)
    name = f"proxyprefill-test-{os.getpid()}-{str(dtype)[6:]}"
    shared = share_kv(keys, values, ids, "", name)
    try:
        assert shared.share.transport == SHARED_MEMORY and _segment(name).exists()
        mapped_k, mapped_v = open_share(shared.share)
        for a, b in zip(keys + values, mapped_k + mapped_v, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert np.frombuffer(shared.share.token_ids, dtype="<i8").tolist() == ids.tolist()
        # writes by the decoder stay in its private copy
        mapped_k[0].zero_()
        assert torch.equal(open_share(shared.share)[0][0], keys[0])
    finally:
        shared.close()
    assert not _segment(name).exists()
    # a mapping made before the unlink stays readable; a new one is refused naming the field
    assert torch.equal(mapped_v[2], values[2])
    with pytest.raises(KVShareError, match="shm_name"):
        open_share(shared.share)


def test_message_round_trip_and_refusals():
    from proxyprefill.protos import prefill_pb2 as pb

    keys, values, ids = _kv()
    shared = share_kv(keys, values, ids, SHARED_MEMORY, f"proxyprefill-test-msg-{os.getpid()}")
    try:
        message = share_to_message(shared.share, pb.KVHeader(dtype="float32", num_tokens=21))
        back = share_from_message(pb.KVMapping.FromString(message.SerializeToString()))
        assert back == shared.share
        mapped_k, _ = open_share(back)
        assert torch.equal(mapped_k[1], keys[1])
        back.host_id = "another-host"
        with pytest.raises(KVShareError, match="host_id"):
            open_share(back)
    finally:
        shared.close()
    with pytest.raises(KVShareError, match="CUDA IPC needs GPU-resident KV"):
        share_kv(keys, values, ids, CUDA_IPC, "unused")
    with pytest.raises(KVShareError, match="transport: unknown"):
        share_kv(keys, values, ids, "carrier-pigeon", "unused")


_HOLDER = """
import sys, time, torch
from proxyprefill.workers.kv_share import KVShare, SharedTensorInfo, open_share
name, nbytes = sys.argv[1], int(sys.argv[2])
share = KVShare(transport="shared_memory", host_id=open("/proc/sys/kernel/random/boot_id").read().strip(),
                dtype="float32", keys=[SharedTensorInfo([nbytes // 4], [1])], values=[],
                shm_name=name, shm_bytes=nbytes)
keys, _ = open_share(share)
print(float(keys[0][:1000].sum()), flush=True)
time.sleep(600)
"""


def test_process_ref_tells_a_dead_or_replaced_process_apart():
    from proxyprefill.workers.kv_share import ProcessRef

    me = ProcessRef.this_process()
    assert me is not None and me.alive() is True
    assert ProcessRef(me.pid, me.start_ticks + 1, me.pid_namespace).alive() is False  # a reused pid
    assert ProcessRef(me.pid, me.start_ticks, me.pid_namespace + 1).alive() is None  # cannot tell
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from proxyprefill.workers.kv_share import _start_ticks

        ref = ProcessRef(child.pid, _start_ticks(child.pid), me.pid_namespace)
        assert ref.alive() is True
        child.kill()
        child.wait(timeout=30)
        assert ref.alive() is False
    finally:
        if child.poll() is None:
            child.kill()


def test_cuda_exports_reap_releases_only_for_dead_consumers(monkeypatch):
    """The bookkeeping behind CUDA IPC exports, on a counter file laid out as torch's (a 64-byte
    header, then int64 counters): an export whose consumer let go is forgotten, one whose
    consumer died holding it is released on its behalf, one of a live or unseen consumer stays."""
    from proxyprefill.workers import kv_share
    from proxyprefill.workers.kv_share import CudaExport, CudaExports, ProcessRef

    name = f"proxyprefill-test-counters-{os.getpid()}"
    path = SHM_DIR / name
    counters = np.zeros(8 + 6, dtype="<i8")  # 64-byte header, then counters 0..5
    counters[8:] = [1, 1, 0, 0, 1, 1]
    path.write_bytes(counters.tobytes())
    released = []
    monkeypatch.setattr(
        torch.UntypedStorage, "_release_ipc_counter_cuda", lambda h, o: released.append(o), raising=False
    )
    monkeypatch.setattr(torch.cuda, "ipc_collect", lambda: released.append("collect"))
    me = ProcessRef.this_process()
    dead = ProcessRef(me.pid, me.start_ticks + 1, me.pid_namespace)
    unseen = ProcessRef(me.pid, me.start_ticks + 1, me.pid_namespace + 1)
    handle = ("/" + name).encode()
    try:
        exports = CudaExports()
        exports._exports = [
            CudaExport(dead, [(handle, 0), (handle, 2)]),  # died holding counter 0
            CudaExport(dead, [(handle, 2), (handle, 3)]),  # died after letting go
            CudaExport(me, [(handle, 1)]),  # alive, holding
            CudaExport(unseen, [(handle, 4)]),  # another pid namespace
            CudaExport(None, [(handle, 5)]),  # no consumer given
            CudaExport(dead, [(b"/proxyprefill-no-such-counters", 0)]),  # file retired
        ]
        assert exports.reap() == 1
        assert released == [0, "collect"]  # the freed blocks are collected at once
        released.clear()
        assert exports.reap() == 0 and released == []  # nothing ended: nothing to collect
        assert [e.counters[0][1] for e in exports._exports] == [1, 4, 5]
        assert kv_share._export_counter(handle, 1) == 1
    finally:
        path.unlink()


def _shm_used_bytes() -> int:
    stat = os.statvfs(SHM_DIR)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def test_decoder_dying_with_a_mapping_leaves_nothing_behind():
    size = 64 * 1024 * 1024
    keys = [torch.ones(1, size // 4 // 2, 2)]
    before = _shm_used_bytes()
    shared = share_kv(
        keys, [torch.ones(1)], np.arange(1), SHARED_MEMORY, f"proxyprefill-test-die-{os.getpid()}"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, shared.share.shm_name, str(shared.share.shm_bytes)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert float(holder.stdout.readline()) == 1000.0  # it maps and reads the KV
        assert _shm_used_bytes() - before >= size * 0.9
        shared.close()  # the lease ends while the decoder holds the mapping
        assert not _segment(shared.share.shm_name).exists()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
        shared.close()
    assert _shm_used_bytes() - before < size * 0.1  # the pages went with the last mapping


# ---------------------------------------------------------------------------------------------
# Through the service
# ---------------------------------------------------------------------------------------------
ray = pytest.importorskip("ray")
pytest.importorskip("transformers")
pytest.importorskip("grpc_health")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from _support import one_worker_service, save_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama-share")
    save_tiny_llama(path, 2)
    with one_worker_service(path, {"num_cpus": 1}, dtype="float32", dense_below_tokens=0) as service:
        yield service


@pytest.fixture(scope="module")
def client(service):
    from proxyprefill.service.client import PrefillClient

    with PrefillClient(service.target) as client:
        yield client


def _handle(client, tokens=300, lease_seconds=0):
    ids = torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    outcome = client.prefill(token_ids=ids, kv="handle", lease_seconds=lease_seconds)
    return outcome.handle.handle, ids


@pytest.mark.slow
def test_mapped_kv_equals_fetched_kv_and_release_unlinks(client):
    handle, ids = _handle(client)
    fetched = client.fetch_kv(handle, include_token_ids=True)
    mapped = client.get_kv(handle)  # auto: same host, so mapped in place
    assert mapped.transport == SHARED_MEMORY and mapped.bytes_received == 0
    assert mapped.header == fetched.header and mapped.token_ids.tolist() == ids
    for a, b in zip(fetched.keys + fetched.values, mapped.keys + mapped.values, strict=True):
        assert torch.equal(a, b)
    segment = _segment(f"proxyprefill-{handle}")
    assert segment.exists()
    assert client.map_kv(handle).keys[0].data_ptr() != 0  # a second map reuses the segment
    client.release(handle)
    assert not segment.exists()
    assert torch.equal(mapped.keys[1], fetched.keys[1])  # our mapping outlives the lease


@pytest.mark.slow
def test_expiry_unlinks_the_segment(client):
    handle, _ = _handle(client, tokens=100, lease_seconds=1)
    client.map_kv(handle)
    segment = _segment(f"proxyprefill-{handle}")
    assert segment.exists()
    deadline = time.monotonic() + 15
    while segment.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not segment.exists()


@pytest.mark.slow
def test_parallel_fetch_streams_equal_one_and_release_returns_to_baseline(service, client):
    """FetchKV over two streams (layer ranges, one thread each) gives the same KV as one stream;
    after release the worker holds no KV and no segment of ours is left in /dev/shm."""
    stats = service.pool.stats(0)
    baseline = ray.get(stats)["kv_bytes"]
    segments = set(SHM_DIR.glob("proxyprefill-*"))
    handle, ids = _handle(client, tokens=200)
    one = client.fetch_kv(handle, include_token_ids=True, max_chunk_bytes=4096)
    two = client.fetch_kv(handle, include_token_ids=True, max_chunk_bytes=4096, streams=2)
    assert two.header == one.header and two.token_ids.tolist() == ids
    assert len(two.keys) == one.header.num_layers == 2 and two.bytes_received == one.bytes_received
    for a, b in zip(one.keys + one.values, two.keys + two.values, strict=True):
        assert torch.equal(a, b)
    client.map_kv(handle)
    assert ray.get(service.pool.stats(0))["kv_bytes"] > baseline
    client.release(handle)
    assert ray.get(service.pool.stats(0))["kv_bytes"] == baseline
    assert set(SHM_DIR.glob("proxyprefill-*")) <= segments
    with pytest.raises(ValueError, match="streams"):
        client.fetch_kv(handle, streams=0)


@pytest.mark.slow
def test_map_kv_refusals(client):
    import grpc

    handle, _ = _handle(client, tokens=50)
    with pytest.raises(grpc.RpcError) as err:
        client.map_kv(handle, transport=CUDA_IPC)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "CUDA IPC" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.map_kv("0" * 32)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    from proxyprefill.protos import prefill_pb2 as pb

    with pytest.raises(grpc.RpcError) as err:
        client.stub.MapKV(pb.MapKVRequest(handle=handle, transport=7))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "transport" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.stub.MapKV(pb.MapKVRequest(handle=handle, consumer=pb.ConsumerProcess(pid=0, start_ticks=5)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "consumer" in err.value.details()
    with pytest.raises(ValueError, match="transport"):
        client.map_kv(handle, transport="pigeon")
    client.release(handle)


@pytest.mark.slow
def test_push_over_gloo_equals_fetch(client):
    import grpc

    handle, ids = _handle(client, tokens=200)
    fetched = client.fetch_kv(handle)
    pushed = client.push_kv(handle, backend="gloo")
    assert pushed.transport == "push-gloo" and pushed.header == fetched.header
    assert pushed.bytes_received == sum(t.numel() * t.element_size() for t in fetched.keys + fetched.values)
    for a, b in zip(fetched.keys + fetched.values, pushed.keys + pushed.values, strict=True):
        assert torch.equal(a, b)
    client.release(handle)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:  # refused at once, not after the receive's timeout
        client.push_kv(handle, backend="gloo", timeout_seconds=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() - started < 10
    with pytest.raises(grpc.RpcError) as err:
        client.stub.PushKV(pb_push_request(handle="0" * 32, rendezvous="nowhere"))
    assert err.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def pb_push_request(**fields):
    from proxyprefill.protos import prefill_pb2 as pb

    values = dict(backend="gloo", transfer_id="t1")
    values.update(fields)
    return pb.PushKVRequest(**values)


@pytest.mark.slow
def test_push_refuses_bad_fields(client):
    import grpc

    handle, _ = _handle(client, tokens=40)
    for fields, name in (
        (dict(rendezvous="nowhere"), "rendezvous"),
        (dict(rendezvous="127.0.0.1:1", backend="carrier"), "backend"),
        (dict(rendezvous="127.0.0.1:1", transfer_id="a b"), "transfer_id"),
    ):
        request = pb_push_request(handle=handle, **fields)
        with pytest.raises(grpc.RpcError) as err:
            client.stub.PushKV(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.value.details()
    client.release(handle)
