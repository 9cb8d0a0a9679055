"""What ProxyAttn keeps of the dense attention, measured from inside a prefill.

`AttentionProbe` is an engine attention observer (`PrefillEngine.prefill(attention_observer=...)`):
per layer it sums the causal blocks kept and, for a few sampled query blocks of every chunk, the
share of the dense softmax mass that falls inside the kept key blocks (attention-mass recall).
The accuracy bench (bench/accuracy.py) and `proxyprefill calibrate` both measure with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from proxyprefill.kernels.index import causal_blocks_per_row


@dataclass
class AttentionProbe:
    """An engine attention observer: causal sparsity and sampled attention-mass recall per layer.

    Sparsity: 1 - kept_blocks[l] / causal_blocks[l], both summed over chunks and heads (dense
    chunks keep every causal block of `block_size`). Recall: for query block m of a chunk, row p of head h,
        recall = sum over keys t <= p in kept blocks of softmax_t(scale * q_p . k_t),
    averaged over the sampled rows and heads. Sampled blocks: the chunk's last query block plus
    `random_blocks` others drawn with a generator seeded by (seed, layer, q_offset), so every
    variant samples the same rows of the same prompt.
    """

    num_layers: int
    scale: float
    block_size: int
    random_blocks: int = 3
    seed: int = 0
    measure_recall: bool = True  # off: sparsity only (recall costs a dense softmax per sampled block)
    kept_blocks: list[float] = field(init=False)
    causal_blocks: list[float] = field(init=False)
    recall_sum: list[float] = field(init=False)
    recall_rows: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.kept_blocks = [0.0] * self.num_layers
        self.causal_blocks = [0.0] * self.num_layers
        self.recall_sum = [0.0] * self.num_layers
        self.recall_rows = [0] * self.num_layers

    def __call__(self, layer: int, q, k, v, stats, q_offset: int) -> None:
        if stats is None:  # dense attention: every causal block kept, recall 1 by definition
            return self._count_dense(layer, q, q_offset)
        index = stats.index
        causal = index.causal_blocks().double()
        heads = index.block_counts.shape[0] * index.block_counts.shape[1]
        self.kept_blocks[layer] += float(index.block_counts.double().sum())
        self.causal_blocks[layer] += float(causal.sum()) * heads
        if not self.measure_recall:
            return
        for m in self._sampled_blocks(index.num_query_blocks, layer, q_offset):
            kept = index.to_dense(rows=slice(m, m + 1))[:, :, 0]  # [B, Hq, Nk_blocks]
            recall = block_recall(q, k, kept, index.block_size, q_offset, m, self.scale)
            self.recall_sum[layer] += float(recall.sum())
            self.recall_rows[layer] += recall.numel()

    def _count_dense(self, layer: int, q, q_offset: int) -> None:
        rows = -(-q.shape[2] // self.block_size)
        causal = causal_blocks_per_row(rows, q_offset, self.block_size).sum().item()
        self.kept_blocks[layer] += causal * q.shape[0] * q.shape[1]
        self.causal_blocks[layer] += causal * q.shape[0] * q.shape[1]

    def _sampled_blocks(self, num_blocks: int, layer: int, q_offset: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 10_007 + q_offset)
        others = torch.randperm(max(0, num_blocks - 1), generator=generator)[: self.random_blocks]
        return sorted({num_blocks - 1, *others.tolist()})

    def sparsity(self) -> dict:
        per_layer = [
            1.0 - kept / causal if causal else 0.0
            for kept, causal in zip(self.kept_blocks, self.causal_blocks)
        ]
        total_kept, total_causal = sum(self.kept_blocks), sum(self.causal_blocks)
        overall = 1.0 - total_kept / total_causal if total_causal else 0.0
        return {"overall": overall, "per_layer": per_layer}

    def recall(self) -> dict:
        per_layer = [s / n if n else 1.0 for s, n in zip(self.recall_sum, self.recall_rows)]
        rows = sum(self.recall_rows)
        overall = sum(self.recall_sum) / rows if rows else 1.0
        return {"overall": overall, "min_layer": min(per_layer), "per_layer": per_layer, "rows": rows}


def block_recall(q, k, kept, block_size: int, q_offset: int, m: int, scale: float) -> torch.Tensor:
    """Dense attention mass inside the kept key blocks for the rows of query block m.

    q [B, Hq, Nq, d] (chunk), k [B, Hkv, Nk, d] (prefix), kept bool [B, Hq, Nk_blocks].
    Returns float32 [B, Hq, rows]: per row, the share of its causal softmax mass in kept blocks.
    """
    hq, nq, hkv = q.shape[1], q.shape[2], k.shape[1]
    r0, r1 = m * block_size, min(nq, (m + 1) * block_size)
    keys = q_offset + r1  # keys past the block's last query are invisible to all its rows
    rows = q[:, :, r0:r1].float()
    kf = k[:, :, :keys].float().repeat_interleave(hq // hkv, dim=1)
    logits = torch.einsum("bhid,bhjd->bhij", rows, kf) * scale
    positions = q_offset + torch.arange(r0, r1, device=q.device)
    visible = torch.arange(keys, device=q.device)[None, :] <= positions[:, None]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    token_kept = kept.repeat_interleave(block_size, dim=-1)[..., :keys]  # [B, Hq, keys]
    return (probs * token_kept[:, :, None, :]).sum(dim=-1)
