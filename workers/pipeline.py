"""Chunked pipeline sharding: one long prompt spread over several Ray workers by layers.

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

Transport: activations travel through Ray's object store as CPU tensors (the stage copies its
output to the host, the next stage copies it to its device). That works on CPU and GPU alike and
is what the tests exercise; every moved byte is counted in the timeline.

Faults: every wait on a stage has a timeout; a stage that dies (killed process, OOM) or times out
makes the request release the KV on every surviving stage and raise `StageUnavailableError`
(the service maps it to UNAVAILABLE), or, with `retry=True`, run once more after the dead actor
has been restarted by Ray (`max_restarts`).
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import ray
import torch

from ..kernels.api import proxy_attention
from ..kernels.config import ProxyAttnConfig

ATTENTION_NAME = "proxyprefill_pipeline"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StageUnavailableError(RuntimeError):
    """A pipeline stage died or stopped answering during a request (maps to gRPC UNAVAILABLE).

    `stage` is the index of the stage that failed first (None when unknown); the KV of the request
    has been released on every stage that could still be reached.
    """

    def __init__(self, message: str, stage: int | None = None):
        super().__init__(message)
        self.stage = stage


# --------------------------------------------------------------------------------------------
# Stage-local pieces: attention function and KV cache
# --------------------------------------------------------------------------------------------
def _pipeline_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
) -> tuple[torch.Tensor, None]:
    """Attention for one chunk as Hugging Face calls it: query [B, Hq, Nq, d] of the chunk, key and
    value [B, Hkv, Nk, d] of the whole prefix (the cache has been updated), causal with the queries
    at the end: q_offset = Nk - Nq. ProxyAttn when `proxy_config` is given, otherwise every causal
    block (exact dense attention through the same kernels). Returns ([B, Nq, Hq, d], None)."""
    config: ProxyAttnConfig | None = kwargs.get("proxy_config")
    backend: str = kwargs.get("proxy_backend", "auto")
    q_offset = key.shape[2] - query.shape[2]
    if config is None:
        config = ProxyAttnConfig(block_size=kwargs.get("dense_block_size", 128), dense_below_tokens=1 << 62)
    out = proxy_attention(query, key, value, config, q_offset=q_offset, backend=backend, scale=scaling)
    return out.transpose(1, 2), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _pipeline_attention)


class StageKVCache:
    """Preallocated KV of one request for the layers a stage owns.

    keys[i], values[i]: [Hkv, N, d] for the stage's i-th layer (global index `layer_ids[i]`).
    `update` is what Hugging Face attention calls after projecting a chunk: it writes the chunk at
    [offset, offset + n) and returns views of the whole prefix [1, Hkv, offset + n, d], so no
    per-chunk concatenation ever happens.
    """

    def __init__(
        self, layer_ids: Sequence[int], num_tokens: int, kv_heads: int, head_dim: int, dtype, device
    ):
        self.slot = {layer: i for i, layer in enumerate(layer_ids)}
        shape = (kv_heads, num_tokens, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in layer_ids]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in layer_ids]
        self.num_tokens = num_tokens
        self.offset = 0  # first position of the chunk being run; set by the stage per chunk
        self.filled = 0  # tokens written so far in every layer

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        i = self.slot[layer_idx]
        n = key_states.shape[2]
        end = self.offset + n
        if end > self.num_tokens:
            raise ValueError(f"chunk ends at {end}, past the {self.num_tokens} preallocated positions")
        self.keys[i][:, self.offset : end] = key_states[0]
        self.values[i][:, self.offset : end] = value_states[0]
        return self.keys[i][None, :, :end], self.values[i][None, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


# --------------------------------------------------------------------------------------------
# A stage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    """What one stage loads.

    source: a Hugging Face model directory, or a dict of config fields (with "model_type") for a
        randomly initialised model (timing runs; stages then hold different random weights).
    layer_start, layer_stop: the stage's decoder layers [start, stop) of the whole model.
    proxy_config: ProxyAttnConfig fields, or None for dense attention.
    """

    source: str | dict
    layer_start: int
    layer_stop: int
    proxy_config: dict | None = None
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    seed: int = 0


@dataclass
class ChunkRecord:
    """One chunk's pass through one stage (wall-clock seconds, comparable across processes)."""

    stage: int
    chunk: int
    start: float
    end: float
    bytes_in: int
    bytes_out: int


