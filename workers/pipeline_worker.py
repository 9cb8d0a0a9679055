"""The service's sharded route: a Ray actor that runs requests on pipeline stages and answers the
server with the same calls, items and handles as a pool worker (workers/prefill_worker.PrefillWorker).

The server treats it as one more worker (named "pipeline"): `prefill` streams Progress messages
and one final message (workers/protocol.py), `fetch` streams a kept request's KV pieces,
`release` frees them, `cancel` stops a prefill, `stats` counts what it holds. Behind those calls
a `ShardedPrefill` (workers/pipeline.py)
per stage count holds the stage actors; the one with `max_stages` stages is started with this
actor, others on first use. A request's KV stays on its stages (gather=False) under the server's
handle until `release`; FetchKV gathers it from the stages in layer order.

`plan(...)` is the planner's verdict for one prompt (workers/planner.plan_prefill) from the prompt
length, the model shape, the memory each stage reports free and the pipeline's pending tokens.
Every stage already holds its weights, so only KV and activations count against free memory.

Faults: a stage that dies mid-request makes the request end with PrefillFailed("unavailable")
(the server answers UNAVAILABLE) after its KV was released on every surviving stage; Ray
restarts the stage (`max_restarts`), and the next request's calls wait for it. A kept request
whose stage restarted answers KVMissing and its remaining shares are freed at once.
"""

from __future__ import annotations

import logging

import numpy as np

from .protocol import KVMissing, KVUnavailable, PrefillDone, PrefillFailed, PrefillOptions, PrefillStopped
from .streaming import StreamingPrefills

log = logging.getLogger("proxyprefill.workers")

GIB = 1024**3


