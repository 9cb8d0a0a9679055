"""Chunked pipeline sharding: one long prompt spread over several Ray workers by layers.

This module is the driver (`ShardedPrefill`); a stage is `workers/pipeline_stage.py`, what it
loads `workers/stage_model.py`, its timings `workers/pipeline_timeline.py`, and how many stages a
prompt gets `workers/planner.py`.

Each worker (a *stage*) owns a contiguous range of decoder layers and the KV cache of those
layers. Stage 0 also embeds the tokens; the last stage also applies the final norm and the LM
head at the positions asked for. The prompt is cut into chunks of `chunk_size` tokens, and chunk
c flows stage 0 -> stage 1 -> ... -> stage S-1. Ray runs an actor's calls one at a time in
submission order, so once the driver has chained the calls of several chunks, stage 1 works on
chunk c while stage 0 already works on chunk c+1: a pipeline whose fill and drain cost
(S-1) chunk-steps (the *bubble*); with C equal chunks the idle fraction is (S-1)/(C+S-1).

Why chunked *pipeline* and not sequence sharding: ProxyAttn's block estimation for a chunk needs
every earlier key of the same layer, and with layer sharding those keys never leave the stage.
Only the chunk's hidden states ([chunk, hidden] per chunk) move between stages.

Transport (`ShardedPrefill(transport=...)`), every moved byte counted in the timeline:
- "object_store" (default): a stage returns its output as a CPU tensor, Ray hands it to the next
  stage's call (chained object refs), which copies it to its device. Works everywhere.
- "collective": the stages form a torch.distributed group (NCCL on GPUs, gloo on the CPU) and
  send/recv the hidden states rank to rank (one send in flight, so a stage computes the next
  chunk while the last one is on the wire); the driver only orders the calls. A dead peer would
  leave a survivor waiting in recv, so on any failure all stages are restarted and the group is
  formed anew before the next request.

Faults: every wait on a stage has a timeout; a stage that dies (killed process, OOM) or times out
makes the request release the KV on every surviving stage and raise `StageUnavailableError`
(the service maps it to UNAVAILABLE), or, with `retry=True`, run once more after the dead actor
has been restarted by Ray (`max_restarts`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import ray
import torch

from ..kernels.config import ProxyAttnConfig
from . import attention as attention_mod
from .engine import PrefillResult
from .kv_files import KVHeader
from .kv_wire import Piece, token_pieces, token_sha256
from .model import ModelInfo
from .pipeline_stage import PipelineStage
from .pipeline_timeline import PipelineTimeline
from .planner import InsufficientResources, balanced_layer_ranges, stage_bytes
from .protocol import KVMissing
from .request import PrefillError, PrefillRequest, build_request
from .stage_model import StageSpec

TRANSPORTS = ("object_store", "collective")


class StageUnavailableError(RuntimeError):
    """A pipeline stage died or stopped answering during a request (maps to gRPC UNAVAILABLE).

    `stage` is the index of the stage that failed first (None when unknown); the KV of the request
    has been released on every stage that could still be reached.
    """

    def __init__(self, message: str, stage: int | None = None):
        super().__init__(message)
        self.stage = stage


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
class ShardedPrefill:
    """Prefill of one prompt over S pipeline stages, each a Ray actor holding a layer range.

    model_source: as StageSpec.source. layer_ranges: explicit contiguous ranges covering [0, L),
    or None with `num_stages` for a balanced split. attention/config/backend: as PrefillEngine.
    `actor_options` go to `ray.remote(...).options` (num_cpus, num_gpus, ...); the actors are
    restartable (`max_restarts`), so a killed stage comes back with its layers and no KV.

        pipe = ShardedPrefill(model_dir, num_stages=2)
        result = pipe.prefill(token_ids, chunk_size=8192, logits="last")   # a PrefillResult
        result.extra["timeline"].summary()     # utilisation, bubble, overlap, bytes moved
    """

    def __init__(
        self,
        model_source: str | dict | None,
        num_stages: int = 2,
        layer_ranges: Sequence[tuple[int, int]] | None = None,
        attention: str = "proxy",
        config: ProxyAttnConfig | None = None,
        backend: str = "auto",
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = 1,
        actor_options: dict | None = None,
        max_restarts: int = 4,
        seed: int = 0,
        model_id: str | None = None,
        transport: str = "object_store",
        group_timeout_s: float = 120.0,
    ):
        if attention not in attention_mod.MODES:
            raise ValueError(f"attention must be one of {attention_mod.MODES}, got {attention!r}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        self.config = config or ProxyAttnConfig()
        self.attention = attention
        total_layers = _num_layers(model_source)
        ranges = (
            list(layer_ranges)
            if layer_ranges is not None
            else balanced_layer_ranges(total_layers, num_stages)
        )
        _check_ranges(ranges, total_layers)
        self.layer_ranges = ranges
        options = {"num_cpus": 1, "max_restarts": max_restarts, "max_task_retries": 0}
        options.update(actor_options or {})
        actor_class = ray.remote(PipelineStage).options(**options)
        self.specs = [
            StageSpec(
                source=model_source,
                layer_start=start,
                layer_stop=stop,
                attention=attention,
                config=self.config.to_dict(),
                backend=backend,
                device=device,
                dtype=dtype,
                threads=threads,
                seed=seed,
                model_id=model_id,
            )
            for start, stop in ranges
        ]
        self.stages = [actor_class.remote(spec, s, len(ranges)) for s, spec in enumerate(self.specs)]
        self._info: ModelInfo | None = None
        self._kept: dict[str, torch.Tensor] = {}  # token ids of requests whose KV stays on the stages
        self.transport = transport if len(ranges) > 1 else "object_store"
        self.group_timeout_s = group_timeout_s
        self._group_pids: list[int] | None = None  # the processes that formed the current group

    @classmethod
    def from_plan(cls, model_source: str | dict | None, plan, **kwargs) -> ShardedPrefill:
        """Stages as a planner.ShardPlan lays them out (its layer ranges, in order); kwargs as for
        the constructor. Which Ray node/GPU each actor lands on is Ray's choice (`actor_options`)."""
        return cls(model_source, layer_ranges=plan.layer_ranges, **kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def model_info(self) -> ModelInfo:
        if self._info is None:
            self._info = ray.get(self.stages[0].model_info.remote(), timeout=600)
        return self._info

    def wait_ready(self, timeout_s: float = 600.0) -> list[int]:
        """Block until every stage has loaded its layers; returns their process ids."""
        return ray.get([stage.ping.remote() for stage in self.stages], timeout=timeout_s)

    # ---- one request ------------------------------------------------------------------------
    def prefill(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        chunk_size: int = 8192,
        logits="last",
        fixed_density: float | None = None,
        gather: bool = True,
        retry: bool = False,
        timeout_s: float = 600.0,
        window: int | None = None,
        request_id: str | None = None,
        on_chunk_done: Callable[[int], None] | None = None,
        attention: str | None = None,
        config: ProxyAttnConfig | None = None,
    ) -> PrefillResult:
        """Prefill `token_ids` in chunks of `chunk_size` through all stages; a PrefillResult.

        logits, fixed_density: as PrefillEngine.prefill. gather=True copies every layer's KV to the
        driver (layer order, CPU) and releases it on the stages; gather=False leaves it there under
        `result.extra["request_id"]` (fetch with `gather_kv`, free with `release`) and returns empty
        key/value lists. At most `window` chunks (default 2 x stages) are in flight, which bounds the
        activations parked in the object store. A stage failure or the deadline releases the
        request's KV everywhere and raises StageUnavailableError; with retry=True the request runs
        once more after Ray has restarted the stage. `on_chunk_done(chunk)` is called as each chunk
        leaves the last stage. attention, config: this request's mode and ProxyAttnConfig
        (default: the pipeline's).

        result.extra: request_id, timeline (PipelineTimeline), ttft_s (submission to the last
        chunk's logits), kv_bytes (reserved on the stages), attempts, layer_ranges.
        """
        # the engine's checks; the prompt's length is bounded by the planner's memory check,
        # not by max_position_embeddings
        request = build_request(
            self.model_info,
            token_ids,
            chunk_size,
            logits,
            attention or self.attention,
            config or self.config,
            fixed_density,
            check_positions=False,
        )
        if request.layer_configs is not None:
            raise PrefillError("config: a sharded prefill takes one ProxyAttnConfig for all layers")
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            rid = request_id or uuid.uuid4().hex
            try:
                result = self._run(rid, request, gather, timeout_s, window, on_chunk_done)
            except StageUnavailableError:
                if attempt == attempts:
                    raise
                self.wait_restarted(timeout_s=timeout_s)
                continue
            result.extra["attempts"] = attempt
            return result
        raise AssertionError("unreachable")

    def _run(self, rid, request: PrefillRequest, gather, timeout_s, window, on_chunk_done):
        tokens, n = request.token_ids, request.num_tokens
        deadline = time.monotonic() + timeout_s
        started = time.perf_counter()
        collective = self.transport == "collective"
        # refuse before allocating anything
        self._check_fits(n, request.chunk_size, len(request.logit_positions), deadline)
        try:
            if collective:
                self._ensure_group(deadline)
            begins = [
                s.begin.remote(rid, n, request.fixed_density, request.mode, request.config.to_dict())
                for s in self.stages
            ]
            reserved = self._get(begins, deadline)
            outputs = self._stream_chunks(
                rid, request, window or 2 * self.num_stages, deadline, on_chunk_done
            )
            ttft = time.perf_counter() - started
            records = [
                r for rs in self._get([s.timeline.remote(rid) for s in self.stages], deadline) for r in rs
            ]
            stats = self._get([s.attention_stats.remote(rid) for s in self.stages], deadline)
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            if gather:
                for _layer, k, v in self.gather_kv(rid, deadline=deadline):
                    keys.append(k)
                    values.append(v)
                self.release(rid)
            else:
                self._kept[rid] = tokens
        except BaseException:
            # a failure, the deadline or an interrupt: nothing of this request may stay behind
            if collective:
                # survivors may sit in a recv from a dead peer: restart them all (their KV goes
                # with their processes) and form a new group before the next request
                self._restart_all()
            else:
                self.release(rid)
            raise
        return PrefillResult(
            keys=keys,
            values=values,
            token_ids=tokens,
            logits=_in_callers_order(outputs, request),
            logit_positions=request.logit_positions,
            sparsity=torch.cat([sums for _, _, sums in stats], dim=0) / n,
            estimate_seconds=sum(e for e, _, _ in stats),
            attention_seconds=sum(a for _, a, _ in stats),
            total_seconds=time.perf_counter() - started,
            peak_memory_bytes=None,
            header=KVHeader.for_model(self.model_info, num_tokens=n, token_sha256=token_sha256(tokens)),
            chunk_size=request.chunk_size,
            attention=request.mode,
            extra={
                "request_id": rid,
                "timeline": PipelineTimeline(records, self.num_stages, len(request.chunks())),
                "ttft_s": ttft,
                "kv_bytes": sum(reserved),
                "layer_ranges": list(self.layer_ranges),
            },
        )

    def _stream_chunks(self, rid, request: PrefillRequest, window: int, deadline: float, on_chunk_done):
        """Sends every chunk through the stages, at most `window` chunks in flight; the last
        stage's logits rows of each chunk, in chunk order."""
        collective = self.transport == "collective"
        positions = request.logit_positions
        chunks = request.chunks()
        outputs: list[torch.Tensor] = []
        pending: list[tuple[int, list]] = []
        for c, (q0, q1) in enumerate(chunks):
            rows = [p - q0 for p in positions if q0 <= p < q1]
            refs = []
            payload = request.token_ids[q0:q1].clone()
            for s, stage in enumerate(self.stages):
                last = s == self.num_stages - 1
                if collective:  # hidden states go rank to rank; the driver only orders the calls
                    first_payload = payload if s == 0 else None
                    refs.append(
                        stage.forward.remote(rid, c, q0, first_payload, rows if last else None, q1 - q0)
                    )
                else:  # the previous stage's output ref: Ray hands its value over when it is ready
                    payload = stage.forward.remote(rid, c, q0, payload, rows if last else None)
                    refs = [payload]
            pending.append((c, refs))
            # backpressure: wait for the oldest chunk once `window` are in flight, and drain at the end
            while pending and (len(pending) >= window or c == len(chunks) - 1):
                done_chunk, done_refs = pending.pop(0)
                outputs.append(self._get_first_failure(done_refs, deadline)[-1])
                del done_refs
                if on_chunk_done is not None:
                    on_chunk_done(done_chunk)
        return outputs

    def _get(self, refs, deadline: float):
        """ray.get with the request's deadline; stage deaths and timeouts become
        StageUnavailableError, naming the stage when Ray says which one."""
        remaining = max(0.0, deadline - time.monotonic())
        try:
            return ray.get(refs, timeout=remaining)
        except ray.exceptions.GetTimeoutError as exc:
            raise StageUnavailableError(
                f"pipeline stage did not answer within the request deadline: {exc}"
            ) from exc
        except ray.exceptions.RayActorError as exc:
            raise StageUnavailableError(
                f"pipeline stage {self._stage_of(exc)} died: {type(exc).__name__}", self._stage_of(exc)
            ) from exc
        except ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause() if hasattr(exc, "as_instanceof_cause") else exc
            raise StageUnavailableError(f"pipeline stage failed: {cause}") from exc
        except ray.exceptions.RayError as exc:
            raise StageUnavailableError(f"pipeline stage unreachable: {exc}") from exc

    def _check_fits(self, num_tokens: int, chunk_size: int, logits_rows: int, deadline: float) -> None:
        """InsufficientResources (RESOURCE_EXHAUSTED) when some stage cannot hold its share of the
        request: KV of its layers plus one chunk's activations (planner.stage_bytes; the weights
        are already loaded), against the memory the stage reports free."""
        shape = self._get(self.stages[0].model_shape.remote(), deadline)
        free = self._get([stage.free_bytes.remote() for stage in self.stages], deadline)
        needs = [
            stage_bytes(
                shape, r, self.num_stages, i, num_tokens, chunk_size, logits_rows, weights_resident=True
            )
            for i, r in enumerate(self.layer_ranges)
        ]
        short = [i for i, (need, avail) in enumerate(zip(needs, free)) if avail is not None and need > avail]
        if short:
            gib = 1024**3
            raise InsufficientResources(
                f"prompt of {num_tokens} tokens needs {sum(needs) / gib:.2f} GiB "
                f"over {self.num_stages} stage(s) "
                f"({', '.join(f'{need / gib:.2f}' for need in needs)} GiB); stage(s) {short} have only "
                f"{', '.join(f'{free[i] / gib:.2f}' for i in short)} GiB free",
                needed_bytes=sum(needs),
                available_bytes=sum(f for f in free if f is not None),
            )

    def _get_first_failure(self, refs: list, deadline: float) -> list:
        """Values of `refs`, raising as soon as any of them fails (not after the others, which may
        be blocked on the failed one until the group timeout)."""
        remaining = list(refs)
        while remaining:
            ready, remaining = ray.wait(
                remaining, num_returns=1, timeout=max(0.0, deadline - time.monotonic())
            )
            if not ready:
                raise StageUnavailableError("pipeline stage did not answer within the request deadline")
            self._get(ready[0], deadline)
        return self._get(list(refs), deadline)

    def _ensure_group(self, deadline: float) -> None:
        """Form the stages' process group, again whenever a stage process changed (a restart)."""
        pids = self._get([stage.ping.remote() for stage in self.stages], deadline)
        if pids == self._group_pids:
            return
        address, port = self._get(self.stages[0].rendezvous_address.remote(), deadline)
        self._get(
            [
                stage.join_group.remote(address, port, self.num_stages, self.group_timeout_s)
                for stage in self.stages
            ],
            deadline,
        )
        self._group_pids = pids

    def _restart_all(self) -> None:
        self._group_pids = None
        for stage in self.stages:
            try:
                ray.kill(stage, no_restart=False)
            except ray.exceptions.RayError:
                pass

    def _stage_of(self, exc) -> int | None:
        actor_id = getattr(exc, "actor_id", None)
        for s, stage in enumerate(self.stages):
            if actor_id is not None and stage._actor_id.hex() == actor_id:
                return s
        return None

    # ---- KV of a finished request -------------------------------------------------------------
    def gather_kv(
        self, request_id: str, deadline: float | None = None
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (layer, keys, values) for every layer in order, fetched from the owning stage."""
        deadline = deadline if deadline is not None else time.monotonic() + 600.0
        for stage, (start, stop) in zip(self.stages, self.layer_ranges):
            for layer in range(start, stop):
                k, v = self._get(stage.kv.remote(request_id, layer), deadline)
                yield layer, k, v

    def fetch(
        self,
        request_id: str,
        max_chunk_bytes: int = 4 << 20,
        layer_start: int = 0,
        layer_end: int | None = None,
        include_token_ids: bool = False,
        timeout_s: float = 600.0,
    ) -> Iterator[Piece | KVMissing]:
        """FetchKV for a request left on the stages (gather=False): the same items as a pool
        worker's `fetch` (TokenPieces first when asked, then LayerPieces), gathered from the
        stages in layer order. KVMissing when the request is unknown or a stage lost it (a
        restart); a stage dying mid-stream raises StageUnavailableError."""
        tokens = self._kept.get(request_id)
        if tokens is None:
            yield KVMissing()
            return
        deadline = time.monotonic() + timeout_s
        if include_token_ids:
            yield from token_pieces(tokens.numpy(), max_chunk_bytes)
        layer_end = self.layer_ranges[-1][1] if layer_end is None else layer_end
        for stage, (start, stop) in zip(self.stages, self.layer_ranges):
            if stop <= layer_start or start >= layer_end:
                continue
            pieces = stage.fetch.options(num_returns="streaming").remote(
                request_id, max_chunk_bytes, layer_start, layer_end
            )
            while True:
                try:
                    ref = next(pieces)
                except StopIteration:
                    break
                except ray.exceptions.RayError as exc:  # the stage died between two pieces
                    raise StageUnavailableError(f"pipeline stage died while streaming KV: {exc}") from exc
                item = self._get(ref, deadline)
                yield item
                if isinstance(item, KVMissing):
                    return

    def release(self, request_id: str, timeout_s: float = 30.0) -> int:
        """Free the request's KV on every reachable stage (dead stages hold nothing); returns bytes freed."""
        self._kept.pop(request_id, None)
        refs = [stage.release.remote(request_id) for stage in self.stages]
        freed = 0
        for ref in refs:
            try:
                freed += ray.get(ref, timeout=timeout_s)
            except ray.exceptions.RayError:
                pass  # a dead or restarting stage lost its KV with its process
        return freed

    def held_bytes(self, timeout_s: float = 30.0) -> list[int]:
        return ray.get([stage.held_bytes.remote() for stage in self.stages], timeout=timeout_s)

    def set_memory_limit(self, limit_bytes: int | None, timeout_s: float = 30.0) -> None:
        """Cap every stage's memory for requests (None lifts the cap)."""
        ray.get([stage.set_memory_limit.remote(limit_bytes) for stage in self.stages], timeout=timeout_s)

    def memory(self, timeout_s: float = 30.0) -> list[dict]:
        return ray.get([stage.memory.remote() for stage in self.stages], timeout=timeout_s)

    def wait_restarted(self, timeout_s: float = 300.0, poll_s: float = 0.2) -> list[int]:
        """Wait until every stage answers again (Ray restarts dead actors); returns their pids."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([stage.ping.remote() for stage in self.stages], timeout=max(0.1, poll_s * 5))
            except ray.exceptions.RayError:
                if time.monotonic() > deadline:
                    raise StageUnavailableError(
                        f"pipeline stages did not come back within {timeout_s} s"
                    ) from None
                time.sleep(poll_s)

    def shutdown(self) -> None:
        for stage in self.stages:
            ray.kill(stage, no_restart=True)
        self.stages = []


def _in_callers_order(outputs: list[torch.Tensor], request: PrefillRequest) -> torch.Tensor | None:
    """The logits rows come back chunk by chunk, in the caller's order within a chunk: restore
    the caller's order overall."""
    positions = request.logit_positions
    if not positions:
        return None
    by_chunk = sorted(range(len(positions)), key=lambda i: positions[i] // request.chunk_size)
    ordered = torch.cat(outputs, dim=0)
    logits = torch.empty_like(ordered)
    logits[torch.tensor(by_chunk)] = ordered
    return logits


def _num_layers(source: str | dict | None) -> int:
    if isinstance(source, dict):
        return int(source["num_hidden_layers"])

    from transformers import AutoConfig

    from .model import default_model_dir

    if source is None:
        path, extra = default_model_dir(), {}
    elif Path(source).is_file():
        path, extra = Path(source).parent, {"gguf_file": Path(source).name}
    else:
        path, extra = Path(source), {}
    config = AutoConfig.from_pretrained(str(path), **extra)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def _check_ranges(ranges: list[tuple[int, int]], total_layers: int) -> None:
    expected = 0
    for start, stop in ranges:
        if start != expected or stop <= start:
            raise ValueError(f"layer ranges must be contiguous and non-empty from 0, got {ranges}")
        expected = stop
    if expected != total_layers:
        raise ValueError(f"layer ranges {ranges} do not cover the model's {total_layers} layers")
