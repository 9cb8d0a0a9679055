"""What the last-position logits cost a small request on the gRPC leg alone.

Two measurements, each with the client in its own process and nothing else in the way:

  service   the real server (grpc.aio, validation, admission, replies) over a stand-in pool whose
            worker answers at once with one Progress and a PrefillDone: with the logits of one
            position over a `--vocab` vocabulary (float32, what logits="last" returns), and with
            none. No engine and no Ray, so the difference is the logits event end to end.
  bare      a bare grpc.aio server streaming four messages (20 B, 20 B, SIZE, 200 B) per call to a
            sync client, for each SIZE of `--sizes`: how a single message's size shows up in
            latency.

    python bench/grpc_tail.py             # writes bench/results/grpc-tail-<cpu|gpu-host>.json

Medians and 10th-90th percentiles over `--requests` calls after 10 warm-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
sys.path.insert(0, str(here.parent / "tests" / "reliability"))  # the stand-in pool
import provenance  # noqa: E402

WARM_UP = 10

SERVICE_CLIENT = r"""
import json, sys, time
from proxyprefill.service.client import PrefillClient
target, logits, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with PrefillClient(target) as client:
    rows = []
    for _ in range(count):
        started = time.perf_counter()
        client.prefill(token_ids=[i % 200 for i in range(512)], kv="none", logits=logits)
        rows.append((time.perf_counter() - started) * 1e3)
print(json.dumps(rows))
"""

BARE_CLIENT = r"""
import json, sys, time, grpc
target, count = sys.argv[1], int(sys.argv[2])
channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)])
call = channel.unary_stream("/tail.Tail/Stream", request_serializer=None, response_deserializer=None)
rows = []
for _ in range(count):
    started = time.perf_counter()
    for _message in call(b""):
        pass
    rows.append((time.perf_counter() - started) * 1e3)
print(json.dumps(rows))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vocab", type=int, default=128256, help="vocabulary (default: %(default)s, Llama 3)"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[20, 65536, 200000, 513024],
        help="message sizes for the bare stream, bytes (default: %(default)s)",
    )
    parser.add_argument(
        "--requests", type=int, default=60, help="timed calls per case (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="times each case runs (default: %(default)s)")
    parser.add_argument(
        "--out", default=None, help="result JSON (default: bench/results/grpc-tail-<host>.json)"
    )
    return parser.parse_args(argv)


def summarise(rows: list[float]) -> dict:
    rows = sorted(rows[WARM_UP:])
    return {
        "median_ms": statistics.median(rows),
        "p10_ms": rows[len(rows) // 10],
        "p90_ms": rows[(9 * len(rows)) // 10],
        "requests": len(rows),
    }


def run_client(script: str, *args) -> list[float]:
    ran = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    if ran.returncode:
        sys.exit(ran.stderr[-3000:])
    return json.loads(ran.stdout)


def stand_in_pool(vocab: int):
    from hostile_support import NullPool

    from proxyprefill.workers.protocol import PrefillDone, Progress

    class AnswersAtOnce(NullPool):
        """Answers every prefill at once: one Progress, then a PrefillDone with the logits asked."""

        async def prefill(self, worker, key, token_ids, options):
            n = len(token_ids)
            wanted = options.logits == "last"
            yield Progress(n, n)
            yield PrefillDone(
                num_tokens=n,
                logits=np.zeros((1, vocab), np.float32) if wanted else None,
                logit_positions=[n - 1] if wanted else [],
                sparsity=np.zeros((2, 4)),
                estimate_seconds=0.0,
                attention_seconds=0.0,
                total_seconds=0.001,
                peak_memory_bytes=0,
                kv_bytes=0,
                header=dict(
                    model_id="null",
                    num_layers=2,
                    num_kv_heads=2,
                    head_dim=16,
                    dtype="float32",
                    rope_theta=1e4,
                    rope_scaling=None,
                    num_tokens=n,
                    token_sha256="0" * 64,
                ),
                attention="proxy",
            )

    return AnswersAtOnce()


def measure_service(args) -> dict:
    from proxyprefill.service import config as config_mod
    from proxyprefill.service.local import LocalService

    config = config_mod.load(environ={}, listen="127.0.0.1:0", num_workers=1)
    cases: dict[str, list] = {"logits_last": [], "logits_none": []}
    with LocalService(config, pool=stand_in_pool(args.vocab)) as service:
        for _ in range(args.rounds):
            for case, logits in (("logits_last", "last"), ("logits_none", "none")):
                rows = run_client(SERVICE_CLIENT, service.target, logits, args.requests + WARM_UP)
                cases[case].append(summarise(rows))
                print(f"service {case:<12} median {cases[case][-1]['median_ms']:.2f} ms", flush=True)
    return cases


def measure_bare(args) -> dict:
    import threading

    import grpc

    results: dict[str, list] = {}
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    for size in args.sizes:
        messages = (b"a" * 20, b"b" * 20, b"c" * size, b"d" * 200)

        async def stream(request, context, messages=messages):
            for message in messages:
                yield message

        async def start(stream=stream):
            server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
            handler = grpc.unary_stream_rpc_method_handler(stream, None, None)
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler("tail.Tail", {"Stream": handler}),)
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        server, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
        for _ in range(args.rounds):
            rows = run_client(BARE_CLIENT, f"127.0.0.1:{port}", args.requests + WARM_UP)
            results.setdefault(str(size), []).append(summarise(rows))
            print(f"bare    {size:>8} B  median {results[str(size)][-1]['median_ms']:.2f} ms", flush=True)
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    import grpc
    import torch

    results = {
        "commit": provenance.git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "vocab": args.vocab,
        "logits_bytes": 4 * args.vocab,
        "load_average_at_start": list(os.getloadavg()),
    }
    results["service"] = measure_service(args)
    results["bare"] = measure_bare(args)
    results["load_average_at_end"] = list(os.getloadavg())
    tag = "gpu-host" if torch.cuda.is_available() else "cpu"
    out = Path(args.out or here / "results" / f"grpc-tail-{tag}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