class PipelineWorker(StreamingPrefills):
    """The actor's body (wrapped with ray.remote by WorkerPool)."""

    def __init__(
        self,
        name: str,
        engine_kwargs: dict,
        max_stages: int,
        stage_options: dict,
        device: str,
        dtype: str,
        model_id: str,
        stage_memory_bytes: int = 0,
        request_timeout_s: float = 600.0,
    ):
        from .heap import keep_freed_memory

        keep_freed_memory()  # this actor's process (workers/heap.py)
        if max_stages < 2:
            raise ValueError(f"a pipeline needs at least 2 stages, got {max_stages}")
        self.name = name
        self.engine_kwargs = dict(engine_kwargs)
        self.max_stages = max_stages
        self.stage_options = dict(stage_options)
        self.device = device
        self.dtype = dtype
        self.model_id = model_id
        self.stage_memory_bytes = stage_memory_bytes
        self.request_timeout_s = request_timeout_s
        self._init_requests()
        self._pipelines: dict = {}  # stage count -> ShardedPrefill
        self._handles: dict[str, int] = {}  # kept handle -> stage count of its pipeline
        self._pipeline(max_stages)

    def _pipeline(self, num_stages: int):
        """The ShardedPrefill with `num_stages` stages, started (and its layers loaded) on first use."""
        from proxyprefill.workers.pipeline import ShardedPrefill

        with self._lock:
            pipe = self._pipelines.get(num_stages)
            if pipe is None:
                pipe = ShardedPrefill(
                    self.engine_kwargs.get("path"),
                    num_stages=num_stages,
                    attention=self.engine_kwargs.get("attention", "proxy"),
                    config=self.engine_kwargs.get("config"),
                    backend=self.engine_kwargs.get("backend", "auto"),
                    device=self.device,
                    dtype=self.dtype,
                    actor_options=self.stage_options,
                    model_id=self.model_id,
                )
                pipe.wait_ready(timeout_s=self.request_timeout_s)
                if self.stage_memory_bytes:
                    pipe.set_memory_limit(self.stage_memory_bytes)
                self._pipelines[num_stages] = pipe
            return pipe

    # description -----------------------------------------------------------------------------
    def describe(self) -> dict:
        pipe = self._pipeline(self.max_stages)
        return {
            "worker": self.name,
            "max_stages": self.max_stages,
            "layer_ranges": pipe.layer_ranges,
            "device": self.device,
        }

    def stage_actors(self, num_stages: int) -> list:
        """The stage actors of the `num_stages` pipeline (operators and tests inspect or kill them)."""
        return list(self._pipeline(num_stages).stages)

    def stats(self) -> dict:
        with self._lock:
            pipes = list(self._pipelines.values())
            running = self._running()
            handles = len(self._handles)
            outcomes = dict(self._outcomes)
        return {
            "worker": self.name,
            "running": running,
            "handles": handles,
            "kv_bytes": sum(sum(pipe.held_bytes()) for pipe in pipes),
            **{f"prefills_{kind}": count for kind, count in outcomes.items()},
        }

    # planning --------------------------------------------------------------------------------
    def plan(
        self,
        num_tokens: int,
        chunk_size: int,
        logits_rows: int,
        force_stages: int | None,
        pending_tokens: int,
        shard_above_tokens: int,
    ) -> dict:
        """{"stages": N, "reason": ...}, or {"refused": message, "needed_bytes", "available_bytes"}
        when no split fits (the server answers RESOURCE_EXHAUSTED before any work)."""
        import ray

        from proxyprefill.workers.planner import InsufficientResources, WorkerState, plan_prefill

        pipe = self._pipeline(self.max_stages)
        shape = ray.get(pipe.stages[0].model_shape.remote(), timeout=self.request_timeout_s)
        free = ray.get([stage.free_bytes.remote() for stage in pipe.stages], timeout=self.request_timeout_s)
        unknown = 1 << 62  # a stage that cannot tell its free memory is not the one to refuse
        workers = [
            WorkerState(i, unknown if f is None else int(f), pending_tokens, weights_resident=True)
            for i, f in enumerate(free)
        ]
        # a configured cap is what a stage may use; otherwise keep room for the CUDA context and
        # the allocator's fragmentation
        headroom = 0 if self.stage_memory_bytes or self.device == "cpu" else 2 * GIB
        try:
            plan = plan_prefill(
                num_tokens,
                shape,
                workers,
                chunk_tokens=chunk_size,
                logits_rows=logits_rows,
                force_stages=force_stages,
                shard_above_tokens=shard_above_tokens,
                headroom_bytes=headroom,
            )
        except InsufficientResources as error:
            return {
                "refused": str(error),
                "needed_bytes": int(error.needed_bytes),
                "available_bytes": int(error.available_bytes),
            }
        return {"stages": plan.num_stages, "reason": plan.reason}

    # prefill ---------------------------------------------------------------------------------
    def prefill(self, key: str, token_ids: np.ndarray, options: PrefillOptions):
        """Streaming generator of PrefillWorker.prefill's messages, over `options.stages` stages."""
        import torch

        from proxyprefill.workers.engine import PrefillCancelled
        from proxyprefill.workers.pipeline import StageUnavailableError
        from proxyprefill.workers.planner import InsufficientResources

        request = self._begin_request(key)
        stop = request.stop
        num_tokens, chunk_size = len(token_ids), options.chunk_size
        keep_handle = options.keep_handle
        request_id = keep_handle or key
        pipe = None

        def work(progress):
            nonlocal pipe

            def chunk_done(chunk: int) -> None:
                if stop.is_set():  # raised inside the pipeline's loop, which releases the stages' KV
                    raise PrefillCancelled(f"prefill {key} cancelled")
                progress(min(num_tokens, (chunk + 1) * chunk_size), num_tokens)

            pipe = self._pipeline(int(options.stages))
            return pipe.prefill(
                torch.from_numpy(np.array(token_ids, dtype=np.int64)),  # a writable copy
                chunk_size=chunk_size,
                logits=options.logits,
                gather=False,
                request_id=request_id,
                on_chunk_done=chunk_done,
                attention=options.attention,
                config=options.config,
                timeout_s=self.request_timeout_s,
            )

        def classify_error(error) -> PrefillFailed | None:
            if isinstance(error, InsufficientResources):
                return PrefillFailed("resource_exhausted", str(error))
            if isinstance(error, StageUnavailableError):
                log.warning("sharded prefill %s lost a stage: %s", key, error)
                return PrefillFailed("unavailable", f"a pipeline stage was lost; retry the request ({error})")
            return None

        try:
            ended, result = yield from self._stream_prefill(key, stop, work, classify_error)
            if result is not None and (ended is not None or not keep_handle):
                pipe.release(request_id)  # nobody will fetch it
            if ended is not None:
                yield ended
                return
            yield self._keep(result, keep_handle, pipe, stop)
        finally:
            self._end_request(key, request)

    def _keep(self, result, keep_handle: str | None, pipe, stop) -> PrefillDone | PrefillStopped:
        """Records where the stages keep the KV of `keep_handle` (unless the prefill was abandoned
        meanwhile, when keeping it would leak it); the final message."""
        if keep_handle:
            with self._lock:
                abandoned = stop.is_set()
                if abandoned:
                    stopped = self._stop_after_finishing()
                else:
                    self._handles[keep_handle] = pipe.num_stages
            if abandoned:
                pipe.release(keep_handle)
                return stopped
        return PrefillDone.from_result(result, kv_bytes=result.extra["kv_bytes"])

    # KV --------------------------------------------------------------------------------------
    def fetch(
        self,
        handle: str,
        max_chunk_bytes: int,
        layer_start: int = 0,
        layer_end: int | None = None,
        include_token_ids: bool = False,
    ):
        """Streaming generator with PrefillWorker.fetch's items, gathered from the stages in layer
        order; KVUnavailable when a stage dies mid-stream."""
        from proxyprefill.workers.pipeline import StageUnavailableError

        with self._lock:
            stages = self._handles.get(handle)
        if stages is None:
            yield KVMissing()
            return
        pipe = self._pipelines[stages]
        try:
            for item in pipe.fetch(
                handle, max_chunk_bytes, layer_start, layer_end, include_token_ids, self.request_timeout_s
            ):
                if isinstance(item, KVMissing):  # a stage restarted: the shares left elsewhere are useless
                    self.release(handle)
                yield item
        except StageUnavailableError as error:
            yield KVUnavailable(f"a pipeline stage was lost: {error}")

    def release(self, handle: str) -> int:
        """Frees the KV of `handle` on every stage; returns its bytes (0 when it was not here)."""
        with self._lock:
            stages = self._handles.pop(handle, None)
        if stages is None:
            return 0
        return self._pipelines[stages].release(handle)

    def kv_tensors(self, handle: str) -> dict | None:
        """The kept KV as CPU tensors, layer by layer from the stages (tests compare transfers)."""
        with self._lock:
            stages = self._handles.get(handle)
        if stages is None:
            return None
        keys, values = [], []
        for _, k, v in self._pipelines[stages].gather_kv(handle):
            keys.append(k)
            values.append(v)
        return {"keys": keys, "values": values}

    def shutdown(self) -> None:
        with self._lock:
            pipes, self._pipelines = list(self._pipelines.values()), {}
        for pipe in pipes:
            pipe.shutdown()
