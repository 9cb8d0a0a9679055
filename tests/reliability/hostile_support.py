"""What the hostile-input and security tests and the full campaign share: a pool that computes
nothing (so the server runs without Ray), raw calls that send any bytes and any number of request
messages, and which statuses count as a refusal."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from proxyprefill.service.server import SERVICE_NAME
from proxyprefill.workers.model import ModelInfo
from proxyprefill.workers.protocol import KVMissing, PrefillFailed, WorkerDescription

# a bad request is answered with one of these (never UNKNOWN, INTERNAL, UNAVAILABLE or a timeout)
REFUSALS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
STREAMING_METHODS = ("Prefill", "FetchKV")
METHODS = ("Prefill", "FetchKV", "RenewLease", "ReleaseKV", "GetModelInfo", "MapKV", "PushKV")
NULL_POOL_MESSAGE = "the null pool computes nothing"


class NullPool:
    """A one-worker pool with a tiny model description whose worker answers every prefill with
    an 'invalid' error item; `calls` records what reached it."""

    names = ["worker-0"]
    actors = [None]
    description = WorkerDescription(
        model=ModelInfo(
            model_id="null",
            architecture="LlamaForCausalLM",
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            vocab_size=256,
            max_position_embeddings=4096,
            dtype="float32",
            rope_theta=10000.0,
            rope_scaling=None,
            eos_token_id=None,
        ),
        worker="worker-0",
        device="cpu",
        has_tokenizer=False,
    )

    def __init__(self):
        self.calls: list[str] = []

    def prefill(self, worker, key, token_ids, options):
        self.calls.append("prefill")
        return prefill_stream(PrefillFailed("invalid", NULL_POOL_MESSAGE))

    def fetch(self, worker, handle, *args):
        self.calls.append("fetch")
        return _items(KVMissing())

    def cancel(self, worker, key):
        self.calls.append("cancel")

    async def abandon(self, worker, key, keep_handle):
        self.calls.append("abandon")
        return 0

    def cancel_stream(self, stream):
        self.calls.append("cancel_stream")

    async def probe(self, worker, timeout: float = 10.0):
        from proxyprefill.workers.ray_pool import WorkerState

        return WorkerState(alive=True, incarnation="null")

    async def release(self, worker, handle):
        self.calls.append("release")
        return 0


async def prefill_stream(*messages):
    """Like WorkerPool.prefill: an async iterator of the worker's messages."""
    for message in messages:
        yield message


async def _items(*items):
    """Like a Ray ObjectRefGenerator: an async iterator of awaitables."""
    for item in items:
        ready = asyncio.get_running_loop().create_future()
        ready.set_result(item)
        yield ready


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: int = 0


def call_raw(
    channel: grpc.Channel,
    method: str,
    messages: list[bytes],
    timeout: float = 10.0,
    metadata: tuple = (),
) -> Outcome:
    """Sends `messages` (raw bytes, any number) to `method` as a request stream and returns how
    the call ended."""
    path = f"/{SERVICE_NAME}/{method}"
    try:
        if method in STREAMING_METHODS:
            call = channel.stream_stream(path)(iter(messages), timeout=timeout, metadata=metadata)
            return Outcome(grpc.StatusCode.OK, "", sum(1 for _ in call))
        channel.stream_unary(path)(iter(messages), timeout=timeout, metadata=metadata)
        return Outcome(grpc.StatusCode.OK, "", 1)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "")


class LogWatch(logging.Handler):
    """Collects the records of the service and of grpc at WARNING and above, and every record that
    carries a traceback, while it is entered."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info or record.exc_text:
            self.records.append(record)

    def __enter__(self) -> LogWatch:
        for name in ("proxyprefill", "grpc"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in ("proxyprefill", "grpc"):
            logging.getLogger(name).removeHandler(self)

    def lines(self) -> list[str]:
        return [f"{r.levelname} {r.name}: {r.getMessage()[:200]}" for r in self.records]


def tiny_model_config(model_dir, **overrides):
    """A server configuration on the tiny random Llama saved in `model_dir` (tests/_support.py):
    ProxyAttn runs sparse at once (dense_below_tokens 0, small budgets)."""
    from proxyprefill.service import config as config_mod

    values = dict(
        listen="127.0.0.1:0",
        model=str(model_dir),
        num_workers=1,
        dense_below_tokens=0,
        min_budget_tokens=128,
        min_budget_tokens_floor=128,
        default_chunk_size=256,
    )
    values.update(overrides)
    return config_mod.load(environ={}, **values)


def start_tiny_model_pool(model_dir, num_cpus: int = 2):
    """Local Ray and a one-worker pool on a freshly saved tiny random Llama (vocab 256, 2 layers)."""
    import ray

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from _support import save_tiny_llama

    from proxyprefill.workers.ray_pool import WorkerPool

    save_tiny_llama(model_dir, num_layers=2)
    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return WorkerPool.start(tiny_model_config(model_dir).engine_kwargs(), num_workers=1)


def make_certificate(directory: Path) -> tuple[Path, Path] | None:
    """(key, certificate) for localhost/127.0.0.1 made by openssl, or None without openssl."""
    import subprocess

    key, cert = directory / "key.pem", directory / "cert.pem"
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        capture_output=True,
    )  # fmt: skip
    return None if made.returncode else (key, cert)
