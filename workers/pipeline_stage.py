"""One stage of a chunked pipeline prefill (workers/pipeline.py drives several).

A stage holds decoder layers [layer_start, layer_stop) of the model (workers/stage_model.py),
plus the embedding on the first stage and the final norm and LM head on the last, and per request
the KV of its layers. `forward` runs one chunk through its layers; the hidden states come from the
previous stage (a Ray object, or a torch.distributed recv) and go to the next.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch

from ..kernels.config import ProxyAttnConfig
from . import attention as attention_mod
from .engine import _available_memory_bytes
from .kv_cache import PreallocatedKVCache
from .model import ModelInfo
from .pipeline_timeline import ChunkRecord
from .planner import ModelShape
from .runner import ModelRunner
from .stage_model import StageSpec, load_stage_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        self.dtype = DTYPES[spec.dtype]
        model, info, first_built_layer = load_stage_model(spec, attn_name, self.dtype)
        if not 0 <= spec.layer_start < spec.layer_stop <= info.num_layers:
            raise ValueError(
                f"layer range [{spec.layer_start}, {spec.layer_stop}) is outside the model's "
                f"{info.num_layers} layers"
            )
        self.info = info
        self.runner = ModelRunner.from_model(
            model,
            spec.layer_start,
            spec.layer_stop,
            first=self.is_first,
            last=self.is_last,
            built_from=first_built_layer,
        )
        self.layers = self.runner.layers
        text_config = (
            model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        )
        self.hidden_size = text_config.hidden_size
        self.shape = ModelShape.from_config(text_config, dtype_bytes=torch.finfo(self.dtype).bits // 8)
        self.memory_limit_bytes: int | None = None
        self.pending_send = None  # (work, tensor) of the collective transport's last send
        del model  # the other stages' layers go with it
        for module in self.runner.modules:
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
        inputs = payload.to(self.device) if self.is_first else payload.to(self.device, self.dtype)
        with attention_mod.active_context(context):
            hidden = self.runner.forward_chunk(inputs, q_offset, cache)
        if self.is_last:
            rows = torch.tensor(logit_rows or [], dtype=torch.long, device=self.device)
            out = self.runner.logits(hidden[0, rows]).cpu()
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
        workers' format (workers/kv_wire.py: little-endian numpy arrays of the keys and
        values of one layer and one token range, at most `max_chunk_bytes`, global layer numbers); a
        Ray streaming generator. First item protocol.KVMissing when the request's KV is not here."""
        from .kv_wire import layer_pieces
        from .protocol import KVMissing

        cache = self.caches.get(request_id)
        if cache is None:
            yield KVMissing()
            return
        layer_end = self.spec.layer_stop if layer_end is None else layer_end
        for layer in range(max(layer_start, self.spec.layer_start), min(layer_end, self.spec.layer_stop)):
            keys, values = cache.layer_kv(layer - self.spec.layer_start)
            yield from layer_pieces(layer, keys, values, max_chunk_bytes)


def _cache_bytes(cache: PreallocatedKVCache) -> int:
    return sum(layer.key_buffer.numel() * layer.key_buffer.element_size() * 2 for layer in cache.layers)
