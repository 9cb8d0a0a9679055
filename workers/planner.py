"""How many workers one prefill request gets, which layers each holds, and refusals up front.

Memory of a pipeline stage holding layers [a, b) of an L-layer model, for a prompt of N tokens
run in chunks of C (bytes; e = bytes per element of the model dtype):

    weights(a, b)  = (b - a) x layer_params x e  (+ embedding on stage 0, + final norm and LM head
                     on the last stage; nothing when the worker already holds the weights)
    kv(a, b)       = (b - a) x 2 x Hkv x d x N x e
    activations    = C x (4 x hidden + 3 x intermediate + 2 x Hq x d) x e     (one chunk in flight)
                     + 3 x C x Hq x d x 4                                    (float32 attention merge)
                     + P x vocab x 4 on the last stage                       (P logits rows)

A stage fits a worker when that sum is at most the worker's free memory minus `headroom`
(fragmentation, CUDA context, kernel workspaces).

Policy (`plan_prefill`):
1. A forced number of stages is honoured, or refused if it cannot fit.
2. Otherwise the *desired* count is 1 for prompts shorter than `shard_above_tokens`; longer prompts
   take every idle worker (pending tokens at most `idle_pending_tokens`), capped so each stage sees
   at least `min_chunks_per_stage` chunks (with C chunks and S stages the pipeline idles
   (S-1)/(C+S-1) of the time: more stages than chunks/4 buy little).
3. From the desired count upward, the first count whose balanced layer split fits is taken. Stages
   go to the least-loaded workers that can hold them (ties: more free memory first).
4. If no count up to min(workers, layers) fits, `InsufficientResources` reports what the request
   needs against what is free; the server maps it to RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

GIB = 1024**3


class InsufficientResources(Exception):
    """The request cannot be placed on the workers at hand (gRPC RESOURCE_EXHAUSTED).

    needed_bytes: the memory the request needs in total (all stages of the largest split tried);
    available_bytes: the free memory of all workers (after headroom).
    """

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, needed_bytes: int, available_bytes: int):
        super().__init__(message)
        self.needed_bytes = needed_bytes
        self.available_bytes = available_bytes


@dataclass(frozen=True)
class ModelShape:
    """The parts of a decoder-only model that decide its memory."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config, dtype_bytes: int = 2) -> ModelShape:
        """From a transformers config (or anything with the same attribute names)."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
            dtype_bytes=dtype_bytes,
            tied_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
        )

    @property
    def layer_param_bytes(self) -> int:
        """q, k, v, o projections, gate/up/down MLP and two norms of one decoder layer."""
        h, q_dim, kv_dim = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        params = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * self.intermediate_size + 2 * h
        return params * self.dtype_bytes

    @property
    def embedding_bytes(self) -> int:
        return self.vocab_size * self.hidden_size * self.dtype_bytes

    @property
    def head_bytes(self) -> int:
        """Final norm plus LM head (the LM head shares the embedding when tied)."""
        lm_head = 0 if self.tied_embeddings else self.embedding_bytes
        return lm_head + self.hidden_size * self.dtype_bytes

    @property
    def param_bytes(self) -> int:
        return self.num_layers * self.layer_param_bytes + self.embedding_bytes + self.head_bytes

    def kv_bytes(self, num_tokens: int, num_layers: int | None = None) -> int:
        layers = self.num_layers if num_layers is None else num_layers
        return layers * 2 * self.num_kv_heads * self.head_dim * num_tokens * self.dtype_bytes

    def activation_bytes(self, chunk_tokens: int, logits_rows: int = 0) -> int:
        per_token = 4 * self.hidden_size + 3 * self.intermediate_size + 2 * self.num_heads * self.head_dim
        working = (
            chunk_tokens * per_token * self.dtype_bytes
            + 3 * chunk_tokens * self.num_heads * self.head_dim * 4
        )
        return working + logits_rows * self.vocab_size * 4


@dataclass(frozen=True)
class WorkerState:
    """What the planner knows of one worker: free device memory and queued prompt tokens.
    weights_resident: the worker already holds the whole model (a replica), so its stage's
    weights cost nothing more."""

    worker_id: str | int
    free_bytes: int
    pending_tokens: int = 0
    weights_resident: bool = False


@dataclass(frozen=True)
class StagePlacement:
    worker_id: str | int
    layers: tuple[int, int]
    needed_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ShardPlan:
    """The plan for one request: stages in layer order, each with its worker and memory need."""

    stages: tuple[StagePlacement, ...]
    reason: str
    details: dict = field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def layer_ranges(self) -> list[tuple[int, int]]:
        return [stage.layers for stage in self.stages]

    @property
    def worker_ids(self) -> list:
        return [stage.worker_id for stage in self.stages]


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


def stage_bytes(
    shape: ModelShape,
    layers: tuple[int, int],
    num_stages: int,
    stage_index: int,
    prompt_tokens: int,
    chunk_tokens: int,
    logits_rows: int = 1,
    weights_resident: bool = False,
) -> int:
    """Memory one stage needs (see the module docstring)."""
    count = layers[1] - layers[0]
    last = stage_index == num_stages - 1
    weights = 0
    if not weights_resident:
        weights = count * shape.layer_param_bytes
        weights += shape.embedding_bytes if stage_index == 0 else 0
        weights += shape.head_bytes if last else 0
        if last and shape.tied_embeddings and stage_index != 0:
            weights += shape.embedding_bytes  # the tied LM head needs its own copy of the embedding
    kv = shape.kv_bytes(prompt_tokens, count)
    activations = shape.activation_bytes(min(chunk_tokens, prompt_tokens), logits_rows if last else 0)
    return weights + kv + activations


def plan_prefill(
    prompt_tokens: int,
    shape: ModelShape,
    workers: Sequence[WorkerState],
    chunk_tokens: int = 8192,
    logits_rows: int = 1,
    force_stages: int | None = None,
    shard_above_tokens: int = 65536,
    idle_pending_tokens: int = 0,
    min_chunks_per_stage: int = 4,
    headroom_bytes: int = 2 * GIB,
) -> ShardPlan:
    """Choose the number of stages, their layer ranges and workers for one request (see the module
    docstring), or raise InsufficientResources (cannot fit) / ValueError (bad arguments)."""
    if prompt_tokens <= 0 or chunk_tokens <= 0:
        raise ValueError(
            f"prompt_tokens and chunk_tokens must be positive, got {prompt_tokens}, {chunk_tokens}"
        )
    if not workers:
        raise InsufficientResources("no workers are available", 0, 0)
    most_stages = min(len(workers), shape.num_layers)
    if force_stages is not None and not 1 <= force_stages <= most_stages:
        raise ValueError(
            f"cannot use {force_stages} stages: {len(workers)} workers and {shape.num_layers} layers "
            f"allow 1..{most_stages}"
        )

    if force_stages is not None:
        candidates, reason = [force_stages], "forced by the request"
    else:
        desired = 1
        if prompt_tokens >= shard_above_tokens:
            idle = sum(1 for w in workers if w.pending_tokens <= idle_pending_tokens)
            chunks = -(-prompt_tokens // chunk_tokens)
            desired = max(1, min(idle, chunks // min_chunks_per_stage, most_stages))
        candidates = list(range(desired, most_stages + 1))
        reason = "speed: long prompt over idle workers" if desired > 1 else "fits one worker"

    for count in candidates:
        placement = _place(prompt_tokens, shape, workers, count, chunk_tokens, logits_rows, headroom_bytes)
        if placement is not None:
            if force_stages is None and count > candidates[0]:
                reason = f"memory: {candidates[0]} stage(s) do not fit"
            return ShardPlan(
                stages=tuple(placement),
                reason=reason,
                details={"prompt_tokens": prompt_tokens, "kv_bytes": shape.kv_bytes(prompt_tokens)},
            )

    count = candidates[-1]
    needs = [
        stage_bytes(shape, r, count, i, prompt_tokens, chunk_tokens, logits_rows)
        for i, r in enumerate(balanced_layer_ranges(shape.num_layers, count))
    ]
    free = sorted((max(0, w.free_bytes - headroom_bytes) for w in workers), reverse=True)
    needed, available = sum(needs), sum(free)
    raise InsufficientResources(
        f"prompt of {prompt_tokens} tokens needs {needed / GIB:.1f} GiB over {count} worker(s) "
        f"(KV {shape.kv_bytes(prompt_tokens) / GIB:.1f} GiB, largest stage {max(needs) / GIB:.1f} GiB); "
        f"free after {headroom_bytes / GIB:.1f} GiB headroom: "
        f"{', '.join(f'{f / GIB:.1f}' for f in free[:8])} GiB ({available / GIB:.1f} GiB in all)",
        needed_bytes=needed,
        available_bytes=available,
    )


def _place(prompt_tokens, shape, workers, count, chunk_tokens, logits_rows, headroom_bytes):
    """Stages of a balanced `count`-way split onto distinct workers, largest need first, each to
    the least-loaded worker that can hold it; None when some stage fits nowhere."""
    ranges = balanced_layer_ranges(shape.num_layers, count)
    full_need = [
        stage_bytes(shape, ranges[i], count, i, prompt_tokens, chunk_tokens, logits_rows)
        for i in range(count)
    ]
    order = sorted(range(count), key=lambda i: -full_need[i])
    ranked = sorted(workers, key=lambda w: (w.pending_tokens, -w.free_bytes))
    used: set[int] = set()
    placed: dict[int, StagePlacement] = {}
    for i in order:
        for j, worker in enumerate(ranked):
            if j in used:
                continue
            need = stage_bytes(
                shape, ranges[i], count, i, prompt_tokens, chunk_tokens, logits_rows, worker.weights_resident
            )
            if need <= worker.free_bytes - headroom_bytes:
                used.add(j)
                placed[i] = StagePlacement(worker.worker_id, ranges[i], need, worker.free_bytes)
                break
        else:
            return None
    return [placed[i] for i in range(count)]
