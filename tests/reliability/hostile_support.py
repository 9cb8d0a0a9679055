"""What the hostile-input and security tests and the full campaign share: a pool that computes
nothing (so the server runs without Ray), raw calls that send any bytes and any number of request
messages, and which statuses count as a refusal."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from proxyprefill.service.server import SERVICE_NAME

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
METHODS = ("Prefill", "FetchKV", "RenewLease", "ReleaseKV", "GetModelInfo")
NULL_POOL_MESSAGE = "the null pool computes nothing"


class NullPool:
    """A one-worker pool with a tiny model description whose worker answers every prefill with
    an 'invalid' error item; `calls` records what reached it."""

    names = ["worker-0"]
    actors = [None]
    model_info = dict(
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
        has_tokenizer=False,
    )

    def __init__(self):
        self.calls: list[str] = []

    def prefill(self, worker, key, token_ids, options):
        self.calls.append("prefill")
        return _items({"kind": "error", "error": "invalid", "message": NULL_POOL_MESSAGE})

    def fetch(self, worker, handle, *args):
        self.calls.append("fetch")
        return _items({"kind": "missing"})

    def cancel(self, worker, key):
        self.calls.append("cancel")

    async def release(self, worker, handle):
        self.calls.append("release")
        return 0


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
