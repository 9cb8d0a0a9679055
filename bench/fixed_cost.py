"""Where a request's fixed cost goes: the server's own spans against the client's latency.

A one-worker service (local Ray, this process) runs with tracing on; its spans go to an in-memory
exporter of this process (service/tracing.py: the server takes the process's tracer provider).
A client in its own process sends `--repeats` prefill requests per prompt length (kv=none,
logits=last, one at a time, after 3 warm-ups) and reports each latency. Each request is split into:

  client + gRPC   client latency - the server's Prefill span (encoding, the network, decoding)
  server          Prefill span - its three stages (validation, admission, the handler's own work)
  queue_wait      admitted -> the worker's turn
  Ray + worker    worker_prefill span - the engine's prefill time (summary.timings): the Ray
                  call, the token ids to the worker, the worker's threads, progress and result
                  items back
  engine          the engine's prefill time
  kv_return       logits and summary events written after the result

    python bench/fixed_cost.py                                   # CPU, embedded SmolLM2
    python bench/fixed_cost.py --model DIR --device cuda --lengths 512 32768

Medians (and min-max) per length; the JSON keeps every request's split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

PARTS = ("client_grpc", "server", "queue_wait", "ray_worker", "engine", "kv_return")

CLIENT = r"""
import json, sys, time
from proxyprefill.service.client import PrefillClient

target, job = sys.argv[1], json.loads(sys.stdin.read())
out = []
with PrefillClient(target) as client:
    client.wait_until_serving()
    for request_id, ids in job["prompts"]:
        started = time.perf_counter()
        outcome = client.prefill(token_ids=ids, kv="none", logits="last", chunk_size=job["chunk_size"],
                                 request_id=request_id)
        out.append([request_id, time.perf_counter() - started, outcome.summary.timings.prefill_seconds])
print(json.dumps(out))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)"
    )
    parser.add_argument(
        "--attention", choices=("dense", "proxy"), default="proxy", help="attention (default: %(default)s)"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[16, 512], help="prompt lengths (default: %(default)s)"
    )
    parser.add_argument("--chunk-size", type=int, default=8192, help="prefill chunk (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed requests per length (default: %(default)s)"
    )
    parser.add_argument(
        "--out", default=None, help="result JSON (default: bench/results/fixed-cost-<device>.json)"
    )
    return parser.parse_args(argv)


def split(span_ms: dict, latency_s: float, engine_s: float) -> dict:
    """One request's milliseconds per part (PARTS) from its spans' durations."""
    stages = span_ms["queue_wait"] + span_ms["worker_prefill"] + span_ms["kv_return"]
    return {
        "client_grpc": latency_s * 1e3 - span_ms["Prefill"],
        "server": span_ms["Prefill"] - stages,
        "queue_wait": span_ms["queue_wait"],
        "ray_worker": span_ms["worker_prefill"] - engine_s * 1e3,
        "engine": engine_s * 1e3,
        "kv_return": span_ms["kv_return"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import grpc
    import ray
    import torch
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from proxyprefill.service import config as config_mod
    from proxyprefill.service.local import LocalService

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    ray.init(include_dashboard=False, log_to_driver=False)
    config = config_mod.load(
        environ={},
        listen="127.0.0.1:0",
        model=args.model,
        device=args.device,
        attention=args.attention,
        num_workers=1,
        tracing=True,
        max_chunk_size=max(args.chunk_size, 65536),
    )
    results = {
        "commit": provenance.git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "ray": ray.__version__,
        "cpu_count": os.cpu_count(),
        "attention": args.attention,
        "chunk_size": args.chunk_size,
        "load_average_at_start": list(os.getloadavg()),
        "lengths": {},
    }
    rng = np.random.default_rng(0)
    with LocalService(config) as service:
        served = service.pool.description
        results["model"], results["device"] = served.model.model_id, served.device
        for n in args.lengths:
            prompts = [
                [f"fixed-cost-{n}-{i}", rng.integers(100, served.model.vocab_size, n).tolist()]
                for i in range(args.repeats + 3)
            ]
            job = json.dumps({"prompts": prompts, "chunk_size": args.chunk_size})
            exporter.clear()
            ran = subprocess.run(
                [sys.executable, "-c", CLIENT, service.target], input=job, capture_output=True, text=True
            )
            if ran.returncode:
                sys.exit(ran.stderr[-3000:])
            spans: dict[str, dict] = {}
            by_id = {}
            for span in exporter.get_finished_spans():
                trace_spans = spans.setdefault(span.context.trace_id, {})
                trace_spans[span.name] = (span.end_time - span.start_time) / 1e6
                if span.name == "Prefill":
                    by_id[span.attributes.get("proxyprefill.request_id")] = span.context.trace_id
            rows = [
                split(spans[by_id[request_id]], latency, engine)
                for request_id, latency, engine in json.loads(ran.stdout)[3:]
            ]
            summary = {
                part: {
                    "median_ms": statistics.median(r[part] for r in rows),
                    "min_ms": min(r[part] for r in rows),
                    "max_ms": max(r[part] for r in rows),
                }
                for part in PARTS
            }
            results["lengths"][str(n)] = {"summary": summary, "requests_ms": rows}
            print(f"{n} tokens, {len(rows)} requests (medians, min-max, ms):")
            for part in PARTS:
                s = summary[part]
                print(f"  {part:<12} {s['median_ms']:8.2f}  ({s['min_ms']:.2f}-{s['max_ms']:.2f})")
    ray.shutdown()
    results["load_average_at_end"] = list(os.getloadavg())
    tag = "gpu" if results["device"].startswith("cuda") else "cpu"
    out = Path(args.out or Path(__file__).parent / "results" / f"fixed-cost-{tag}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
