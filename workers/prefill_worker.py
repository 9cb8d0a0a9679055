"""The prefill worker: the body of a Ray actor (one per GPU, or one CPU worker; workers/ray_pool.py
starts them) holding a PrefillEngine and the KV it produced.

The actor is *threaded* (`max_concurrency`): a prefill runs in one thread while others answer
`cancel`, `fetch` and `release`. Two methods stream (`prefill` over the worker's direct channel,
`fetch` as a Ray streaming generator, `num_returns="streaming"`):

- `prefill(key, token_ids, options)` takes a `protocol.PrefillOptions` and yields a
  `protocol.Progress` after every chunk, then one final message (`PrefillDone`,
  `PrefillStopped` or `PrefillFailed`; workers/protocol.py). The engine runs on one of a few
  reused helper threads (workers/streaming.py). `cancel(key)` sets the request's stop flag,
  which the engine checks between layers; the
  partial KV is dropped with the engine's locals, so memory is freed when the prefill stops.
  `abandon(key, handle)` is what the server calls when the client went away: it stops the
  prefill, *waits until it has really ended*, and frees whatever KV it kept, so that the
  server holds the request's slot until the worker is idle and no KV outlives its request.
  The server calls `prefill` over a TCP channel the worker opens on first use
  (`channel_endpoint`, workers/channel.py), not through Ray (workers/ray_pool.py says why).
- `fetch(handle, ...)` yields the KV of a handle in pieces of at most `max_chunk_bytes` (keys +
  values of one layer and one token range, workers/kv_wire.py), never pickled tensors.
  A fetch that the server cancels (`ray.cancel` of the stream) ends at its next piece. The
  generator runs up to 8 pieces ahead of the server (WorkerPool.fetch's backpressure), so the
  copy of the next pieces to host memory overlaps the sending of the current one.

KV kept for a handle stays in the actor until `release(handle)`, which waits for fetches of that
handle in flight to end (they finish normally; later fetches find it missing). Leases (who may
use a handle, until when, the memory cap) are the server's business (service/leases.py): the
actor only stores and serves. `ping()` answers the actor's incarnation, a random id drawn when
it starts: a new one means a restart, which lost every stored KV.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from .kv_wire import layer_pieces, token_pieces
from .protocol import KVMissing, PrefillDone, PrefillOptions, WorkerDescription
from .streaming import StreamingPrefills

log = logging.getLogger("proxyprefill.workers")

RELEASE_WAIT_SECONDS = 30.0  # how long release waits for the fetches of its handle in flight


@dataclass
class StoredKV:
    keys: list  # per layer [Hkv, N, d] torch tensors
    values: list
    token_ids: np.ndarray  # int64 [N]
    header: dict
    nbytes: int
    shares: dict = field(default_factory=dict)  # transport -> SharedKV (workers/kv_share.py)
    readers: int = 0  # fetches in flight


def resident_bytes() -> int:
    """This process's resident memory (VmRSS), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_allocated_bytes() -> int:
    """Bytes this process holds in torch's CUDA allocator (0 without CUDA): what a lease that
    ends must give back."""
    import torch

    return torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0


