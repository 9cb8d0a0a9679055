"""One small request's fixed cost, seam by seam: marks across the client, the server and the worker.

bench/fixed_cost.py splits a request by the server's spans; this one goes finer. Three processes
on one host, as in production: a client, the server (grpc.aio, validation, admission, replies)
and a PrefillWorker serving its direct channel (workers/channel.py), the path every one-worker
prefill takes. Ray is left out: it carries no part of that path. Each process records
time.perf_counter() at the seams below by wrapping functions (on Linux it reads CLOCK_MONOTONIC,
one clock for every process of a host), so one request's marks line up across processes:

  client  c_start     before the request is built        c_end      the summary is in
  server  s_enter     the Prefill handler starts          s_call     the prefill goes to the pool
          s_final     the worker's final message is in    s_summary  the summary is handed to gRPC
  worker  w_call      the call is read off the channel    w_engine   PrefillEngine.run starts
          w_engine_end  run returns                       w_done     PrefillDone is built
          w_sent      the call's last frame is on the socket

    python bench/fixed_cost_timeline.py --model DIR --device cuda --length 32768

Prints the median of each segment and of the total (c_end - c_start minus the engine's own
prefill_seconds, as bench/service.py counts it); the JSON keeps every request's marks.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

here = Path(__file__).resolve().parent
sys.path.insert(0, str(here))
sys.path.insert(0, str(here.parent / "tests" / "reliability"))  # the stand-in pool
import provenance  # noqa: E402

WARM_UP = 3
SEGMENTS = (
    ("client -> server", "c_start", "s_enter"),
    ("server: validate, admit", "s_enter", "s_call"),
    ("channel -> worker", "s_call", "w_call"),
    ("worker -> engine", "w_call", "w_engine"),
    ("engine (run)", "w_engine", "w_engine_end"),
    ("result -> message", "w_engine_end", "w_done"),
    ("pickle + send", "w_done", "w_sent"),
    ("socket -> server", "w_sent", "s_final"),
    ("server: logits, summary", "s_final", "s_summary"),
    ("server -> client", "s_summary", "c_end"),
)

CLIENT = r"""
import json, sys, time
from proxyprefill.service.client import PrefillClient

target, job = sys.argv[1], json.loads(sys.stdin.read())
marks = []
with PrefillClient(target) as client:
    for ids in job["prompts"]:
        started = time.perf_counter()
        outcome = client.prefill(token_ids=ids, kv="none", logits="last", chunk_size=job["chunk_size"])
        marks.append({"c_start": started, "c_end": time.perf_counter(),
                      "engine_s": outcome.summary.timings.prefill_seconds})
print(json.dumps(marks))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument(
        "--attention", choices=("dense", "proxy"), default="proxy", help="attention (default: %(default)s)"
    )
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (default: %(default)s)")
    parser.add_argument("--chunk-size", type=int, default=8192, help="prefill chunk (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=20, help="timed requests, after 3 warm-ups (default: %(default)s)"
    )
    parser.add_argument("--out", default=None, help="result JSON (default: print only)")
    parser.add_argument("--serve-worker", default=None, help=argparse.SUPPRESS)  # internal: the worker
    return parser.parse_args(argv)


class Marks:
    """Named perf_counter marks of one process, one list per name (the k-th of each name belongs
    to the k-th request, requests being one at a time)."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def __call__(self, name: str) -> None:
        self.times.setdefault(name, []).append(time.perf_counter())


def wrap_call(owner, name: str, before: str | None, after: str | None, marks: Marks) -> None:
    """Marks `before` as owner.name is called and `after` as it returns."""
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        if before:
            marks(before)
        result = original(*args, **kwargs)
        if after:
            marks(after)
        return result

    setattr(owner, name, wrapped)


# worker process ---------------------------------------------------------------------------------
def serve_worker(args) -> int:
    """Loads the engine, opens the channel, says where (a pickle at --serve-worker), serves until
    stdin closes, then writes its marks beside that pickle."""
    from proxyprefill.service import config as config_mod
    from proxyprefill.workers import channel, prefill_worker, protocol
    from proxyprefill.workers.engine import PrefillEngine

    marks = Marks()
    wrap_call(channel, "_receive_frame", None, "w_call_read", marks)
    wrap_call(PrefillEngine, "run", "w_engine", "w_engine_end", marks)
    wrap_call(protocol.PrefillDone, "from_result", None, "w_done", marks)
    # _serve_call returns once the call's last frame is on the socket (and once more, without a
    # call, when the server closes the connection at the end)
    wrap_call(channel.PrefillChannel, "_serve_call", None, "w_sent", marks)

    config = config_mod.load(
        environ={}, model=args.model, device=args.device, attention=args.attention, num_workers=1
    )
    worker = prefill_worker.PrefillWorker("worker-0", config.engine_kwargs())
    endpoint = worker.channel_endpoint()
    Path(args.serve_worker).write_bytes(pickle.dumps((endpoint, worker.describe())))
    sys.stdin.read()
    Path(args.serve_worker + ".marks").write_text(json.dumps(marks.times))
    return 0


# server process ---------------------------------------------------------------------------------
def channel_pool(endpoint, description, marks: Marks):
    """A one-worker pool whose prefill goes over the worker's channel, as WorkerPool's does."""
    from dataclasses import replace

    from hostile_support import NullPool

    from proxyprefill.workers.channel import ChannelClient
    from proxyprefill.workers.protocol import Progress

    client = ChannelClient(endpoint)

    class ChannelPool(NullPool):
        def __init__(self):
            super().__init__()
            self.description = replace(description, has_tokenizer=False)

        async def prefill(self, worker, key, token_ids, options):
            marks("s_call")
            async for message in client.prefill(key, token_ids, options):
                if not isinstance(message, Progress):
                    marks("s_final")
                yield message

    return ChannelPool()


def mark_handler(marks: Marks) -> None:
    """Marks the Prefill handler's start and the moment it hands its summary to gRPC."""
    from proxyprefill.service.server import PrefillServer

    original = PrefillServer.Prefill

    async def Prefill(self, request, context):
        marks("s_enter")
        async for event in original(self, request, context):
            if event.WhichOneof("event") == "summary":
                marks("s_summary")
            yield event

    PrefillServer.Prefill = Prefill


