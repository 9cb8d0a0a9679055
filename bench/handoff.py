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

`--ttft` times what a decode service waits for through the real service instead: a one-worker
service (Ray, in this process) prefills a random prompt, keeps its KV under a handle, and a client
in its own process takes the KV by each path (`grpc`: FetchKV; `shared_memory` / `cuda_ipc`:
MapKV; `push_gloo` / `push_nccl`: PushKV), then runs one decode step on it with stock
transformers. Time to first decode token = prefill + handoff + that step; the bytes moved and the
handoff's GB/s are reported, and a PNG plot is written when matplotlib is installed.

    python bench/handoff.py --ttft --tokens 4096 --paths grpc,shared_memory          # CPU, SmolLM2
    python bench/make_random_model.py --shape llama-3.1-8b --out /tmp/llama-8b
    python bench/handoff.py --ttft --model /tmp/llama-8b --tokens 32768,131072 --paths grpc,cuda_ipc
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import torch

from proxyprefill.service.client import FETCH_STREAMS

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


TTFT_PATHS = ("grpc", "shared_memory", "cuda_ipc", "push_gloo", "push_nccl")


def _take_kv(client, run: dict, handle: str):
    """The KV of `handle` by the run's path, as the client's KVTransfer."""
    path = run["path"]
    if path == "grpc":
        return client.fetch_kv(
            handle, run["fetch_chunk_bytes"], include_token_ids=True, streams=run["streams"]
        )
    if path in ("shared_memory", "cuda_ipc"):
        return client.map_kv(handle, path)
    return client.push_kv(
        handle, backend=path.removeprefix("push_"), device="cuda" if "nccl" in path else None
    )


def _ttft_client(conn, target: str, decoder: dict, runs: list) -> None:
    """The decode side, in its own process: for each (path, tokens) run, prefill a random prompt
    into a handle, take its KV by the path, decode one token, release; sends the timings back."""
    import numpy as np

    from proxyprefill.service.client import PrefillClient
    from proxyprefill.service.decode import greedy_continue, load_decoder

    model, _ = load_decoder(decoder["model"], decoder["dtype"], decoder["device"])
    rng = np.random.default_rng(0)
    out: list[dict] = []
    with PrefillClient(target, max_message_bytes=256 << 20) as client:
        client.wait_until_serving()  # the worker loads and warms up first
        vocab = client.model_info().vocab_size
        for run in runs:
            ids = rng.integers(0, vocab, run["tokens"]).tolist()
            started = time.perf_counter()
            outcome = client.prefill(token_ids=ids, kv="handle", chunk_size=run["chunk_size"])
            prefilled = time.perf_counter()
            transfer = _take_kv(client, run, outcome.handle.handle)
            handed = time.perf_counter()
            token = greedy_continue(model, transfer, max_new_tokens=1)
            if decoder["device"].startswith("cuda"):
                torch.cuda.synchronize()
            decoded = time.perf_counter()
            nbytes = sum(t.numel() * t.element_size() for t in transfer.keys + transfer.values)
            del transfer
            client.release(outcome.handle.handle)
            out.append(
                {
                    **run,
                    "bytes": nbytes,
                    "prefill_seconds": prefilled - started,
                    "worker_prefill_seconds": outcome.summary.timings.prefill_seconds,
                    "handoff_seconds": handed - prefilled,
                    "decode_step_seconds": decoded - handed,
                    "ttft_seconds": decoded - started,
                    "handoff_gb_per_s": nbytes / (handed - prefilled) / 1e9,
                    "first_token": token[0],
                }
            )
            conn.send(out[-1])  # each run as it ends: a run cut short keeps the ones before
    conn.send(None)