def _load_stage_model(spec: StageSpec):
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES[spec.dtype]
    if isinstance(spec.source, dict):
        fields = dict(spec.source)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        config._attn_implementation = ATTENTION_NAME
        # Build only the layers this stage owns (a random 8B-shaped model would not fit twice),
        # then give them their global indices: the index is what the KV cache is keyed by.
        total_layers = config.num_hidden_layers
        config.num_hidden_layers = spec.layer_stop - spec.layer_start
        torch.manual_seed(spec.seed + spec.layer_start)
        with torch.device(spec.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTENTION_NAME)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = spec.layer_start + i
        model.config.num_hidden_layers = total_layers
        first_local_layer = spec.layer_start
    else:
        model = AutoModelForCausalLM.from_pretrained(
            spec.source, dtype=dtype, attn_implementation=ATTENTION_NAME
        )
        first_local_layer = 0
    model.eval()
    return model, first_local_layer


class PipelineStage:
    """One worker of a sharded prefill (run as a Ray actor; usable in-process for tests).

    Holds decoder layers [layer_start, layer_stop) of the model, plus the embedding on the first
    stage and the final norm + LM head on the last, and one `StageKVCache` per active request.
    """

    def __init__(self, spec: StageSpec, stage_index: int, num_stages: int, total_layers: int):
        torch.set_num_threads(spec.threads)
        register_attention()
        self.spec = spec
        self.index = stage_index
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.device = torch.device(spec.device)
        self.dtype = _DTYPES[spec.dtype]
        model, first_local_layer = _load_stage_model(spec)
        config = model.config
        if not 0 <= spec.layer_start < spec.layer_stop <= config.num_hidden_layers:
            raise ValueError(
                f"layer range [{spec.layer_start}, {spec.layer_stop}) outside the model's "
                f"{config.num_hidden_layers} layers"
            )
        self.config = config
        self.layers = torch.nn.ModuleList(
            list(model.model.layers)[
                spec.layer_start - first_local_layer : spec.layer_stop - first_local_layer
            ]
        )
        self.layer_ids = [layer.self_attn.layer_idx for layer in self.layers]
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens if self.is_first else None
        self.norm = model.model.norm if self.is_last else None
        self.lm_head = model.lm_head if self.is_last else None
        del model  # layers of other stages go with it
        for module in (self.layers, self.rotary, self.embed, self.norm, self.lm_head):
            if module is not None:
                module.to(self.device)
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.attention_kwargs = {"proxy_backend": spec.backend}
        if spec.proxy_config is not None:
            self.attention_kwargs["proxy_config"] = ProxyAttnConfig.from_dict(spec.proxy_config)
        self.caches: dict[str, StageKVCache] = {}
        self.records: dict[str, list[ChunkRecord]] = {}
        self.lock = threading.Lock()

    # ---- bookkeeping -------------------------------------------------------------------------
    def ping(self) -> int:
        """The worker's process id (changes when Ray restarts the actor)."""
        return os.getpid()

    def begin(self, request_id: str, num_tokens: int, block_size: int | None = None) -> int:
        """Preallocate the request's KV for this stage's layers; returns the bytes reserved."""
        if block_size is not None:
            self.attention_kwargs["dense_block_size"] = block_size
        cache = StageKVCache(
            self.layer_ids, num_tokens, self.kv_heads, self.head_dim, self.dtype, self.device
        )
        with self.lock:
            self.caches[request_id] = cache
            self.records[request_id] = []
        return cache.nbytes()

    def release(self, request_id: str) -> int:
        """Drop the request's KV (idempotent); returns the bytes freed."""
        with self.lock:
            cache = self.caches.pop(request_id, None)
        freed = cache.nbytes() if cache is not None else 0
        del cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def held_bytes(self) -> int:
        """KV bytes held for all requests on this stage."""
        with self.lock:
            return sum(cache.nbytes() for cache in self.caches.values())

    def timeline(self, request_id: str) -> list[ChunkRecord]:
        return list(self.records.get(request_id, []))

    def memory(self) -> dict:
        """Peak memory of this worker: GPU allocator peak on CUDA, process max RSS otherwise."""
        stats = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            stats["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            stats["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            stats["device_name"] = torch.cuda.get_device_name(self.device)
        return stats

    # ---- compute ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self, request_id: str, chunk: int, q_offset: int, payload: torch.Tensor, logit_rows: list[int] | None
    ) -> torch.Tensor:
        """Run one chunk through this stage's layers.

        payload: token ids int64 [n] on the first stage, else the previous stage's hidden states
        [1, n, hidden] (any device). Returns the hidden states on the CPU for the next stage, or, on
        the last stage, float32 logits [len(logit_rows), vocab] for the chunk-relative rows asked for.
        """
        start = time.time()
        cache = self.caches.get(request_id)
        if cache is None:
            raise KeyError(f"request {request_id} has no KV on stage {self.index} (released or never begun)")
        bytes_in = payload.numel() * payload.element_size()
        if self.is_first:
            hidden = self.embed(payload.to(self.device)[None])
        else:
            hidden = payload.to(self.device, self.dtype)
        n = hidden.shape[1]
        position_ids = torch.arange(q_offset, q_offset + n, device=self.device)[None]
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        cache.offset = q_offset
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
                **self.attention_kwargs,
            )
        cache.filled = q_offset + n
        if self.is_last:
            rows = torch.tensor(logit_rows or [], dtype=torch.long, device=self.device)
            selected = self.norm(hidden[0, rows]) if len(rows) else hidden.new_zeros(0, hidden.shape[-1])
            out = (
                self.lm_head(selected).float().cpu() if len(rows) else torch.zeros(0, self.config.vocab_size)
            )
        else:
            out = hidden.cpu()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record = ChunkRecord(
            self.index, chunk, start, time.time(), bytes_in, out.numel() * out.element_size()
        )
        self.records[request_id].append(record)
        return out

    def kv(self, request_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one global layer, [Hkv, N, d] on the CPU."""
        cache = self.caches.get(request_id)
        if cache is None:
            raise KeyError(f"request {request_id} has no KV on stage {self.index}")
        i = cache.slot[layer]
        return cache.keys[i].cpu(), cache.values[i].cpu()


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
def balanced_layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Split layers [0, L) into `num_stages` contiguous ranges whose sizes differ by at most one
    (the earlier stages get the extra layers: the last stage also runs the LM head)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"need 1 <= stages <= layers, got {num_stages} stages for {num_layers} layers")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for s in range(num_stages):
        stop = start + base + (1 if s < extra else 0)
        ranges.append((start, stop))
        start = stop
    return ranges


@dataclass
class PipelineTimeline:
    """Per-stage, per-chunk timestamps of one request and what they say about the pipeline.

    utilisation[s] = busy time of stage s / makespan; bubble = 1 - mean utilisation (the idle
    share of all stage-seconds); overlap = share of the makespan during which at least two
    stages computed at once; ideal_bubble = (S-1)/(C+S-1) for C equal chunks.
    """

    records: list[ChunkRecord]
    num_stages: int
    num_chunks: int

    @property
    def makespan(self) -> float:
        if not self.records:
            return 0.0
        return max(r.end for r in self.records) - min(r.start for r in self.records)

    def busy(self, stage: int) -> float:
        return sum(r.end - r.start for r in self.records if r.stage == stage)

    def utilisation(self) -> list[float]:
        span = self.makespan or 1.0
        return [self.busy(s) / span for s in range(self.num_stages)]

    def bubble(self) -> float:
        util = self.utilisation()
        return 1.0 - sum(util) / len(util)

    def ideal_bubble(self) -> float:
        return (self.num_stages - 1) / (self.num_chunks + self.num_stages - 1)

    def overlap(self) -> float:
        """Share of the makespan with two or more stages busy (sweep over interval ends)."""
        events = sorted([(r.start, 1) for r in self.records] + [(r.end, -1) for r in self.records])
        busy_stages, last, overlapped = 0, None, 0.0
        for t, delta in events:
            if last is not None and busy_stages >= 2:
                overlapped += t - last
            busy_stages += delta
            last = t
        return overlapped / (self.makespan or 1.0)

    def bytes_moved(self) -> int:
        """Bytes that crossed a process boundary: inputs of every stage plus the logits."""
        return sum(r.bytes_in for r in self.records) + sum(
            r.bytes_out for r in self.records if r.stage == self.num_stages - 1
        )

    def summary(self) -> dict:
        return {
            "stages": self.num_stages,
            "chunks": self.num_chunks,
            "makespan_s": self.makespan,
            "stage_busy_s": [self.busy(s) for s in range(self.num_stages)],
            "stage_utilisation": self.utilisation(),
            "bubble": self.bubble(),
            "ideal_bubble": self.ideal_bubble(),
            "overlap": self.overlap(),
            "bytes_moved": self.bytes_moved(),
        }


@dataclass
class ShardedPrefillResult:
    """What a sharded prefill returns, shaped like the engine's PrefillResult.

    keys, values: per layer (global order) [Hkv, N, d] on the CPU when gathered, else empty lists
    and the KV stays on the stages under `request_id` (fetch with `ShardedPrefill.gather_kv`).
    logits: float32 [P, vocab] at the requested positions (None when none were asked for).
    logit_positions: the absolute positions of the logits rows.
    """

    request_id: str
    num_tokens: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    logits: torch.Tensor | None
    logit_positions: list[int]
    timeline: PipelineTimeline
    ttft_s: float
    kv_bytes: int
    attempts: int = 1
    layer_ranges: list[tuple[int, int]] = field(default_factory=list)


def _logit_positions(logits, num_tokens: int) -> list[int]:
    if logits is None or logits is False:
        return []
    if logits == "last" or logits is True:
        return [num_tokens - 1]
    if logits == "all":
        return list(range(num_tokens))
    positions = sorted({int(p) for p in logits})
    if positions and not 0 <= positions[0] <= positions[-1] < num_tokens:
        raise ValueError(
            f"logit positions must lie in [0, {num_tokens}), got {positions[0]}..{positions[-1]}"
        )
    return positions


class ShardedPrefill:
    """Prefill of one prompt over S pipeline stages, each a Ray actor holding a layer range.

    model_source: a Hugging Face model directory (every stage loads the same weights) or a config
    dict for random weights. layer_ranges: explicit contiguous ranges covering [0, L), or None with
    `num_stages` for a balanced split. `actor_options` go to `ray.remote(...).options` (num_cpus,
    num_gpus, ...); the actors are restartable (`max_restarts`).
    """

    def __init__(
        self,
        model_source: str | dict,
        num_stages: int = 2,
        layer_ranges: Sequence[tuple[int, int]] | None = None,
        proxy_config: ProxyAttnConfig | None = None,
        backend: str = "auto",
        device: str = "cpu",
        dtype: str = "float32",
        threads: int = 1,
        actor_options: dict | None = None,
        max_restarts: int = 4,
        seed: int = 0,
    ):
        total_layers = _num_layers(model_source)
        ranges = (
            list(layer_ranges)
            if layer_ranges is not None
            else balanced_layer_ranges(total_layers, num_stages)
        )
        _check_ranges(ranges, total_layers)
        self.layer_ranges = ranges
        self.total_layers = total_layers
        self.proxy_config = proxy_config
        options = {"num_cpus": 1, "max_restarts": max_restarts, "max_task_retries": 0}
        options.update(actor_options or {})
        actor_class = ray.remote(PipelineStage).options(**options)
        self.specs = [
            StageSpec(
                source=model_source,
                layer_start=start,
                layer_stop=stop,
                proxy_config=None if proxy_config is None else proxy_config.to_dict(),
                backend=backend,
                device=device,
                dtype=dtype,
                threads=threads,
                seed=seed,
            )
            for start, stop in ranges
        ]
        self.stages = [
            actor_class.remote(spec, s, len(ranges), total_layers) for s, spec in enumerate(self.specs)
        ]
        self.block_size = proxy_config.block_size if proxy_config is not None else 128

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def wait_ready(self, timeout_s: float = 300.0) -> list[int]:
        """Block until every stage has loaded its layers; returns their process ids."""
        return ray.get([stage.ping.remote() for stage in self.stages], timeout=timeout_s)

    # ---- one request ------------------------------------------------------------------------
    def prefill(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        chunk_size: int,
        logits="last",
        gather: bool = True,
        retry: bool = False,
        timeout_s: float = 600.0,
        window: int | None = None,
        request_id: str | None = None,
        on_chunk_done=None,
    ) -> ShardedPrefillResult:
        """Prefill `token_ids` in chunks of `chunk_size` through all stages.

        logits: "last", "all", None, or a sequence of absolute positions. gather=True copies every
        layer's KV to the driver (layer order) and releases it on the stages; gather=False leaves
        it there under `result.request_id` (use `gather_kv` / `release`). At most `window` chunks
        (default 2 x stages) are in flight, which bounds the activations parked in the object store.
        A stage failure releases the request's KV everywhere and raises StageUnavailableError;
        with retry=True the request runs once more after the stages are back.
        `on_chunk_done(chunk)` is called as each chunk leaves the last stage.
        """
        tokens = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if tokens.numel() == 0:
            raise ValueError("token_ids is empty")
        if chunk_size <= 0 or chunk_size % self.block_size:
            raise ValueError(f"chunk_size must be a positive multiple of block_size {self.block_size}")
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            rid = request_id or uuid.uuid4().hex
            try:
                result = self._run(rid, tokens, chunk_size, logits, gather, timeout_s, window, on_chunk_done)
                result.attempts = attempt
                return result
            except StageUnavailableError:
                if attempt == attempts:
                    raise
                self.wait_restarted(timeout_s=timeout_s)
        raise AssertionError("unreachable")

    def _run(self, rid, tokens, chunk_size, logits, gather, timeout_s, window, on_chunk_done):
        n = tokens.numel()
        positions = _logit_positions(logits, n)
        window = window or 2 * self.num_stages
        deadline = time.monotonic() + timeout_s
        started = time.time()
        num_chunks = math.ceil(n / chunk_size)
        try:
            reserved = self._get([s.begin.remote(rid, n, self.block_size) for s in self.stages], deadline)
            outputs: list = []
            pending: list[tuple[int, ray.ObjectRef]] = []
            for c in range(num_chunks):
                q0, q1 = c * chunk_size, min(n, (c + 1) * chunk_size)
                rows = [p - q0 for p in positions if q0 <= p < q1]
                ref = tokens[q0:q1].clone()
                for s, stage in enumerate(self.stages):
                    last = s == self.num_stages - 1
                    ref = stage.forward.remote(rid, c, q0, ref, rows if last else None)
                pending.append((c, ref))
                while len(pending) >= window or (c == num_chunks - 1 and pending):
                    done_chunk, done_ref = pending.pop(0)
                    outputs.append(self._get(done_ref, deadline))
                    if on_chunk_done is not None:
                        on_chunk_done(done_chunk)
            ttft = time.time() - started
            records = [
                r for rs in self._get([s.timeline.remote(rid) for s in self.stages], deadline) for r in rs
            ]
            keys, values = [], []
            if gather:
                for _layer, k, v in self.gather_kv(rid, deadline=deadline):
                    keys.append(k)
                    values.append(v)
                self.release(rid)
        except StageUnavailableError:
            self.release(rid)
            raise
        logits_out = torch.cat(outputs, dim=0) if positions else None
        return ShardedPrefillResult(
            request_id=rid,
            num_tokens=n,
            keys=keys,
            values=values,
            logits=logits_out,
            logit_positions=positions,
            timeline=PipelineTimeline(records, self.num_stages, num_chunks),
            ttft_s=ttft,
            kv_bytes=sum(reserved),
            layer_ranges=list(self.layer_ranges),
        )

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

    def release(self, request_id: str, timeout_s: float = 30.0) -> int:
        """Free the request's KV on every reachable stage (dead stages hold nothing); returns bytes freed."""
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


def _num_layers(source: str | dict) -> int:
    if isinstance(source, dict):
        return int(source["num_hidden_layers"])
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(source).num_hidden_layers)


def _check_ranges(ranges: list[tuple[int, int]], total_layers: int) -> None:
    expected = 0
    for start, stop in ranges:
        if start != expected or stop <= start:
            raise ValueError(f"layer ranges must be contiguous and non-empty from 0, got {ranges}")
        expected = stop
    if expected != total_layers:
        raise ValueError(f"layer ranges {ranges} do not cover the model's {total_layers} layers")
