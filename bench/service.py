"""Service benchmark: what the gRPC front end and the Ray pool add on top of the engine.

Measured in one run, on one machine, against a service started in this process (local Ray, one
worker) with the client in a *separate process* (as a decode service would be):

  overhead   per prompt length: client-side latency of Prefill (request sent -> summary received)
             against the worker's own prefill time for the same request (summary.timings), and
             against the bare engine (PrefillEngine.prefill in this process, same thread count);
             medians over repeats. Target: overhead <= 2% of prefill time at 32k tokens on GPU.
  load       requests/s and latency percentiles of many concurrent clients with short prompts.
  fetch      FetchKV throughput on loopback (bytes of K and V received / wall time), median of
             repeats; also with the client in the server's process. Target: >= 1 GB/s.

    python bench/service.py               # CPU, SmolLM2; writes bench/results/service-cpu.json
    python bench/service.py --lengths 8192 --device cuda        # GPU (SmolLM2's context is 8192 tokens)
    python bench/service.py --model /path/to/hf-model --lengths 32768 --device cuda   # the 32k target

Absolute times hold only for the machine named in the JSON; on a shared CPU the ratios matter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance: a sibling
import provenance  # noqa: E402

CLIENT_SCRIPT = r"""
import json, sys, time
from proxyprefill.service.client import PrefillClient

target, job = sys.argv[1], json.loads(sys.stdin.read())  # stdin: long prompts overflow argv
out = []
with PrefillClient(target) as client:
    if job["kind"] == "fetch":
        for _ in range(job["repeats"]):
            started = time.perf_counter()
            transfer = client.fetch_kv(job["handle"], job["chunk_bytes"], streams=job.get("streams", 1))
            out.append([time.perf_counter() - started, transfer.bytes_received])
    elif job["kind"] == "prefill":
        for ids in job["prompts"]:
            started = time.perf_counter()
            outcome = client.prefill(token_ids=ids, kv="none", logits="last", chunk_size=job["chunk_size"],
                                     attention=job["attention"])
            out.append([time.perf_counter() - started, outcome.summary.timings.prefill_seconds,
                        outcome.summary.timings.queue_seconds])
