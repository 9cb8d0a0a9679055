"""The pool of prefill workers the server routes to: one Ray actor per GPU (or `num_workers` CPU
actors), each a workers/prefill_worker.PrefillWorker, plus the sharded route
(workers/pipeline_worker.py) when it is on.

`WorkerPool` starts the actors and turns the server's calls into theirs: `prefill` goes over the
worker's direct channel (workers/channel.py; a Ray streaming call was 8.5 of the 22 ms a 32k
request spent outside the engine on an H200 host), the rest are Ray calls and streams (`fetch`
with backpressure, so that the worker copies the next pieces while the server sends the current
one). `probe` reads a worker's incarnation and readiness for the server's watch; `replace` starts
a new actor for one that is gone for good.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

import numpy as np

from .channel import ChannelClient, ChannelUnreachable
from .prefill_worker import PrefillWorker, WarmUpPlan
from .protocol import PrefillOptions, WorkerDescription

log = logging.getLogger("proxyprefill.workers")

# glibc gives every thread that allocates its own malloc arena; a few arenas are enough for a
# worker and keep freed KV from staying mapped in dozens of them
WORKER_ENV = {"MALLOC_ARENA_MAX": "2"}


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
