"""The reply messages built from what a worker answered: logits in pieces, a prefill's Summary,
and ModelInfo. Pure functions of their inputs (the server adds metrics and logging)."""

from __future__ import annotations

import json

import numpy as np

from proxyprefill import __version__
from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.workers.kv_wire import NUMPY_DTYPES
from proxyprefill.workers.protocol import PrefillDone, WorkerDescription

from .config import ServerConfig
from .validation import Limits, PrefillPlan


def logit_pieces(result: PrefillDone, max_bytes: int):
    """The result's logits as Logits messages of at most `max_bytes` of rows each, in the dtype the
    worker sent them in (the model's when that is exact: protocol.narrowest_logits)."""
    logits = result.logits
    if logits is None or logits.shape[0] == 0:
        return
    logits = np.ascontiguousarray(logits, dtype=NUMPY_DTYPES[result.logits_dtype])
    positions = result.logit_positions
    rows = max(1, max_bytes // (logits.shape[1] * logits.itemsize))
    for start in range(0, logits.shape[0], rows):
        part = logits[start : start + rows]
        yield pb.Logits(
            positions=positions[start : start + rows],
            dtype=result.logits_dtype,
            shape=list(part.shape),
            data=part.tobytes(),
        )


def summary_message(
    plan: PrefillPlan, result: PrefillDone, queue_seconds: float, total_seconds: float
) -> pb.Summary:
    """What a finished prefill reports: sparsity (mean and per layer), timings, sizes."""
    sparsity = np.asarray(result.sparsity, dtype=np.float64)
    layer_sparsity = sparsity.mean(axis=1) if sparsity.ndim == 2 and sparsity.size else np.zeros(0)
    prefill_seconds = result.total_seconds
    return pb.Summary(
        request_id=plan.request_id,
        num_tokens=result.num_tokens,
        sparsity=float(sparsity.mean()) if sparsity.size else 0.0,
        layer_sparsity=layer_sparsity.tolist(),
        timings=pb.Timings(
            queue_seconds=queue_seconds,
            prefill_seconds=prefill_seconds,
            estimate_seconds=result.estimate_seconds,
            attention_seconds=result.attention_seconds,
            total_seconds=total_seconds,
        ),
        kv_bytes=result.kv_bytes if plan.kv_return != "none" else 0,
        peak_memory_bytes=result.peak_memory_bytes,
        tokens_per_second=result.num_tokens / prefill_seconds if prefill_seconds > 0 else 0.0,
        attention_mode=result.attention,
        profile=result.profile,  # the sharded route reports none
    )


def model_info_message(
    served: WorkerDescription, limits: Limits, config: ServerConfig, num_workers: int, has_chat_template: bool
) -> pb.ModelInfo:
    """The served model, the server's version and every limit a request is checked against."""
    info = served.model
    eos = info.eos_token_id
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return pb.ModelInfo(
        model_id=info.model_id,
        architecture=info.architecture,
        num_layers=info.num_layers,
        num_heads=info.num_heads,
        num_kv_heads=info.num_kv_heads,
        head_dim=info.head_dim,
        vocab_size=info.vocab_size,
        max_position_embeddings=info.max_position_embeddings,
        dtype=info.dtype,
        rope_theta=float(info.rope_theta),
        rope_scaling_json=json.dumps(info.rope_scaling),
        eos_token_ids=eos_ids,
        num_workers=num_workers,
        server_version=__version__,
        profile=served.profile,
        has_chat_template=has_chat_template,
        limits=pb.ServerLimits(
            max_prompt_tokens=limits.max_prompt_tokens,
            max_pending_tokens=config.max_pending_tokens,
            default_chunk_size=limits.default_chunk_size,
            min_chunk_size=limits.min_chunk_size,
            max_chunk_size=limits.max_chunk_size,
            default_lease_seconds=limits.default_lease_seconds,
            max_lease_seconds=limits.max_lease_seconds,
            kv_memory_cap_bytes=config.kv_memory_cap_bytes,
            max_kv_chunk_bytes=config.max_kv_chunk_bytes,
            max_logit_positions=limits.max_logit_positions,
            min_gamma=limits.min_gamma,
            min_budget_tokens_floor=limits.min_budget_tokens_floor,
            allowed_strides=limits.allowed_strides,
            default_attention_mode=limits.default_attention,
            max_pipeline_stages=limits.max_pipeline_stages,
            shard_above_tokens=config.shard_above_tokens,
        ),
    )
