"""The attention function the engine registers with transformers' AttentionInterface.

A stock Hugging Face model (Llama, Qwen2/3, Mistral) loaded with
`attn_implementation=ATTENTION_NAME` calls `prefill_attention(module, q, k, v, mask, ...)` in
every layer, with q [B, Hq, Nq, d] for the chunk (after RoPE) and k, v [B, Hkv, Nk, d] for the whole
prefix after the cache update, so the chunk's first query sits at q_offset = Nk - Nq. It returns
[B, Nq, Hq, d] as transformers expects.

What to do (ProxyAttn or dense, which config, where to record timings and sparsity) comes from the
`PrefillContext` the engine activates around a prefill (`active_context`). Outside of one, e.g.
when the same model object decodes, the function computes exact dense causal attention.

Dense causal attention with a query offset lives in `proxyprefill.kernels.dense` (cuDNN on CUDA).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from proxyprefill.kernels.api import ProxyAttnStats
from proxyprefill.kernels.chunk import attention_chunk
from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.kernels.dense import dense_causal_attention, dense_path_used  # noqa: F401 (re-exported)
from proxyprefill.kernels.index import causal_blocks_per_row

ATTENTION_NAME = "proxyprefill"
MODES = ("proxy", "dense")


# --------------------------------------------------------------------------------------------
# Per-prefill context
# --------------------------------------------------------------------------------------------
@dataclass
class PrefillContext:
    """What the attention function does during one prefill, and what it records.

    layer_configs: one config per layer (a calibrated profile's per-layer gamma); None = `config`
    in every layer.
    sparsity_sum[layer, head] accumulates (causal sparsity of the chunk) x (chunk tokens); the
    engine divides by the prompt length. Timings: CUDA event triples (start, estimated, done)
    per call on GPU, synchronised once at the end; perf_counter sums on CPU.
    """

    mode: str
    config: ProxyAttnConfig
    num_layers: int
    num_heads: int
    device: torch.device
    backend: str = "auto"
    observer: Callable | None = None
    fixed_density: float | None = None
    layer_configs: tuple[ProxyAttnConfig, ...] | None = None
    sparsity_sum: torch.Tensor = field(init=False)
    events: list = field(default_factory=list)
    estimate_seconds: float = 0.0
    attention_seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"attention must be one of {MODES}, got {self.mode!r}")
        self.sparsity_sum = torch.zeros(
            self.num_layers, self.num_heads, dtype=torch.float64, device=self.device
        )

    # timing -------------------------------------------------------------------------------
    def _mark(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _record(self, start, estimated, done) -> None:
        if self.device.type == "cuda":
            self.events.append((start, estimated, done))
        else:
            self.estimate_seconds += estimated - start
            self.attention_seconds += done - estimated

    def finish_timing(self) -> tuple[float, float]:
        """(estimate_seconds, attention_seconds), synchronising CUDA once."""
        if self.events:
            torch.cuda.synchronize()
            for start, estimated, done in self.events:
                self.estimate_seconds += start.elapsed_time(estimated) / 1000.0
                self.attention_seconds += estimated.elapsed_time(done) / 1000.0
            self.events.clear()
        return self.estimate_seconds, self.attention_seconds


_active: contextvars.ContextVar[PrefillContext | None] = contextvars.ContextVar(
    "proxyprefill_ctx", default=None
)


@contextlib.contextmanager
def active_context(context: PrefillContext):
    """Route the registered attention function through `context` inside the block."""
    token = _active.set(context)
    try:
        yield context
    finally:
        _active.reset(token)


# --------------------------------------------------------------------------------------------
# ProxyAttn for one chunk, with its stages timed
# --------------------------------------------------------------------------------------------
def fixed_density_budgets(
    num_heads: int, num_queries: int, q_offset: int, density: float, config: ProxyAttnConfig, device
) -> torch.Tensor:
    """Budgets keeping ceil(density x causal blocks) of every row: int64 [1, Hq, Mq]. For timing
    at a chosen sparsity where the model's attention (e.g. random weights) is near uniform."""
    mq = -(-num_queries // config.block_size)
    causal = causal_blocks_per_row(mq, q_offset, config.block_size, device)
    budget = torch.ceil(causal.double() * density).long().clamp(min=1)
    return torch.minimum(budget, causal).expand(1, num_heads, mq).contiguous()


def _fixed_density_override(density: float):
    """A budget override for attention_chunk keeping `density` of every row (benchmarks only);
    the measured budgets are still computed, so estimation is timed in full."""

    def override(budgets: torch.Tensor, q_offset: int, config: ProxyAttnConfig) -> torch.Tensor:
        b, hq, mq = budgets.shape
        fixed = fixed_density_budgets(hq, mq * config.block_size, q_offset, density, config, budgets.device)
        return fixed.expand(b, -1, -1)

    return override


def _proxy_chunk(ctx: PrefillContext, layer_idx, q, k, v, q_offset, scale):
    config = ctx.config if ctx.layer_configs is None else ctx.layer_configs[layer_idx]
    start = ctx._mark()
    estimated = start  # a dense chunk has no estimation

    def mark_estimated() -> None:
        nonlocal estimated
        estimated = ctx._mark()

    override = None if ctx.fixed_density is None else _fixed_density_override(ctx.fixed_density)
    chunk = attention_chunk(
        q,
        k,
        v,
        config,
        q_offset,
        scale,
        ctx.backend,
        on_estimated=mark_estimated,
        budget_override=override,
    )
    ctx._record(start, estimated, ctx._mark())
    if chunk.index is None:
        return chunk.out, None
    # causal sparsity of this chunk per head, weighted by its tokens; no host sync
    index = chunk.index
    total = int(causal_blocks_per_row(index.num_query_blocks, q_offset, ctx.config.block_size).sum())
    kept = index.block_counts[0].to(torch.float64).sum(dim=-1)
    ctx.sparsity_sum[layer_idx] += (1.0 - kept / total) * q.shape[2]
    return chunk.out, ProxyAttnStats(index=index, dense_fallback=False)


def prefill_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """transformers attention-interface entry: returns (out [B, Nq, Hq, d], None)."""
    ctx = _active.get()
    q_offset = key.shape[2] - query.shape[2]
    if ctx is None:
        if attention_mask is not None:  # padded batches etc.: transformers' own SDPA path
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout, scaling, **kwargs
            )
        out = dense_causal_attention(query, key, value, q_offset, scaling)
        return out.transpose(1, 2).contiguous(), None

    layer_idx = module.layer_idx
    stats = None
    if ctx.mode == "dense":
        start = ctx._mark()
        out = dense_causal_attention(query, key, value, q_offset, scaling)
        ctx._record(start, start, ctx._mark())
    else:
        out, stats = _proxy_chunk(ctx, layer_idx, query, key, value, q_offset, scaling)
    if ctx.observer is not None:
        ctx.observer(layer_idx, query, key, value, stats, q_offset)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register `prefill_attention` under ATTENTION_NAME (idempotent); returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefill_attention)
    return ATTENTION_NAME
