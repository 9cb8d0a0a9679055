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

import json
import math
import os
import re
import resource
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from ..kernels.config import ProxyAttnConfig
from . import attention as attention_mod
from .engine import PrefillError, PrefillResult, _available_memory_bytes, token_ids_sha256, token_tensor
from .kv_cache import PreallocatedKVCache
from .kv_files import KVHeader
from .model import ModelInfo, check_supported, load_model, model_info_from_config
from .planner import InsufficientResources, ModelShape, balanced_layer_ranges, stage_bytes

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
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
# A stage
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSpec:
    """What one stage loads and how it attends.

    source: a Hugging Face model directory (a safetensors checkpoint: each stage reads only its
        own tensors), a .gguf file or None for the embedded default model (loaded whole on the
        host, then cut), or a dict of config fields (with "model_type") for random weights (timing
        runs: only the stage's own layers are built, so stages hold different random weights).
    layer_start, layer_stop: the stage's decoder layers [start, stop) of the whole model.
    attention: "proxy" or "dense"; config: ProxyAttnConfig fields (None: the defaults).
    """

    source: str | dict | None
    layer_start: int
    layer_stop: int
    attention: str = "proxy"
    config: dict | None = None
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1
    seed: int = 0
    model_id: str | None = None


@dataclass
class ChunkRecord:
    """One chunk's pass through one stage (wall-clock seconds, comparable across processes)."""

    stage: int
    chunk: int
    start: float
    end: float
    bytes_in: int
    bytes_out: int
    wait: float = 0.0  # seconds spent waiting for the input (collective transport)


def _random_stage_model(spec: StageSpec, attn_name: str, dtype: torch.dtype):
    """A randomly initialised model holding only layers [layer_start, layer_stop), built on the
    stage's device (a random 8B-shaped model is too big to build whole and then cut)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(spec.source)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    check_supported(config)
    total_layers = config.num_hidden_layers
    config.num_hidden_layers = spec.layer_stop - spec.layer_start
    torch.manual_seed(spec.seed + spec.layer_start)
    with torch.device(spec.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_name)
    model.config.num_hidden_layers = total_layers
    info = model_info_from_config(model.config, spec.model_id or "random", dtype)
    return model.eval(), info, spec.layer_start


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory (sharded or not); [] when there are none."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / name for name in weight_map.values()})
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def _partial_stage_model(spec: StageSpec, attn_name: str, dtype: torch.dtype):
    """Only this stage's share of a safetensors checkpoint: the model is built without storage
    for layers [layer_start, layer_stop) (renumbered from 0), then exactly those tensors, plus the
    embedding (first stage) or final norm and LM head (last stage), are read from the files. A
    stage of a model too big for one host's memory never holds the rest. None when the source
    is not a safetensors directory (GGUF, the embedded default): the caller loads it whole."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(spec.source) if spec.source is not None else None
    if directory is None or not directory.is_dir():
        return None
    files = _checkpoint_files(directory)
    if not files:
        return None
    config = AutoConfig.from_pretrained(str(directory))
    check_supported(config)
    total_layers = config.num_hidden_layers
    first, last = spec.layer_start == 0, spec.layer_stop == total_layers
    config.num_hidden_layers = spec.layer_stop - spec.layer_start
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_name)
    model.to_empty(device="cpu")
    base = model.get_decoder()
    base.rotary_emb = type(base.rotary_emb)(config=config)  # its buffers are computed, not stored
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted_prefixes = ["model.norm.", "lm_head."] if last else []
    if first or (last and tied):
        wanted_prefixes.append("model.embed_tokens.")
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                match = _LAYER_KEY.match(name)
                if match:
                    layer = int(match.group(1))
                    if spec.layer_start <= layer < spec.layer_stop:
                        state[f"model.layers.{layer - spec.layer_start}.{match.group(2)}"] = f.get_tensor(
                            name
                        )
                elif any(name.startswith(prefix) for prefix in wanted_prefixes):
                    state[name] = f.get_tensor(name)
    missing, _ = model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    needed = [
        name
        for name in missing
        if name.startswith("model.layers.")
        or (first and name.startswith("model.embed_tokens."))
        or (last and name.startswith("model.norm."))
        or (last and not tied and name.startswith("lm_head."))
    ]
    if needed:
        raise ValueError(
            f"checkpoint {directory} lacks tensors that stage [{spec.layer_start}, {spec.layer_stop}) "
            f"needs: {needed[:5]}"
        )
    model.config.num_hidden_layers = total_layers
    info = model_info_from_config(model.config, spec.model_id or directory.name, dtype)
    return model.eval(), info, spec.layer_start