def client_environment() -> dict:
    """The client's environment: this one without glibc malloc tuning, which is not the
    service's to choose for its clients."""
    return {name: value for name, value in os.environ.items() if not name.startswith("MALLOC_")}


def timeline(client_rows, server: dict, worker: dict) -> list[dict]:
    """Each request's marks, relative to its c_start, ms; warm-ups dropped."""
    worker = {"w_call" if name == "w_call_read" else name: times for name, times in worker.items()}
    rows = []
    for i, client in enumerate(client_rows):
        if i < WARM_UP:
            continue
        t0 = client["c_start"]
        marks = {"c_start": 0.0, "c_end": (client["c_end"] - t0) * 1e3}
        for source in (server, worker):
            for name, times in source.items():
                if len(times) >= len(client_rows):
                    marks[name] = (times[i] - t0) * 1e3
        marks["engine_ms"] = client["engine_s"] * 1e3
        marks["fixed_ms"] = marks["c_end"] - marks["engine_ms"]
        rows.append(marks)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_worker:
        return serve_worker(args)
    import grpc
    import torch

    from proxyprefill.service import config as config_mod
    from proxyprefill.service.local import LocalService

    with tempfile.TemporaryDirectory() as scratch:
        where = os.path.join(scratch, "worker.pickle")
        command = [sys.executable, __file__, "--serve-worker", where, "--device", args.device]
        command += ["--attention", args.attention] + (["--model", args.model] if args.model else [])
        worker_process = subprocess.Popen(command, stdin=subprocess.PIPE, text=True)
        while not os.path.exists(where):
            if worker_process.poll() is not None:
                sys.exit("the worker process failed")
            time.sleep(0.2)
        time.sleep(0.2)  # the pickle is written in one call; let it land
        endpoint, description = pickle.loads(Path(where).read_bytes())

        marks = Marks()
        mark_handler(marks)
        config = config_mod.load(
            environ={}, listen="127.0.0.1:0", num_workers=1, max_chunk_size=max(args.chunk_size, 65536)
        )
        rng = np.random.default_rng(0)
        vocab = description.model.vocab_size
        prompts = [rng.integers(100, vocab, args.length).tolist() for _ in range(args.repeats + WARM_UP)]
        with LocalService(config, pool=channel_pool(endpoint, description, marks)) as service:
            ran = subprocess.run(
                [sys.executable, "-c", CLIENT, service.target],
                input=json.dumps({"prompts": prompts, "chunk_size": args.chunk_size}),
                capture_output=True,
                text=True,
                env=client_environment(),
            )
        if ran.returncode:
            sys.exit(ran.stderr[-3000:])
        worker_process.stdin.close()
        worker_process.wait(timeout=60)
        worker_marks = json.loads(Path(where + ".marks").read_text())
    rows = timeline(json.loads(ran.stdout), marks.times, worker_marks)

    segments = {}
    print(f"{args.length} tokens, {len(rows)} requests, {description.device}: medians (min-max), ms")
    for label, start, end in SEGMENTS:
        values = [r[end] - r[start] for r in rows]
        segments[label] = {
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "max_ms": max(values),
        }
        print(f"  {label:<26} {segments[label]['median_ms']:7.2f}  ({min(values):.2f}-{max(values):.2f})")
    fixed = [r["fixed_ms"] for r in rows]
    engine = [r["engine_ms"] for r in rows]
    print(f"  {'engine (its own timer)':<26} {statistics.median(engine):7.2f}")
    print(f"  {'fixed cost':<26} {statistics.median(fixed):7.2f}  ({min(fixed):.2f}-{max(fixed):.2f})")
    if args.out:
        result = {
            "commit": provenance.git_commit(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
            "cpu_count": os.cpu_count(),
            "device": description.device,
            "model": description.model.model_id,
            "attention": args.attention,
            "length": args.length,
            "chunk_size": args.chunk_size,
            # the server's and the worker's malloc settings when the environment made them
            "malloc_environment": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "segments": segments,
            "fixed_ms": {"median": statistics.median(fixed), "min": min(fixed), "max": max(fixed)},
            "requests": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