def measure_ttft(args, tokens: list[int], paths: list[str], on_run=None) -> list[dict]:
    """Prefill + handoff + one decode step through a one-worker service, per path and length;
    `on_run(runs so far)` after each run."""
    from proxyprefill.service import config as config_mod
    from proxyprefill.service.local import LocalService

    config = config_mod.load(
        environ={},
        listen="127.0.0.1:0",
        model=args.model,
        num_workers=1,
        device=args.device,
        dtype=args.model_dtype,
        attention=args.attention,
        max_chunk_size=max(65536, args.chunk_size),
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.model_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    runs = [
        {
            "path": path,
            "tokens": n,
            "repeat": r,
            "chunk_size": args.chunk_size,
            "streams": args.streams,
            "fetch_chunk_bytes": args.fetch_chunk_bytes,
        }
        for n in tokens
        for path in paths
        for r in range(args.repeats)
    ]
    with LocalService(config) as service:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        decoder = {"model": args.model, "dtype": dtype, "device": device}
        client = ctx.Process(target=_ttft_client, args=(child, service.target, decoder, runs))
        client.start()
        child.close()
        results = []
        try:
            while (run := parent.recv()) is not None:
                results.append(run)
                if on_run is not None:
                    on_run(results)
        except EOFError:
            print(f"the decode client died after {len(results)} of {len(runs)} runs", file=sys.stderr)
        client.join(timeout=120)
    return results


def plot_ttft(results: list[dict], out: Path) -> str:
    """A stacked bar per (path, tokens): prefill, handoff, decode step (medians of the repeats)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    import statistics

    keys = sorted({(r["tokens"], r["path"]) for r in results})
    parts = ("prefill_seconds", "handoff_seconds", "decode_step_seconds")
    medians = {
        k: [statistics.median(r[p] for r in results if (r["tokens"], r["path"]) == k) for p in parts]
        for k in keys
    }
    figure, axes = plt.subplots(figsize=(1.2 * len(keys) + 3, 4))
    bottom = [0.0] * len(keys)
    for i, part in enumerate(parts):
        heights = [medians[k][i] for k in keys]
        axes.bar(range(len(keys)), heights, bottom=bottom, label=part.removesuffix("_seconds"))
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axes.set_xticks(range(len(keys)), [f"{path}\n{n // 1024}k" for n, path in keys])
    axes.set_ylabel("seconds to the first decode token")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    return f"wrote {out}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paths",
        default="shared_memory",
        help="comma list of cuda_ipc, shared_memory; with --ttft also grpc, push_gloo, push_nccl "
        "(default: shared_memory)",
    )
    parser.add_argument(
        "--tokens", default="4096", help="prompt tokens, a comma list with --ttft (default: 4096)"
    )
    parser.add_argument("--layers", type=int, default=32, help="layers (default: 32, Llama-3.1-8B)")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads (default: 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim (default: 128)")
    parser.add_argument("--dtype", default="bfloat16", help="KV dtype (default: bfloat16)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs per path, each with a new producer (default: 2)"
    )
    parser.add_argument(
        "--ttft",
        action="store_true",
        help="time prefill + handoff + one decode step through the service (default: off; "
        "--layers/--kv-heads/--head-dim/--dtype then come from the model)",
    )
    parser.add_argument(
        "--model", default=None, help="--ttft: HF directory or .gguf (default: the embedded SmolLM2)"
    )
    parser.add_argument("--device", default=None, help="--ttft: cpu or cuda (default: cuda when present)")
    parser.add_argument(
        "--model-dtype", default=None, help="--ttft: model dtype (default: bfloat16 on cuda, float32 on cpu)"
    )
    parser.add_argument(
        "--attention", default="proxy", choices=["proxy", "dense"], help="--ttft: attention (default: proxy)"
    )
    parser.add_argument("--chunk-size", type=int, default=8192, help="--ttft: prefill chunk (default: 8192)")
    parser.add_argument(
        "--streams",
        type=int,
        default=FETCH_STREAMS,
        help=f"--ttft: parallel FetchKV streams of the grpc path (default: {FETCH_STREAMS}, the client's)",
    )
    parser.add_argument(
        "--fetch-chunk-bytes",
        type=int,
        default=0,
        help="--ttft: FetchKV piece size of the grpc path (default: 0, the server's default)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default: bench/results/handoff[-ttft]-<device>-<tokens>.json)"
    )
    args = parser.parse_args(argv)
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        parser.error(f"--tokens: expected a comma list of integers, got {args.tokens!r}")
    paths = [p for p in args.paths.split(",") if p]
    allowed = TTFT_PATHS if args.ttft else ("cuda_ipc", "shared_memory")
    for path in paths:
        if path not in allowed:
            parser.error(f"--paths: unknown path {path!r} (expected some of {', '.join(allowed)})")
    if not args.ttft and len(tokens) != 1:
        parser.error("--tokens: one length without --ttft")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    tag = "h200" if "H200" in device_name else ("gpu" if torch.cuda.is_available() else "cpu")
    results = {
        "device": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
    }
    if args.ttft:
        return _main_ttft(args, tokens, paths, results, tag)
    shape = {
        "layers": args.layers,
        "kv_heads": args.kv_heads,
        "tokens": tokens[0],
        "head_dim": args.head_dim,
        "dtype": args.dtype,
    }
    results.update(shape=shape, results=[measure(path, shape, args.repeats) for path in paths])
    out = Path(args.out or Path(__file__).parent / "results" / f"handoff-{tag}-{tokens[0]}.json")
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


def _main_ttft(args, tokens: list[int], paths: list[str], results: dict, tag: str) -> int:
    import grpc
    import ray

    results.update(
        grpcio=grpc.__version__,
        ray=ray.__version__,
        model=args.model or "embedded SmolLM2-135M",
        attention=args.attention,
        chunk_size=args.chunk_size,
        streams=args.streams,
        cpu_count=os.cpu_count(),
        load_average_at_start=list(os.getloadavg()),
    )
    name = f"handoff-ttft-{tag}-{'-'.join(str(n) for n in tokens)}"
    out = Path(args.out or Path(__file__).parent / "results" / f"{name}.json")

    def save(runs):
        results.update(runs=runs, load_average_at_end=list(os.getloadavg()))
        out.write_text(json.dumps(results, indent=2) + "\n")

    save(measure_ttft(args, tokens, paths, on_run=save))
    print(plot_ttft(results["runs"], out.with_suffix(".png")))
    print(f"wrote {out}")
    print(
        f"{'path':<14} {'tokens':>7} {'MiB':>8} {'prefill s':>10} {'handoff s':>10} {'GB/s':>6} "
        f"{'step s':>7} {'TTFT s':>7} {'TTFT/prefill':>12}"
    )
    for run in results["runs"]:
        print(
            f"{run['path']:<14} {run['tokens']:7d} {run['bytes'] / 2**20:8.1f} "
            f"{run['prefill_seconds']:10.3f} {run['handoff_seconds']:10.3f} {run['handoff_gb_per_s']:6.2f} "
            f"{run['decode_step_seconds']:7.3f} {run['ttft_seconds']:7.3f} "
            f"{run['ttft_seconds'] / run['prefill_seconds']:12.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
