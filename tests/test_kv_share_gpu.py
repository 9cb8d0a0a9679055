"""CUDA IPC handoff between two processes on one GPU: the decode process sees the producer's KV
bit for bit without a copy, and after the producer drops it (release) and the consumer lets go,
the GPU memory returns to where it was."""

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

    torch.cuda.init()
    baseline = torch.cuda.memory_allocated()
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
    assert conn.recv() == "unmapped"  # the decoder has let go too
    torch.cuda.ipc_collect()  # blocks held for consumers are freed once they let go
    conn.send(torch.cuda.memory_allocated() - baseline)


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
        parent.send("unmapped")
        assert parent.recv() == 0  # the producer's GPU memory is back to its baseline
        producer.join(timeout=60)
        assert producer.exitcode == 0
    finally:
        if producer.is_alive():
            producer.kill()
