"""Ray worker pool: one actor per GPU (or one CPU worker), each holding a PrefillEngine and the KV
it produced.

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
  (`channel_endpoint`, workers/channel.py), not through Ray: a Ray streaming call was 8.5 of
  the 22 ms a 32k request spent outside the engine on an H200 host (workers/channel.py).
- `fetch(handle, ...)` yields the KV of a handle in pieces of at most `max_chunk_bytes` (keys +
  values of one layer and one token range, workers/kv_wire.py), never pickled tensors.
  A fetch that the server cancels (`ray.cancel` of the stream) ends at its next piece. The
  generator runs up to 8 pieces ahead of the server (`WorkerPool.fetch`'s backpressure), so the
  copy of the next pieces to host memory overlaps the sending of the current one.

KV kept for a handle stays in the actor until `release(handle)`, which waits for fetches of that
handle in flight to end (they finish normally; later fetches find it missing). Leases (who may
use a handle, until when, the memory cap) are the server's business (service/leases.py): the
actor only stores and serves. `ping()` answers the actor's incarnation, a random id drawn when
it starts: a new one means a restart, which lost every stored KV.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from .kv_wire import layer_pieces, token_pieces
from .protocol import KVMissing, PrefillDone, PrefillOptions, WorkerDescription
from .streaming import StreamingPrefills

log = logging.getLogger("proxyprefill.workers")

RELEASE_WAIT_SECONDS = 30.0  # how long release waits for the fetches of its handle in flight
# glibc gives every thread that allocates its own malloc arena; a few arenas are enough for a
# worker and keep freed KV from staying mapped in dozens of them
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


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
        from proxyprefill.workers.kv_share import CudaExports

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


@dataclass
class WorkerState:
    """What one probe of a worker found: `alive` when it answered, with its `incarnation`;
    `gone` when it is dead for good (Ray will not restart it; the pool must replace it); `ready`
    once it has warmed up (an alive worker that is not ready gets no requests)."""

    alive: bool
    incarnation: str | None = None
    gone: bool = False
    ready: bool = True  # its start-up warm-up is over


PROBE_SECONDS = 10.0  # a worker that does not answer a ping within this is reported not alive
_WORKER_RESTARTS = 3  # restarts Ray makes by itself; after those the server replaces the actor


class WorkerPool:
    """The actors plus what the server needs to route to them. `prefill` is an async generator of
    the worker's messages; the other methods return Ray refs or ObjectRefGenerators, which the
    server awaits / iterates asynchronously."""

    def __init__(
        self,
        actors: list,
        descriptions: list[WorkerDescription],
        owns_ray: bool,
        pipeline=None,
        make_actor=None,
    ):
        self.actors = actors  # the replicas, each holding the whole model
        self.descriptions = descriptions
        self.names = [d.worker for d in descriptions]
        self._owns_ray = owns_ray
        self._make_actor = make_actor  # name -> a new replica actor (replace())
        self._channels: dict = {}  # replica index -> its channel.ChannelClient, once asked
        self._replace_lock = threading.Lock()
        # the sharded route (workers/pipeline_worker.py), addressed as one more worker after the
        # replicas: index `pipeline_index`, name "pipeline"
        self.pipeline = pipeline
        self.pipeline_index: int | None = None
        if pipeline is not None:
            self.pipeline_index = len(actors)
            self.names.append("pipeline")

    def _actor(self, worker: int):
        return self.pipeline if worker == self.pipeline_index else self.actors[worker]

    @classmethod
    def start(
        cls,
        engine_kwargs: dict,
        num_workers: int = 0,
        ray_address: str | None = None,
        ray_num_cpus: int | None = None,
        max_concurrency: int = 64,
        pipeline_workers: int = 0,
        pipeline_stage_memory_bytes: int = 0,
        stage_cpus: float = 0.5,
        warm_up: WarmUpPlan | None = None,
    ) -> WorkerPool:
        """Starts Ray in-process (or joins `ray_address`) unless it is already initialised, then
        one actor per GPU, or `num_workers` (default 1) CPU actors when the cluster has no GPU.

        pipeline_workers >= 2 also starts the sharded route: that many stage actors (one GPU
        each; `stage_cpus` CPUs each on a CPU cluster), each capped at
        `pipeline_stage_memory_bytes` for requests when that is set. The replicas then get the GPUs
        (or CPUs) the stages leave. `warm_up`: each replica warms up after its model loads and
        reports ready afterwards (WorkerState.ready); start() does not wait for it."""
        import ray

        owns_ray = False
        if not ray.is_initialized():
            ray.init(
                address=ray_address,
                num_cpus=None if ray_address else ray_num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
            owns_ray = True
        gpus = int(ray.cluster_resources().get("GPU", 0))
        stages = pipeline_workers if pipeline_workers >= 2 else 0
        count = num_workers or max(1, gpus - stages)
        if gpus:
            per_actor = {"num_gpus": 1, "num_cpus": 1}
            stage_options = {"num_gpus": 1, "num_cpus": 1}
        else:
            # CPU workers share the cores; Ray sets each actor's OMP/torch threads to its num_cpus
            cpus = ray.cluster_resources().get("CPU", 1)
            per_actor = {"num_cpus": max(1, int(cpus - stages * stage_cpus) // count)}
            stage_options = {"num_cpus": stage_cpus}
        actor_class = ray.remote(PrefillWorker).options(
            max_concurrency=max_concurrency,
            max_restarts=_WORKER_RESTARTS,
            max_task_retries=0,
            runtime_env={"env_vars": WORKER_ENV},
            **per_actor,
        )

        def make_actor(name: str):
            return actor_class.remote(name, engine_kwargs, warm_up=warm_up)

        actors = [make_actor(f"worker-{i}") for i in range(count)]
        descriptions = ray.get([actor.describe.remote() for actor in actors])
        pipeline = None
        if stages:
            from .pipeline_worker import PipelineWorker

            first = descriptions[0]
            device = "cuda" if gpus else "cpu"
            pipeline = (
                ray.remote(PipelineWorker)
                .options(
                    max_concurrency=max_concurrency,
                    max_restarts=_WORKER_RESTARTS,
                    max_task_retries=0,
                    num_cpus=0,
                    runtime_env={"env_vars": WORKER_ENV},
                )
                .remote(
                    "pipeline",
                    engine_kwargs,
                    stages,
                    stage_options,
                    device,
                    first.model.dtype,
                    first.model.model_id,
                    pipeline_stage_memory_bytes,
                )
            )
            ray.get(pipeline.describe.remote())  # stages started and their layers loaded
        return cls(actors, descriptions, owns_ray, pipeline, make_actor)

    @property
    def description(self) -> WorkerDescription:
        """What the pool serves (every worker loads the same model)."""
        return self.descriptions[0]

    def tokenizer(self):
        import ray

        return ray.get(self.actors[0].tokenizer.remote())

    async def prefill(self, worker: int, key: str, token_ids: np.ndarray, options: PrefillOptions):
        """Async generator of the worker's prefill messages (protocol.Progress, then one final
        message): over a replica's direct channel, or the pipeline's Ray stream."""
        from .channel import ChannelUnreachable

        if worker == self.pipeline_index:
            stream = self.pipeline.prefill.options(num_returns="streaming").remote(key, token_ids, options)
            async for ref in stream:
                yield await ref
            return
        for attempt in range(2):
            # a restarted replica listens elsewhere: ask it again once (nothing was sent yet)
            channel = await self._channel(worker, fresh=attempt > 0)
            try:
                async with contextlib.aclosing(channel.prefill(key, token_ids, options)) as messages:
                    async for message in messages:
                        yield message
                return
            except ChannelUnreachable:
                if attempt:
                    raise

    async def _channel(self, worker: int, fresh: bool):
        """The replica's channel.ChannelClient, asking the replica where it listens when none is
        known or `fresh` is asked for."""
        from .channel import ChannelClient

        channel = None if fresh else self._channels.get(worker)
        if channel is None:
            endpoint = await self.actors[worker].channel_endpoint.remote()
            channel = self._channels.get(worker)
            if channel is None or channel.endpoint != endpoint:  # not already known by a call meanwhile
                self._forget_channel(worker)
                channel = self._channels[worker] = ChannelClient(endpoint)
        return channel

    def _forget_channel(self, worker: int) -> None:
        channel = self._channels.pop(worker, None)
        if channel is not None:
            channel.close()

    def cancel(self, worker: int, key: str):
        return self._actor(worker).cancel.remote(key)

    def abandon(self, worker: int, key: str, keep_handle: str | None):
        """Stops prefill `key` and frees its kept KV once it has ended (PrefillWorker.abandon)."""
        return self._actor(worker).abandon.remote(key, keep_handle)

    def cancel_stream(self, stream) -> None:
        """Stops a fetch stream the server no longer reads (the worker ends it at its next piece)."""
        import ray

        try:
            ray.cancel(stream)
        except Exception as error:  # already finished, or its worker is gone
            log.debug("cancelling a fetch stream: %s", error)

    async def probe(self, worker: int, timeout: float = PROBE_SECONDS) -> WorkerState:
        """Pings a worker: alive with its incarnation and readiness, or not alive (restarting,
        busy beyond `timeout`), or gone for good."""
        import asyncio

        import ray

        try:
            incarnation, ready = await asyncio.wait_for(self._actor(worker).probe_state.remote(), timeout)
        except ray.exceptions.ActorDiedError:
            return WorkerState(alive=False, gone=True)  # new calls to a restarting actor wait instead
        except (TimeoutError, ray.exceptions.RayError):
            return WorkerState(alive=False)
        channel = self._channels.get(worker)
        if channel is not None and channel.endpoint.incarnation != incarnation:  # restarted: ask anew
            self._forget_channel(worker)
        return WorkerState(alive=True, incarnation=incarnation, ready=ready)

    def replace(self, worker: int) -> None:
        """Starts a new actor for a replica that is gone for good (blocking: it loads the model);
        does nothing when the actor there answers (another server on this pool replaced it)."""
        import ray

        if worker == self.pipeline_index or self._make_actor is None:
            raise ValueError(f"worker {worker} cannot be replaced")
        with self._replace_lock:
            current = self.actors[worker]
            try:
                ray.get(current.ping.remote(), timeout=5)
                return
            except ray.exceptions.RayError:  # dead, or not answering (GetTimeoutError)
                pass
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(current, no_restart=True)
            actor = self._make_actor(self.names[worker])
            ray.get(actor.ping.remote())
            self.actors[worker] = actor
            self._forget_channel(worker)
        log.warning("replaced %s, which was gone for good", self.names[worker])

    def fetch(
        self, worker: int, handle: str, max_chunk_bytes: int, layer_start, layer_end, include_token_ids
    ):
        return (
            self._actor(worker)
            .fetch.options(num_returns="streaming", _generator_backpressure_num_objects=8)
            .remote(handle, max_chunk_bytes, layer_start, layer_end, include_token_ids)
        )

    def release(self, worker: int, handle: str):
        return self._actor(worker).release.remote(handle)

    def share(self, worker: int, handle: str, transport: str, consumer=None):
        return self._actor(worker).share.remote(handle, transport, consumer)

    def push(self, worker: int, handle: str, target):
        return self._actor(worker).push.remote(handle, target)

    def stats(self, worker: int):
        return self._actor(worker).stats.remote()

    def kv_tensors(self, worker: int, handle: str):
        return self._actor(worker).kv_tensors.remote(handle)

    def plan(self, num_tokens, chunk_size, logits_rows, force_stages, pending_tokens, shard_above_tokens):
        """The planner's verdict for one prompt (PipelineWorker.plan); a Ray ref."""
        return self.pipeline.plan.remote(
            num_tokens, chunk_size, logits_rows, force_stages, pending_tokens, shard_above_tokens
        )

    def stage_actors(self, num_stages: int):
        return self.pipeline.stage_actors.remote(num_stages)

    def shutdown(self) -> None:
        import ray

        if self.pipeline is not None:
            try:
                ray.get(self.pipeline.shutdown.remote(), timeout=60)
            except ray.exceptions.RayError:
                pass  # its stages go with it: they are its actors
            ray.kill(self.pipeline)
            self.pipeline = None
        for worker in list(self._channels):
            self._forget_channel(worker)
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