def task_cancelled() -> bool:
    """Whether the server cancelled the Ray task running this code (False outside Ray)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().is_canceled()
    except Exception:  # not inside a Ray task
        return False


@dataclass(frozen=True)
class WarmUpPlan:
    """The start-up warm-up a worker runs before it reports ready (PrefillEngine.warm_up).

    mode: "on", "off", or "auto" (on when the engine runs on CUDA, where kernels are compiled);
    chunk_size: the chunk requests use by default; max_tokens: the longest prompt accepted
    (0: the model's max_position_embeddings)."""

    mode: str = "auto"
    chunk_size: int = 8192
    max_tokens: int = 0

    def wanted(self, device_type: str) -> bool:
        return self.mode == "on" or (self.mode == "auto" and device_type == "cuda")


class PrefillWorker(StreamingPrefills):
    """The actor's body (wrapped with ray.remote by WorkerPool; usable directly in-process).

    With a WarmUpPlan the engine warms up in a thread after the model loads; until it is done
    `probe_state` answers not ready (the server routes nothing to it and, with no other worker
    ready, reports NOT_SERVING). A failed warm-up is logged and leaves the worker serving cold."""

    def __init__(
        self,
        name: str,
        engine_kwargs: dict,
        torch_threads: int | None = None,
        warm_up: WarmUpPlan | None = None,
    ):
        import torch

        from proxyprefill.workers.engine import PrefillEngine
        from proxyprefill.workers.heap import keep_freed_memory
        from proxyprefill.workers.kv_share import CudaExports

        keep_freed_memory()  # this actor's process: every request's buffers, reused (workers/heap.py)
        if torch_threads:
            torch.set_num_threads(torch_threads)
        kwargs = dict(engine_kwargs)
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        self.name = name
        self.engine = PrefillEngine.from_pretrained(**kwargs)
        self._init_requests()
        self._kv: dict[str, StoredKV] = {}
        self._cuda_exports = CudaExports()  # what decoders mapped over CUDA IPC, until they let go
        self._channel = None  # channel.PrefillChannel, once the server asked for it
        self._fetching = 0  # fetches in flight, all handles
        self._reader_left = threading.Condition(self._lock)
        self.warm_up_report = None  # engine.WarmUpReport once warmed up
        self.warm_up_error = ""
        if warm_up is not None and warm_up.wanted(self.engine.device.type):
            self.warmed_up.clear()
            threading.Thread(target=self._warm_up, args=(warm_up,), name="warm-up", daemon=True).start()

    def _warm_up(self, plan: WarmUpPlan) -> None:
        try:
            self.warm_up_report = self.engine.warm_up(
                plan.chunk_size,
                plan.max_tokens or None,
                progress=lambda message: log.info("%s %s", self.name, message),
            )
        except Exception as error:  # serve cold rather than not at all
            self.warm_up_error = f"{type(error).__name__}: {error}"
            log.exception("%s: warm-up failed; serving without it", self.name)
        finally:
            self.warmed_up.set()

    # description -----------------------------------------------------------------------------
    def describe(self) -> WorkerDescription:
        import torch

        return WorkerDescription(
            model=self.engine.model_info,
            worker=self.name,
            device=str(self.engine.device),
            has_tokenizer=self.engine.tokenizer is not None,
            torch_threads=torch.get_num_threads(),
            profile=self.engine.profile.name if self.engine.profile is not None else "",
        )

    def tokenizer(self):
        return self.engine.tokenizer

    def channel_endpoint(self):
        """Where the server calls `prefill` directly (a channel.ChannelEndpoint; the channel
        starts on the first ask)."""
        from proxyprefill.workers.channel import PrefillChannel

        with self._lock:
            if self._channel is None:
                self._channel = PrefillChannel(self.prefill, self.incarnation)
            return self._channel.endpoint

    def stats(self) -> dict:
        with self._lock:
            return {
                "worker": self.name,
                "running": self._running(),
                "handles": len(self._kv),
                "kv_bytes": sum(s.nbytes for s in self._kv.values()),
                "fetching": self._fetching,
                "threads": threading.active_count(),
                "rss_bytes": resident_bytes(),
                "gpu_bytes": gpu_allocated_bytes(),
                "warmed_up": self.warmed_up.is_set(),
                "warm_up_seconds": None if self.warm_up_report is None else self.warm_up_report.seconds,
                "warm_up_error": self.warm_up_error,
                **{f"prefills_{kind}": count for kind, count in self._outcomes.items()},
            }

    # prefill ---------------------------------------------------------------------------------
    def prefill(self, key: str, token_ids: np.ndarray, options: PrefillOptions):
        """Streaming generator of protocol messages; see the module docstring."""
        import torch

        request = self._begin_request(key)
        stop = request.stop

        def work(progress):
            return self.engine.prefill(
                torch.from_numpy(np.array(token_ids, dtype=np.int64)),  # a writable copy
                chunk_size=options.chunk_size,
                logits=options.logits,
                config=options.config,
                attention=options.attention,
                progress=progress,
                should_stop=stop.is_set,
            )

        try:
            ended, result = yield from self._stream_prefill(key, stop, work)
            # a cancelled prefill's KV is dropped with the result
            yield ended if ended is not None else self._finish(result, token_ids, options.keep_handle, stop)
        finally:
            self._end_request(key, request)

    def _finish(self, result, token_ids: np.ndarray, keep_handle: str | None, stop: threading.Event):
        """Keeps the KV under `keep_handle` (unless the prefill was abandoned meanwhile, when
        keeping it would leak it); the final message."""
        done = PrefillDone.from_result(result)
        if keep_handle:
            with self._lock:
                if stop.is_set():
                    return self._stop_after_finishing()
                self._kv[keep_handle] = StoredKV(
                    keys=result.keys,
                    values=result.values,
                    token_ids=np.asarray(token_ids, dtype=np.int64),
                    header=done.header,
                    nbytes=result.kv_bytes,
                )
        return done

    # KV --------------------------------------------------------------------------------------
    def fetch(
        self,
        handle: str,
        max_chunk_bytes: int,
        layer_start: int = 0,
        layer_end: int | None = None,
        include_token_ids: bool = False,
    ):
        """Streaming generator of KV pieces (keys/values as numpy arrays, token ids as bytes); the
        first item is protocol.KVMissing when the handle is not here (released, or the worker
        restarted)."""
        with self._lock:
            stored = self._kv.get(handle)
            if stored is not None:
                stored.readers += 1
                self._fetching += 1
        if stored is None:
            yield KVMissing()
            return
        try:
            yield from self._kv_pieces(stored, max_chunk_bytes, layer_start, layer_end, include_token_ids)
        finally:
            with self._lock:
                stored.readers -= 1
                self._fetching -= 1
                self._reader_left.notify_all()

    @staticmethod
    def _kv_pieces(stored: StoredKV, max_chunk_bytes, layer_start, layer_end, include_token_ids):
        """fetch's items; stops early when the server cancelled the stream."""
        if include_token_ids:
            yield from token_pieces(stored.token_ids, max_chunk_bytes)
        layer_end = len(stored.keys) if layer_end is None else layer_end
        for layer in range(layer_start, layer_end):
            for piece in layer_pieces(layer, stored.keys[layer], stored.values[layer], max_chunk_bytes):
                if task_cancelled():
                    return
                yield piece

    def share(self, handle: str, transport: str, consumer=None):
        """A KVShare through which a process on this host (`consumer`, a kv_share.ProcessRef)
        maps the KV of `handle`, or None when the handle is not here. A shared-memory segment is
        made once per handle and kept until release; CUDA IPC handles are exported anew for
        each consumer (workers/kv_share.py says why)."""
        from proxyprefill.workers.kv_share import CUDA_IPC, share_kv

        with self._lock:
            stored = self._kv.get(handle)
            if stored is None:
                return None
            shared = stored.shares.get(transport)
            if shared is None:
                shared = share_kv(
                    stored.keys, stored.values, stored.token_ids, transport, name=f"proxyprefill-{handle}"
                )
                if shared.share.transport == CUDA_IPC:
                    self._cuda_exports.add(shared, consumer)
                    return shared.share
                stored.shares[transport] = shared
                stored.shares[shared.share.transport] = shared  # "" (auto) and its pick
        return shared.share

    def probe_state(self) -> tuple[str, bool]:
        self._cuda_exports.reap()  # the server's watch calls this every few seconds
        return super().probe_state()

    def push(self, handle: str, target) -> int | None:
        """Sends the KV of `handle` to a receiver (workers/kv_push.py); the bytes sent, or None
        when the handle is not here."""
        from proxyprefill.workers.kv_push import push_kv

        with self._lock:
            stored = self._kv.get(handle)
            if stored is not None:
                stored.readers += 1  # a release waits for the push as for a fetch
        if stored is None:
            return None
        try:
            return push_kv(stored.keys, stored.values, target)
        finally:
            with self._lock:
                stored.readers -= 1
                self._reader_left.notify_all()

    def release(self, handle: str, wait_seconds: float = RELEASE_WAIT_SECONDS) -> int:
        """Frees the KV of `handle` and unlinks its shares once the fetches and pushes of it in
        flight have ended (waiting up to `wait_seconds`; later fetches find it missing); returns
        its bytes (0 when it was not here)."""
        with self._lock:
            stored = self._kv.pop(handle, None)
            if stored is None:
                return 0
            if not self._reader_left.wait_for(lambda: stored.readers == 0, wait_seconds):
                log.warning("released %s with %d fetches still reading it", handle[:8], stored.readers)
            for shared in stored.shares.values():
                shared.close()  # unlinks the segment; mappings already made stay valid
        nbytes, stored = stored.nbytes, None  # a fetch still reading (past the wait) keeps its own
        self._cuda_exports.reap()
        self._empty_device_cache()
        return nbytes

    def kv_tensors(self, handle: str) -> dict | None:
        """The stored KV as CPU tensors (tests compare transfers against it bit for bit)."""
        with self._lock:
            stored = self._kv.get(handle)
        if stored is None:
            return None
        return {
            "keys": [k.detach().to("cpu") for k in stored.keys],
            "values": [v.detach().to("cpu") for v in stored.values],
            "token_ids": stored.token_ids,
            "header": stored.header,
        }

    def _empty_device_cache(self) -> None:
        import torch

        if self.engine.device.type == "cuda":
            torch.cuda.ipc_collect()  # exported blocks whose consumers let go: freed now, not later
            torch.cuda.empty_cache()