class PipelineStage:
    """One worker of a sharded prefill (run as a Ray actor; usable in-process too).

    Holds decoder layers [layer_start, layer_stop) of the model, plus the embedding on the first
    stage and the final norm + LM head on the last. Per request: one PreallocatedKVCache for its
    layers and one attention PrefillContext (mode, config, sparsity and timing sums) - the
    engine's own pieces, so a stage computes exactly what the engine computes for those layers.
    Inside the stage the layers are renumbered 0..n-1 (cache slots, sparsity rows).
    """

    def __init__(self, spec: StageSpec, stage_index: int, num_stages: int):
        if spec.threads:
            torch.set_num_threads(spec.threads)
        if spec.attention not in attention_mod.MODES:
            raise ValueError(f"attention must be one of {attention_mod.MODES}, got {spec.attention!r}")
        attn_name = attention_mod.register()
        self.spec = spec
        self.index = stage_index
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.device = torch.device(spec.device)
        self.dtype = _DTYPES[spec.dtype]
        if isinstance(spec.source, dict):
            model, info, first_built_layer = _random_stage_model(spec, attn_name, self.dtype)
        elif (partial := _partial_stage_model(spec, attn_name, self.dtype)) is not None:
            model, info, first_built_layer = partial
        else:
            # GGUF or the embedded default: load whole on the host, keep this stage's share
            model, _, info = load_model(
                spec.source, attn_name, torch.device("cpu"), self.dtype, spec.model_id
            )
            first_built_layer = 0
        if not 0 <= spec.layer_start < spec.layer_stop <= info.num_layers:
            raise ValueError(
                f"layer range [{spec.layer_start}, {spec.layer_stop}) is outside the model's "
                f"{info.num_layers} layers"
            )
        self.info = info
        base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        owned = list(base.layers)[spec.layer_start - first_built_layer : spec.layer_stop - first_built_layer]
        self.layers = torch.nn.ModuleList(owned)
        for local, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = local
        self.rotary = base.rotary_emb
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        )
        self.hidden_size = text_config.hidden_size
        self.shape = ModelShape.from_config(text_config, dtype_bytes=torch.finfo(self.dtype).bits // 8)
        self.memory_limit_bytes: int | None = None
        self.pending_send = None  # (work, tensor) of the collective transport's last send
        self.embed = base.embed_tokens if self.is_first else None
        self.norm = base.norm if self.is_last else None
        self.lm_head = model.get_output_embeddings() if self.is_last else None
        del model, base  # the other stages' layers go with them
        for module in (self.layers, self.rotary, self.embed, self.norm, self.lm_head):
            if module is not None:
                module.to(self.device)
        self.config = ProxyAttnConfig.from_dict(spec.config) if spec.config else ProxyAttnConfig()
        self.caches: dict[str, PreallocatedKVCache] = {}
        self.contexts: dict[str, attention_mod.PrefillContext] = {}
        self.records: dict[str, list[ChunkRecord]] = {}
        self.lock = threading.Lock()

    # ---- bookkeeping -------------------------------------------------------------------------
    def ping(self) -> int:
        """The worker's process id (a new one after Ray restarts the actor)."""
        return os.getpid()

    def model_info(self) -> ModelInfo:
        return self.info

    def begin(
        self,
        request_id: str,
        num_tokens: int,
        fixed_density: float | None = None,
        attention: str | None = None,
        config: dict | None = None,
    ) -> int:
        """Preallocate the request's KV for this stage's layers; returns the bytes reserved.
        attention, config (ProxyAttnConfig fields): this request's, instead of the stage's."""
        info = self.info
        cache = PreallocatedKVCache(
            len(self.layers), info.num_kv_heads, num_tokens, info.head_dim, self.dtype, self.device
        )
        context = attention_mod.PrefillContext(
            mode=attention or self.spec.attention,
            config=ProxyAttnConfig.from_dict(config) if config else self.config,
            num_layers=len(self.layers),
            num_heads=info.num_heads,
            device=self.device,
            backend=self.spec.backend,
            fixed_density=fixed_density,
        )
        with self.lock:
            self.caches[request_id] = cache
            self.contexts[request_id] = context
            self.records[request_id] = []
        return _cache_bytes(cache)

    def release(self, request_id: str) -> int:
        """Drop the request's KV (idempotent); returns the bytes freed."""
        with self.lock:
            cache = self.caches.pop(request_id, None)
            self.contexts.pop(request_id, None)
        freed = _cache_bytes(cache) if cache is not None else 0
        del cache
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    def held_bytes(self) -> int:
        """KV bytes held for all requests on this stage."""
        with self.lock:
            return sum(_cache_bytes(cache) for cache in self.caches.values())

    def timeline(self, request_id: str) -> list[ChunkRecord]:
        return list(self.records.pop(request_id, []))

    def attention_stats(self, request_id: str) -> tuple[float, float, torch.Tensor]:
        """(estimate seconds, attention seconds, sparsity sums [stage layers, Hq]) of the request."""
        context = self._context(request_id)
        estimate_s, attention_s = context.finish_timing()
        return estimate_s, attention_s, context.sparsity_sum.float().cpu()

    def model_shape(self) -> ModelShape:
        return self.shape

    def set_memory_limit(self, limit_bytes: int | None) -> None:
        """Cap what this stage may use for requests (e.g. its share of a GPU); None: no cap."""
        self.memory_limit_bytes = limit_bytes

    def free_bytes(self) -> int | None:
        """Memory free for a new request: the device's free memory (host's on the CPU), capped by
        the memory limit less the KV already held; None when unknown."""
        free = _available_memory_bytes(self.device)
        if self.memory_limit_bytes is not None:
            capped = self.memory_limit_bytes - self.held_bytes()
            free = capped if free is None else min(free, capped)
        return free

    def memory(self) -> dict:
        """Peak memory of this worker: the CUDA allocator's peak on GPU, the process max RSS."""
        stats = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if self.device.type == "cuda":
            stats["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            stats["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
            stats["device_name"] = torch.cuda.get_device_name(self.device)
        return stats

    def _cache(self, request_id: str) -> PreallocatedKVCache:
        cache = self.caches.get(request_id)
        if cache is None:
            raise KeyError(f"request {request_id} has no KV on stage {self.index} (released or never begun)")
        return cache

    def _context(self, request_id: str) -> attention_mod.PrefillContext:
        self._cache(request_id)
        return self.contexts[request_id]

    # ---- compute ----------------------------------------------------------------------------
    # ---- the collective transport ------------------------------------------------------------
    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a free TCP port) for the stages' process group; asked of stage 0."""
        import socket

        import ray as ray_module

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray_module.util.get_node_ip_address(), port

    def join_group(self, address: str, port: int, world_size: int, timeout_s: float) -> str:
        """Join the stages' torch.distributed group as rank `stage index` (NCCL on CUDA, gloo on
        the CPU). Send/recv then carry activations stage to stage without the object store.
        `timeout_s` bounds a send/recv whose peer died, so a survivor never waits forever."""
        import datetime

        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{address}:{port}",
            rank=self.index,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.pending_send = None
        return backend

    def _receive(self, num_tokens: int) -> torch.Tensor:
        import torch.distributed as dist

        buffer = torch.empty(1, num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(buffer, src=self.index - 1)
        return buffer

    def _send(self, hidden: torch.Tensor) -> None:
        import torch.distributed as dist

        if self.pending_send is not None:  # one send in flight: the next chunk may compute meanwhile
            self.pending_send[0].wait()
        tensor = hidden.contiguous()
        self.pending_send = (dist.isend(tensor, dst=self.index + 1), tensor)

    # ---- compute ----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        request_id: str,
        chunk: int,
        q_offset: int,
        payload: torch.Tensor | None,
        logit_rows: list[int] | None,
        num_tokens: int | None = None,
    ) -> torch.Tensor:
        """Run one chunk through this stage's layers.

        payload: token ids int64 [n] on the first stage; on later stages the previous stage's hidden
        states [1, n, hidden] (any device), or None when they come by the collective transport
        (then `num_tokens` = n, and the stage receives them from the previous rank). Returns, on the
        last stage, float32 logits [len(logit_rows), vocab] for those chunk-relative rows; on other
        stages the hidden states on the CPU, or an empty tensor when they were sent to the next rank.
        Chunks must arrive in order: the cache appends, so a chunk at the wrong offset is refused.
        """
        arrived = time.time()
        cache = self._cache(request_id)
        context = self.contexts[request_id]
        if cache.num_tokens != q_offset:
            raise RuntimeError(
                f"stage {self.index} got chunk {chunk} at offset {q_offset} "
                f"but holds {cache.num_tokens} tokens"
            )
        if payload is None and not self.is_first:
            payload = self._receive(num_tokens)
        start = time.time()  # compute starts once the input is here (waiting is not work)
        bytes_in = payload.numel() * payload.element_size()
        if self.is_first:
            hidden = self.embed(payload.to(self.device)[None])
        else:
            hidden = payload.to(self.device, self.dtype)
        n = hidden.shape[1]
        position_ids = torch.arange(q_offset, q_offset + n, device=self.device)[None]
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        with attention_mod.active_context(context):
            for layer in self.layers:
                hidden = layer(
                    hidden,
                    attention_mask=None,
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                    position_embeddings=position_embeddings,
                )
        if self.is_last:
            rows = torch.tensor(logit_rows or [], dtype=torch.long, device=self.device)
            out = self.lm_head(self.norm(hidden[0, rows])).float().cpu()
            bytes_out = out.numel() * out.element_size()
        elif num_tokens is not None:
            self._send(hidden)
            out = torch.empty(0)
            bytes_out = hidden.numel() * hidden.element_size()
        else:
            out = hidden.cpu()
            bytes_out = out.numel() * out.element_size()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        record = ChunkRecord(self.index, chunk, start, time.time(), bytes_in, bytes_out, start - arrived)
        self.records[request_id].append(record)
        return out

    def kv(self, request_id: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one global layer, [Hkv, N, d] on the CPU."""
        keys, values = self._cache(request_id).layer_kv(layer - self.spec.layer_start)
        return keys.cpu(), values.cpu()

    def fetch(
        self, request_id: str, max_chunk_bytes: int, layer_start: int = 0, layer_end: int | None = None
    ):
        """The FetchKV pieces of this stage's layers within [layer_start, layer_end), in the pool
        workers' format (ray_pool.PrefillWorker.fetch: little-endian numpy arrays of the keys and
        values of one layer and one token range, at most `max_chunk_bytes`, global layer numbers); a
        Ray streaming generator. First item {"kind": "missing"} when the request's KV is not here."""
        from .ray_pool import layer_kv_pieces

        cache = self.caches.get(request_id)
        if cache is None:
            yield {"kind": "missing"}
            return
        layer_end = self.spec.layer_stop if layer_end is None else layer_end
        for layer in range(max(layer_start, self.spec.layer_start), min(layer_end, self.spec.layer_stop)):
            keys, values = cache.layer_kv(layer - self.spec.layer_start)
            yield from layer_kv_pieces(layer, keys, values, max_chunk_bytes)


def _cache_bytes(cache: PreallocatedKVCache) -> int:
    return sum(layer.key_buffer.numel() * layer.key_buffer.element_size() * 2 for layer in cache.layers)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------
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


def _logit_positions(logits, num_tokens: int) -> list[int]:
    """The engine's `logits` argument: "last", "all", "none"/None, or absolute positions."""
    if isinstance(logits, str):
        choices = {"last": [num_tokens - 1], "all": list(range(num_tokens)), "none": []}
        if logits not in choices:
            raise PrefillError(f"logits must be 'last', 'all', 'none', a range or positions; got {logits!r}")
        return choices[logits]
    if logits is None:
        return []
    positions = list(logits)
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < num_tokens:
            raise PrefillError(f"logit position {p!r} is outside the prompt [0, {num_tokens})")
    return positions


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
        # the engine's id checks; the prompt's length is bounded by the planner's memory check,
        # not by max_position_embeddings
        tokens = token_tensor(token_ids, self.model_info.vocab_size)
        mode, config = attention or self.attention, config or self.config
        if mode not in attention_mod.MODES:
            raise PrefillError(f"attention must be one of {attention_mod.MODES}, got {mode!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise PrefillError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if mode == "proxy" and chunk_size % config.block_size:
            raise PrefillError(
                f"chunk_size ({chunk_size}) must be a multiple of block_size ({config.block_size})"
            )
        if fixed_density is not None and not 0.0 < float(fixed_density) <= 1.0:
            raise PrefillError(f"fixed_density must be in (0, 1], got {fixed_density!r}")
        positions = _logit_positions(logits, tokens.numel())
        attempts = 2 if retry else 1
        for attempt in range(1, attempts + 1):
            rid = request_id or uuid.uuid4().hex
            try:
                result = self._run(
                    rid,
                    tokens,
                    chunk_size,
                    positions,
                    fixed_density,
                    gather,
                    timeout_s,
                    window,
                    on_chunk_done,
                    (mode, config),
                )
            except StageUnavailableError:
                if attempt == attempts:
                    raise
                self.wait_restarted(timeout_s=timeout_s)
                continue
            result.extra["attempts"] = attempt
            return result
        raise AssertionError("unreachable")

    def _run(
        self,
        rid,
        tokens,
        chunk_size,
        positions,
        fixed_density,
        gather,
        timeout_s,
        window,
        on_chunk_done,
        attention_settings=None,
    ):
        n = tokens.numel()
        window = window or 2 * self.num_stages
        deadline = time.monotonic() + timeout_s
        started = time.perf_counter()
        num_chunks = math.ceil(n / chunk_size)
        collective = self.transport == "collective"
        mode, config = attention_settings or (self.attention, self.config)
        self._check_fits(n, chunk_size, len(positions), deadline)  # refuse before allocating anything
        try:
            if collective:
                self._ensure_group(deadline)
            begins = [s.begin.remote(rid, n, fixed_density, mode, config.to_dict()) for s in self.stages]
            reserved = self._get(begins, deadline)
            outputs: list[torch.Tensor] = []
            pending: list[tuple[int, list]] = []
            for c in range(num_chunks):
                q0, q1 = c * chunk_size, min(n, (c + 1) * chunk_size)
                rows = [p - q0 for p in positions if q0 <= p < q1]
                refs = []
                payload = tokens[q0:q1].clone()
                for s, stage in enumerate(self.stages):
                    last = s == self.num_stages - 1
                    if collective:  # hidden states go rank to rank; the driver only orders the calls
                        refs.append(
                            stage.forward.remote(
                                rid, c, q0, payload if s == 0 else None, rows if last else None, q1 - q0
                            )
                        )
                    else:  # the previous stage's output ref: Ray hands its value over when it is ready
                        payload = stage.forward.remote(rid, c, q0, payload, rows if last else None)
                        refs = [payload]
                pending.append((c, refs))
                # backpressure: wait for the oldest chunk once `window` are in flight, and drain at the end
                while pending and (len(pending) >= window or c == num_chunks - 1):
                    done_chunk, done_refs = pending.pop(0)
                    outputs.append(self._get_first_failure(done_refs, deadline)[-1])
                    del done_refs
                    if on_chunk_done is not None:
                        on_chunk_done(done_chunk)
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
        # the logits rows come back chunk by chunk (caller's order within a chunk); restore the
        # caller's order overall
        by_chunk = sorted(range(len(positions)), key=lambda i: positions[i] // chunk_size)
        logits_out = None
        if positions:
            ordered = torch.cat(outputs, dim=0)
            logits_out = torch.empty_like(ordered)
            logits_out[torch.tensor(by_chunk)] = ordered
        sparsity = torch.cat([sums for _, _, sums in stats], dim=0) / n
        info = self.model_info
        return PrefillResult(
            keys=keys,
            values=values,
            token_ids=tokens,
            logits=logits_out,
            logit_positions=positions,
            sparsity=sparsity,
            estimate_seconds=sum(e for e, _, _ in stats),
            attention_seconds=sum(a for _, a, _ in stats),
            total_seconds=time.perf_counter() - started,
            peak_memory_bytes=None,
            header=KVHeader.for_model(info, num_tokens=n, token_sha256=token_ids_sha256(tokens)),
            chunk_size=chunk_size,
            attention=mode,
            extra={
                "request_id": rid,
                "timeline": PipelineTimeline(records, self.num_stages, num_chunks),
                "ttft_s": ttft,
                "kv_bytes": sum(reserved),
                "layer_ranges": list(self.layer_ranges),
            },
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
    ) -> Iterator[dict]:
        """FetchKV for a request left on the stages (gather=False): the same items as a pool
        worker's `fetch` (token-id pieces first when asked, then "kv" pieces), gathered from the
        stages in layer order. {"kind": "missing"} when the request is unknown or a stage lost it
        (a restart); a stage dying mid-stream raises StageUnavailableError."""
        tokens = self._kept.get(request_id)
        if tokens is None:
            yield {"kind": "missing"}
            return
        deadline = time.monotonic() + timeout_s
        if include_token_ids:
            ids = tokens.numpy().astype("<i8", copy=False)
            per_piece = max(1, max_chunk_bytes // 8)
            for start in range(0, ids.shape[0], per_piece):
                end = min(ids.shape[0], start + per_piece)
                yield {"kind": "tokens", "start": start, "end": end, "data": ids[start:end].tobytes()}
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
                if item["kind"] == "missing":
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


def _num_layers(source: str | dict | None) -> int:
    if isinstance(source, dict):
        return int(source["num_hidden_layers"])
    from pathlib import Path

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
