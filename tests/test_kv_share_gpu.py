"""CUDA IPC handoff between two processes on one GPU: the decode process sees the producer's KV
bit for bit without a copy, and both processes end cleanly after the producer drops it."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _producer(conn, layers: int, tokens: int) -> None:
    import numpy as np

    from proxyprefill.protos import prefill_pb2 as pb
    from proxyprefill.workers.kv_share import share_kv, share_to_message

    gen = torch.Generator(device="cuda").manual_seed(0)
    keys = [
        torch.randn(8, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(layers)
    ]
    values = [
        torch.randn(8, tokens, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(layers)
    ]
    torch.cuda.synchronize()
    shared = share_kv(keys, values, np.arange(tokens), "", "unused")
    header = pb.KVHeader(dtype="bfloat16", num_tokens=tokens)
    checksums = [float(t.float().sum()) for t in keys + values]
    conn.send((share_to_message(shared.share, header).SerializeToString(), checksums))
    assert conn.recv() == "release"  # the lease ends: the worker drops its tensors
    del keys, values, shared
    torch.cuda.synchronize()
    assert conn.recv() == "exit"


def test_cuda_ipc_between_processes():
    from proxyprefill.protos import prefill_pb2 as pb
    from proxyprefill.workers.kv_share import CUDA_IPC, open_share, share_from_message

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    producer = ctx.Process(target=_producer, args=(child, 4, 4096))
    producer.start()
    try:
        data, checksums = parent.recv()
        share = share_from_message(pb.KVMapping.FromString(data))
        assert share.transport == CUDA_IPC
        free_before = torch.cuda.mem_get_info()[0]
        keys, values = open_share(share)
        assert keys[0].is_cuda and keys[0].shape == (8, 4096, 128) and keys[0].dtype == torch.bfloat16
        # mapped, not copied: opening took no device memory of ours
        assert torch.cuda.memory_allocated() == 0
        assert abs(torch.cuda.mem_get_info()[0] - free_before) < 64 * 2**20
        assert [float(t.float().sum()) for t in keys + values] == checksums
        parent.send("release")
        del keys, values
        torch.cuda.synchronize()
        parent.send("exit")
        producer.join(timeout=60)
        assert producer.exitcode == 0
    finally:
        if producer.is_alive():
            producer.kill()


# ---------------------------------------------------------------------------------------------
# Through the service: a worker on the GPU, decoders mapping its KV with CUDA IPC
# ---------------------------------------------------------------------------------------------
_GPU_HOLDER = """
import sys, torch
from proxyprefill.service.client import PrefillClient
with PrefillClient(sys.argv[1]) as client:
    mapped = client.map_kv(sys.argv[2], transport="cuda_ipc")
    print(float(sum(t.double().sum() for t in mapped.keys + mapped.values)), flush=True)
    sys.stdin.readline()  # the lease ends meanwhile; the mapping must still read the same
    print(float(sum(t.double().sum() for t in mapped.keys + mapped.values)), flush=True)
    sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def gpu_service(tmp_path_factory):
    pytest.importorskip("ray")
    pytest.importorskip("grpc_health")
    from _support import one_worker_service, save_tiny_llama

    path = tmp_path_factory.mktemp("tiny-llama-gpu-share")
    save_tiny_llama(path, 2)
    with one_worker_service(
        path,
        {"num_cpus": 2, "num_gpus": 1},
        dtype="float16",
        device="cuda",
        dense_below_tokens=0,
        warm_up="off",
    ) as service:
        yield service


@pytest.fixture(scope="module")
def gpu_client(gpu_service):
    from proxyprefill.service.client import PrefillClient

    with PrefillClient(gpu_service.target) as client:
        for _ in range(2):  # CUDA context, kernels and allocator pools exist from here on
            client.release(_gpu_handle(client, 64))
        yield client


def _worker_gpu_bytes(service) -> int:
    import ray

    return ray.get(service.pool.stats(0))["gpu_bytes"]


def _settles_at(service, baseline: int) -> bool:
    """Whether the worker's GPU memory comes back to `baseline` (the server's watch reaps dead
    consumers every few seconds)."""
    from _support import wait_for

    return wait_for(lambda: _worker_gpu_bytes(service) == baseline)


def _gpu_handle(client, tokens, lease_seconds=0):
    ids = torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(tokens)).tolist()
    return client.prefill(token_ids=ids, kv="handle", lease_seconds=lease_seconds).handle.handle


def _checksum(tensors) -> float:
    return float(sum(t.double().sum() for t in tensors))


def _holder(service, handle: str):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", _GPU_HOLDER, service.target, handle],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return holder, float(holder.stdout.readline())


def _mapped_equals_fetched(client, handle) -> None:
    from proxyprefill.workers.kv_share import CUDA_IPC

    fetched = client.fetch_kv(handle)
    mapped = client.map_kv(handle, transport=CUDA_IPC)
    assert mapped.transport == CUDA_IPC and mapped.bytes_received == 0 and mapped.keys[0].is_cuda
    for a, b in zip(fetched.keys + fetched.values, mapped.keys + mapped.values, strict=True):
        assert torch.equal(a, b.cpu())


def test_service_cuda_ipc_equals_fetch_and_release_frees(gpu_service, gpu_client):
    baseline = _worker_gpu_bytes(gpu_service)
    handle = _gpu_handle(gpu_client, 2000)
    assert _worker_gpu_bytes(gpu_service) > baseline
    _mapped_equals_fetched(gpu_client, handle)  # its tensors are gone when it returns
    torch.cuda.synchronize()
    gpu_client.release(handle)
    assert _worker_gpu_bytes(gpu_service) == baseline


def test_service_cuda_ipc_expiry_frees(gpu_service, gpu_client):
    from proxyprefill.workers.kv_share import CUDA_IPC

    baseline = _worker_gpu_bytes(gpu_service)
    handle = _gpu_handle(gpu_client, 1500, lease_seconds=1)
    gpu_client.map_kv(handle, transport=CUDA_IPC)  # dropped at once: the lease alone keeps it
    assert _settles_at(gpu_service, baseline)


def test_service_cuda_ipc_two_decoders_and_release_while_one_holds(gpu_service, gpu_client):
    """Each MapKV is its own export: a decoder letting go does not free what another holds,
    even after the lease ended; the memory goes when the last one lets go."""
    baseline = _worker_gpu_bytes(gpu_service)
    handle = _gpu_handle(gpu_client, 1700)
    expected = _checksum(gpu_client.fetch_kv(handle).keys + gpu_client.fetch_kv(handle).values)
    holder, first = _holder(gpu_service, handle)
    try:
        assert first == expected
        _mapped_equals_fetched(gpu_client, handle)  # a second decoder maps and lets go
        torch.cuda.synchronize()
        gpu_client.release(handle)
        assert _worker_gpu_bytes(gpu_service) > baseline  # the holder still reads it
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert float(holder.stdout.readline()) == expected
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
    assert _settles_at(gpu_service, baseline)


def test_service_cuda_ipc_decoder_dying_with_a_mapping_frees(gpu_service, gpu_client):
    baseline = _worker_gpu_bytes(gpu_service)
    handle = _gpu_handle(gpu_client, 1800)
    holder, first = _holder(gpu_service, handle)
    try:
        assert first != 0.0  # it mapped and read the KV
        holder.kill()  # dies holding the mapping
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    gpu_client.release(handle)
    assert _settles_at(gpu_service, baseline)