print(json.dumps(out))
"""


def run_client(target: str, job: dict) -> list:
    result = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, target],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def git_commit() -> str:
    return provenance.git_commit() or "unknown"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)"
    )
    parser.add_argument(
        "--attention",
        default="dense",
        choices=["dense", "proxy"],
        help="attention mode (default: %(default)s)",
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=[512, 2048],
        help="overhead prompt lengths (default: %(default)s)",
    )
    parser.add_argument("--chunk-size", type=int, default=2048, help="prefill chunk (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per point (default: %(default)s)"
    )
    parser.add_argument(
        "--load-clients", type=int, default=16, help="concurrent clients (default: %(default)s)"
    )
    parser.add_argument(
        "--load-requests", type=int, default=64, help="load requests in all (default: %(default)s)"
    )
    parser.add_argument(
        "--load-tokens", type=int, default=64, help="tokens per load request (default: %(default)s)"
    )
    parser.add_argument(
        "--fetch-tokens", type=int, default=2048, help="prompt whose KV is fetched (default: %(default)s)"
    )
    parser.add_argument(
        "--fetch-streams",
        type=int,
        nargs="+",
        default=[1],
        help="FetchKV streams in parallel, one measurement per count (default: [1])",
    )
    parser.add_argument(
        "--fetch-chunk-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="FetchKV piece size (default: %(default)s)",
    )
    parser.add_argument(
        "--fetch-more-chunk-bytes",
        type=int,
        nargs="*",
        default=[],
        help="further piece sizes, each measured with every --fetch-streams count (default: none)",
    )
    parser.add_argument(
        "--out", default=None, help="result JSON (default: bench/results/service-<device>.json)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import grpc
    import ray
    import torch

    from proxyprefill.service import config as config_mod
    from proxyprefill.service.local import LocalService

    config = config_mod.load(
        environ={},
        listen="127.0.0.1:0",
        model=args.model,
        device=args.device,
        attention=args.attention,
        num_workers=1,
        default_chunk_size=args.chunk_size,
        max_pending_tokens=max(1 << 20, 4 * max(args.lengths)),
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    results: dict = {
        "benchmark": "service",
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "ray": ray.__version__,
        "cpu_count": os.cpu_count(),
        "attention": args.attention,
        "chunk_size": args.chunk_size,
        "repeats": args.repeats,
        "load_average_at_start": list(os.getloadavg()),
    }
    with LocalService(config) as service:
        from proxyprefill.service.client import PrefillClient

        with PrefillClient(service.target) as client:
            client.wait_until_serving()  # the worker loads and warms up first
        served = service.pool.description
        results["model"] = served.model.model_id
        results["device"] = served.device
        if served.device.startswith("cuda"):
            results["device_name"] = torch.cuda.get_device_name(0)
        else:
            results["device_name"] = platform.processor() or platform.machine()
        rng = np.random.default_rng(0)

        def prompt(n):
            return rng.integers(100, served.model.vocab_size, size=n).tolist()

        results["overhead"] = measure_overhead(service, args, prompt)
        results["load"] = measure_load(service, args, prompt)
        results["fetch"] = measure_fetch(service, args, prompt)
    ray.shutdown()
    results["load_average_at_end"] = list(os.getloadavg())  # other work sharing the machine

    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent / "results" / f"service-{_device_tag(results)}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def measure_overhead(service, args, prompt) -> list[dict]:
    """Per prompt length: the client's latency against the worker's prefill time and against the
    bare engine in this process (same thread count), medians over repeats."""
    import torch

    from proxyprefill.workers.engine import PrefillEngine

    worker_threads = service.pool.description.torch_threads
    engine = PrefillEngine.from_pretrained(args.model, attention=args.attention, device=args.device)
    if worker_threads:
        torch.set_num_threads(worker_threads)
    overhead = []
    for n in args.lengths:
        prompts = [prompt(n) for _ in range(args.repeats + 1)]
        job = {
            "kind": "prefill",
            "prompts": prompts,
            "chunk_size": args.chunk_size,
            "attention": args.attention,
        }
        rows = run_client(service.target, job)[1:]  # the first request warms the worker up
        client_s = [r[0] for r in rows]
        worker_s = [r[1] for r in rows]
        engine.prefill(prompts[0], chunk_size=args.chunk_size, logits="last")  # warm-up
        bare = []
        for ids in prompts[1:]:
            started = time.perf_counter()
            engine.prefill(ids, chunk_size=args.chunk_size, logits="last")
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            bare.append(time.perf_counter() - started)
        row = {
            "tokens": n,
            "client_latency_s_median": statistics.median(client_s),
            "worker_prefill_s_median": statistics.median(worker_s),
            "bare_engine_s_median": statistics.median(bare),
            "overhead_vs_worker_s_median": statistics.median(c - w for c, w in zip(client_s, worker_s)),
        }
        row["overhead_vs_worker_fraction"] = (
            row["overhead_vs_worker_s_median"] / row["worker_prefill_s_median"]
        )
        row["overhead_vs_bare_fraction"] = (
            row["client_latency_s_median"] - row["bare_engine_s_median"]
        ) / row["bare_engine_s_median"]
        overhead.append(row)
        print(
            f"overhead  {n:>7} tokens: client {row['client_latency_s_median']:.3f} s, worker "
            f"{row['worker_prefill_s_median']:.3f} s, bare engine {row['bare_engine_s_median']:.3f} s -> "
            f"{100 * row['overhead_vs_worker_fraction']:.2f}% over the worker, "
            f"{100 * row['overhead_vs_bare_fraction']:.2f}% over the bare engine"
        )
    return overhead


def measure_load(service, args, prompt) -> dict:
    """Requests/s and latency percentiles of many concurrent clients with short prompts."""
    load_prompts = [prompt(args.load_tokens) for _ in range(args.load_requests)]
    per_client = [load_prompts[i :: args.load_clients] for i in range(args.load_clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.load_clients) as executor:
        jobs = [
            executor.submit(
                run_client,
                service.target,
                {"kind": "prefill", "prompts": p, "chunk_size": args.chunk_size, "attention": args.attention},
            )
            for p in per_client
            if p
        ]
        rows = [row for job in jobs for row in job.result()]
    wall = time.perf_counter() - started
    latencies = [r[0] for r in rows]
    load = {
        "clients": args.load_clients,
        "requests": len(rows),
        "tokens_per_request": args.load_tokens,
        "wall_s": wall,
        "requests_per_s": len(rows) / wall,
        "latency_s": {f"p{q}": percentile(latencies, q) for q in (50, 90, 99)},
        "worker_prefill_s_median": statistics.median(r[1] for r in rows),
        "note": "wall time includes starting one Python client process per client",
    }
    print(
        f"load      {load['clients']} clients x {load['tokens_per_request']} tokens: "
        f"{load['requests_per_s']:.1f} requests/s, latency p50 {load['latency_s']['p50']:.3f} s "
        f"p90 {load['latency_s']['p90']:.3f} s p99 {load['latency_s']['p99']:.3f} s"
    )
    return load


def measure_fetch(service, args, prompt) -> dict:
    """FetchKV throughput on loopback: a client in its own process, one in the server's, and
    the gRPC leg alone (fetch_without_ray)."""
    from proxyprefill.service.client import PrefillClient

    with PrefillClient(service.target) as client:
        kept = client.prefill(token_ids=prompt(args.fetch_tokens), kv="handle", chunk_size=args.chunk_size)
        handle = kept.handle.handle
        by_piece = {}  # piece bytes -> streams -> GB/s of each repeat
        for chunk_bytes in [args.fetch_chunk_bytes, *args.fetch_more_chunk_bytes]:
            for streams in args.fetch_streams:
                job = {
                    "kind": "fetch",
                    "handle": handle,
                    "repeats": args.repeats + 1,
                    "chunk_bytes": chunk_bytes,
                    "streams": streams,
                }
                rates = [b / s / 1e9 for s, b in run_client(service.target, job)[1:]]
                by_piece.setdefault(chunk_bytes, {})[streams] = rates
        by_streams = by_piece[args.fetch_chunk_bytes]
        in_process = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            transfer = client.fetch_kv(handle, max_chunk_bytes=args.fetch_chunk_bytes)
            in_process.append([time.perf_counter() - started, transfer.bytes_received])
        client.release(handle)
        baseline_rows = fetch_without_ray(transfer, args.fetch_chunk_bytes, args.repeats + 1)[1:]
    separate = by_streams[args.fetch_streams[0]]
    same = [b / s / 1e9 for s, b in in_process]
    baseline = [b / s / 1e9 for s, b in baseline_rows]
    fetch = {
        "tokens": args.fetch_tokens,
        "kv_bytes": kept.handle.kv_bytes,
        "chunk_bytes": args.fetch_chunk_bytes,
        "gb_per_s_median_client_process": statistics.median(separate),
        "gb_per_s_median_client_in_server_process": statistics.median(same),
        "gb_per_s_client_process": separate,
        "streams": args.fetch_streams[0],
        "gb_per_s_client_process_by_piece_and_streams": by_piece,
        "gb_per_s_median_grpc_only_baseline": statistics.median(baseline),
        "baseline": "the same pre-serialised chunks streamed by a bare grpc.aio server from its memory "
        "(no Ray, no leases) to the same client code in a separate process",
    }
    print(
        f"fetch     {kept.handle.kv_bytes / 2**20:.1f} MiB: "
        f"{fetch['gb_per_s_median_client_process']:.2f} GB/s "
        f"(client process), {fetch['gb_per_s_median_client_in_server_process']:.2f} GB/s (client in the "
        "server process)"
    )
    for chunk_bytes, by_streams in by_piece.items():
        for streams, rates in by_streams.items():
            print(
                f"          {chunk_bytes >> 20} MiB pieces, {streams} streams (client process): "
                f"{min(rates):.2f}-{max(rates):.2f} GB/s"
            )
    print(f"          baseline, gRPC alone (no Ray): {fetch['gb_per_s_median_grpc_only_baseline']:.2f} GB/s")
    return fetch


def fetch_without_ray(transfer, chunk_bytes: int, repeats: int) -> list:
    """FetchKV's gRPC leg alone: a bare grpc.aio server streams the same pre-serialised chunks
    (the same pieces FetchKV sends) from memory; the client is the same code in its own process."""
    import asyncio
    import threading

    import grpc

    from proxyprefill.service.server import SERVICE_NAME
    from proxyprefill.workers.kv_wire import encode_chunk, layer_pieces

    chunks, header = [], transfer.header
    for layer, (keys, values) in enumerate(zip(transfer.keys, transfer.values, strict=True)):
        for piece in layer_pieces(layer, keys, values, chunk_bytes):
            chunks.append(encode_chunk(piece, header))
            header = None

    async def stream(request, context):
        for chunk in chunks:
            yield chunk

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start():
        server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
        handler = grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, {"FetchKV": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        job = {"kind": "fetch", "handle": "0" * 32, "repeats": repeats, "chunk_bytes": chunk_bytes}
        return run_client(f"127.0.0.1:{port}", job)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
        loop.call_soon_threadsafe(loop.stop)


def _device_tag(results: dict) -> str:
    if results["device"].startswith("cuda"):
        name = results.get("device_name", "gpu").lower()
        return "h100" if "h100" in name else "h200" if "h200" in name else "gpu"
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
