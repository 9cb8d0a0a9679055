"""Same-host KV handoff: how long until a decode process can use KV that another process holds.

    python bench/handoff.py                                     # CPU: shared memory, 4k tokens
    python bench/handoff.py --tokens 131072 --paths cuda_ipc,shared_memory   # GPU machine

A producer process (standing in for the prefill worker) holds per-layer [Hkv, N, d] KV of a
Llama-3.1-8B shape (32 layers, 8 KV heads, d=128, bf16; 16 GiB at 128k tokens) on the GPU (CUDA
IPC) or in CPU memory (shared memory), shares it exactly as the worker does (workers/kv_share.py)
and sends the KVMapping message over a pipe. The consumer (this process) then:

- `visible`: opens the mapping and touches one element of every layer (the tensors are usable);
- `read`: reads every byte once (a checksum), which bounds what decoding from them costs.

The producer's `share` time (shared memory: one copy into the segment; CUDA IPC: exporting
handles) is reported too: with shared memory the worker pays it once per handle. The checksums of
both sides are compared, so a wrong mapping fails the run. Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import git_commit  # noqa: E402


def _producer(conn, path: str, shape: dict, device: str) -> None:
    import numpy as np

    from proxyprefill.protos import prefill_pb2 as pb
    from proxyprefill.workers.kv_share import share_kv, share_to_message

    dtype = getattr(torch, shape["dtype"])
    size = (shape["kv_heads"], shape["tokens"], shape["head_dim"])
    keys = [torch.full(size, (i % 7) + 1, dtype=dtype, device=device) for i in range(shape["layers"])]
    values = [torch.full(size, -((i % 5) + 1), dtype=dtype, device=device) for i in range(shape["layers"])]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    shared = share_kv(keys, values, np.arange(shape["tokens"]), path, f"proxyprefill-bench-{time.time_ns()}")
    share_seconds = time.perf_counter() - start
    header = pb.KVHeader(dtype=shape["dtype"], num_tokens=shape["tokens"])
    message = share_to_message(shared.share, header).SerializeToString()
    conn.send((message, share_seconds, _checksum(keys + values)))
    conn.recv()  # the consumer is done
    shared.close()
    conn.send("closed")


def _checksum(tensors) -> int:
    """An exact checksum of the bits: the elements read as integers of their width, summed."""
    as_int = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return int(sum(int(t.view(as_int[t.element_size()]).sum(dtype=torch.int64)) for t in tensors))


def measure(path: str, shape: dict, repeats: int) -> dict:
    from proxyprefill.protos import prefill_pb2 as pb
    from proxyprefill.workers.kv_share import open_share, share_from_message

    device = "cuda" if path == "cuda_ipc" else "cpu"
    ctx = mp.get_context("spawn")
    runs = []
    for _ in range(repeats):
        parent, child = ctx.Pipe()
        producer = ctx.Process(target=_producer, args=(child, path, shape, device))
        producer.start()
        data, share_seconds, expected = parent.recv()
        start = time.perf_counter()
        keys, values = open_share(share_from_message(pb.KVMapping.FromString(data)))
        for tensor in keys + values:
            tensor[0, 0, 0].item()  # touching one element makes the mapping real
        visible = time.perf_counter() - start
        start = time.perf_counter()
        total = _checksum(keys + values)
        if device == "cuda":
            torch.cuda.synchronize()
        read = time.perf_counter() - start
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        del keys, values
        parent.send("done")
        parent.recv()
        producer.join(timeout=120)
        if total != expected:
            raise SystemExit(f"{path}: checksum {total} != {expected}: the mapping is wrong")
        runs.append(
            {
                "bytes": nbytes,
                "share_seconds": share_seconds,
                "visible_seconds": visible,
                "read_seconds": read,
                "visible_gb_per_s": nbytes / visible / 1e9,
                "read_gb_per_s": nbytes / read / 1e9,
            }
        )
    return {"path": path, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paths",
        default="shared_memory",
        help="comma list of cuda_ipc, shared_memory (default: shared_memory)",
    )
    parser.add_argument("--tokens", type=int, default=4096, help="prompt tokens (default: 4096)")
    parser.add_argument("--layers", type=int, default=32, help="layers (default: 32, Llama-3.1-8B)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    parser.add_argument("--dtype", default="bfloat16", help="KV dtype (default: bfloat16)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per path, each with a new producer (default: 2)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default: bench/results/handoff-<device>-<tokens>.json)"
    )
    args = parser.parse_args(argv)
    shape = {
        "layers": args.layers,
        "kv_heads": args.kv_heads,
        "tokens": args.tokens,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
    }
    paths = [p for p in args.paths.split(",") if p]
    for path in paths:
        if path not in ("cuda_ipc", "shared_memory"):
            parser.error(f"--paths: unknown path {path!r}")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    results = {
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "shape": shape,
        "results": [measure(path, shape, args.repeats) for path in paths],
    }
    tag = "h200" if "H200" in device_name else ("gpu" if torch.cuda.is_available() else "cpu")
    out = Path(args.out or Path(__file__).parent / "results" / f"handoff-{tag}-{args.tokens}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'path':<14} {'GiB':>7} {'share s':>9} {'visible s':>10} {'read s':>8} {'read GB/s':>10}")
    for entry in results["results"]:
        for run in entry["runs"]:
            print(
                f"{entry['path']:<14} {run['bytes'] / 2**30:7.2f} {run['share_seconds']:9.3f} "
                f"{run['visible_seconds']:10.4f} {run['read_seconds']:8.3f} {run['read_gb_per_s']:10.1f}"
            )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
