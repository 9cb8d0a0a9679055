"""What the server asks of a worker and what the worker answers: typed messages, one home.

A prefill is asked with `PrefillOptions` and answered by a stream (a replica's direct channel,
workers/channel.py, or the pipeline's Ray streaming generator) that yields a `Progress` after
every chunk, then exactly one final message:

    PrefillDone       the prefill finished; its KV is kept under `options.keep_handle`, if any
    PrefillStopped    it was cancelled (or abandoned); nothing is kept
    PrefillFailed     it could not run; `error` names the kind (`ERROR_KINDS`), `message` says why

A KV fetch stream yields the pieces of kv_wire (`layer_pieces`, `token_pieces`), or first
`KVMissing` when the worker no longer holds the KV, or `KVUnavailable` when a pipeline stage
died while streaming. Both worker kinds (workers/prefill_worker.py, workers/pipeline_worker.py) answer
in these messages, and the server (service/server.py, service/kv_handles.py) reads only them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from proxyprefill.kernels.config import ProxyAttnConfig

from .model import ModelInfo

# PrefillFailed.error: what went wrong, which the server maps to a status
ERROR_KINDS = ("invalid", "unavailable", "resource_exhausted", "internal")


@dataclass(frozen=True)
class WorkerDescription:
    """What a pool worker says about itself once it has loaded its model."""

    model: ModelInfo
    worker: str  # its name, e.g. "worker-0"
    device: str  # where its engine runs, e.g. "cuda:0"
    has_tokenizer: bool
    torch_threads: int = 0
    profile: str = ""  # the calibrated profile it serves by default, "" when none


@dataclass(frozen=True)
class PrefillOptions:
    """How to prefill one request.

    attention/config None: the worker's defaults (its calibrated profile when it has one).
    keep_handle: where the worker keeps the KV afterwards (None: it is dropped).
    stages: the number of pipeline stages, read by the sharded route only.
    """

    chunk_size: int
    logits: str | list[int]
    attention: str | None = None
    config: ProxyAttnConfig | None = None
    keep_handle: str | None = None
    stages: int = 1


@dataclass(frozen=True)
class Progress:
    done: int  # tokens prefilled so far
    total: int


def narrowest_logits(result) -> tuple[np.ndarray, str]:
    """The result's float32 logits as raw values of the model's dtype when that loses nothing,
    else float32. The LM head runs in the model's dtype (the KV header's), so a bfloat16 model's
    logits are bfloat16 values widened: sent as they were made they are exact at half the bytes
    (256 KB instead of 513 KB for a 128k vocabulary, which every request with logits carries from
    the worker to the client)."""
    from .kv_wire import exact_narrowing

    logits = result.logits.detach().to("cpu").float().numpy()
    narrowed = exact_narrowing(logits, result.header.dtype)
    return (logits, "float32") if narrowed is None else (narrowed, result.header.dtype)


@dataclass(frozen=True)
class PrefillDone:
    """The outcome of a finished prefill. header: the KV compatibility header (kv_files.KVHeader
    fields); logits: [len(logit_positions), vocab] or None, raw values of `logits_dtype` (numpy
    holds bfloat16 as its bit patterns, int16); sparsity: [L, Hq]."""

    num_tokens: int
    logits: np.ndarray | None
    logit_positions: list[int]
    sparsity: np.ndarray
    estimate_seconds: float
    attention_seconds: float
    total_seconds: float
    peak_memory_bytes: int
    kv_bytes: int
    header: dict
    attention: str
    profile: str = ""  # the calibrated profile whose settings served, "" when none did
    logits_dtype: str = "float32"

    @classmethod
    def from_result(cls, result, kv_bytes: int | None = None) -> PrefillDone:
        """The message for an engine's or a pipeline's PrefillResult (kv_bytes: the bytes kept,
        where the result's own keys are not where the KV lives)."""
        logits, logits_dtype = (None, "float32") if result.logits is None else narrowest_logits(result)
        return cls(
            num_tokens=int(result.token_ids.numel()),
            logits=logits,
            logits_dtype=logits_dtype,
            logit_positions=list(result.logit_positions),
            sparsity=result.sparsity.detach().to("cpu").float().numpy(),
            estimate_seconds=float(result.estimate_seconds),
            attention_seconds=float(result.attention_seconds),
            total_seconds=float(result.total_seconds),
            peak_memory_bytes=int(result.peak_memory_bytes or 0),
            kv_bytes=int(result.kv_bytes if kv_bytes is None else kv_bytes),
            header=asdict(result.header),
            attention=result.attention,
            profile=result.profile,
        )


@dataclass(frozen=True)
class PrefillStopped:
    """The prefill was cancelled before it finished; its KV is gone."""


@dataclass(frozen=True)
class PrefillFailed:
    error: str  # one of ERROR_KINDS
    message: str


PrefillOutcome = PrefillDone | PrefillStopped | PrefillFailed


@dataclass(frozen=True)
class KVMissing:
    """The worker does not hold the KV asked for (released, expired, or the worker restarted)."""


@dataclass(frozen=True)
class KVUnavailable:
    """A pipeline stage died while its KV was streaming; the request's KV is gone."""

    message: str
