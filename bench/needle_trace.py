"""Where a sparse prefill drops the needle, and which rule of ProxyAttn dropped it.

An engine attention observer for one retrieval prompt. In the chunk that holds the prompt's
last token, for every layer and query head it looks at the last query block (whose last row
predicts the first answer token) and the key block holding the needle's value:

- needle_share: dense softmax mass of the final token on the needle block (how much the head
  reads the needle at all; only heads above `min_share` are recorded);
- kept: whether the variant's index keeps that block for the head;
- for a dropped block, the first rule in this list that explains it, each an oracle question
  asked with the head's real budget k (its gamma budget, floored at min_budget_blocks, clamped):
    stride          the group's proxy at stride 1 ranks the block inside k, the strided one not;
    proxy ranking   the head's own dense block-average mass ranks it inside k, the proxy not
                    (group averaging or max-pooling hides the head's needle);
    last-block budget  the final token's own mass ranks it inside k, the block average over the
                    last query block's rows does not (the budget and ranking are per block);
    min budget      no ranking keeps it within k, and k is the floor min_budget_blocks (the
                    gamma budget was smaller still: a larger floor would keep it);
    budget          no ranking keeps it within the head's gamma budget.
Dense chunks (context at or below dense_below_tokens) drop nothing and are skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from proxyprefill.kernels import ProxyAttnConfig, api, reference

REASONS = ("stride", "proxy ranking", "last-block budget", "min budget", "budget")


@dataclass(frozen=True)
class HeadTrace:
    """One (layer, head) that reads the needle, in the final query block."""

    layer: int
    head: int
    needle_share: float
    kept: bool
    budget_blocks: int
    rank_proxy: int  # 0 = top block; by the group's estimator scores at the configured stride
    rank_proxy_stride1: int
    rank_head_block: int  # by the head's dense mass averaged over the last block's rows
    rank_head_final: int  # by the final token's own dense mass
    reason: str  # "" when kept

    def to_dict(self) -> dict:
        return asdict(self)


def _rank_of(values: torch.Tensor, index: int) -> torch.Tensor:
    """Per row of values [..., N]: how many entries beat values[..., index] (0 = the top)."""
    return (values > values[..., index : index + 1]).sum(dim=-1)


@dataclass
class NeedleTrace:
    """Observer; see the module docstring. `needle_block`: key block of the needle's value."""

    config: ProxyAttnConfig
    needle_block: int
    last_position: int  # absolute position of the prompt's last token
    scale: float
    min_share: float = 0.05
    layer_gammas: tuple[float, ...] = ()  # a per-layer gamma profile's; () = config.gamma everywhere
    heads: list[HeadTrace] = field(default_factory=list)

    @torch.no_grad()
    def __call__(self, layer: int, q, k, v, stats, q_offset: int) -> None:
        if stats is None or q_offset + q.shape[2] - 1 != self.last_position:
            return
        bs, index = self.config.block_size, stats.index
        m = index.num_query_blocks - 1
        r0 = m * bs
        kept = index.to_dense(rows=slice(m, m + 1))[0, :, 0, self.needle_block]  # [Hq]
        block_mass, final_mass = self._dense_block_mass(q[:, :, r0:], k, q_offset + r0)
        share = final_mass[:, self.needle_block]
        readers = (share >= self.min_share).nonzero().flatten().tolist()
        if not readers:
            return
        q_last = q[:, :, r0:]
        config = self.config.replace(gamma=self.layer_gammas[layer]) if self.layer_gammas else self.config
        budgets = reference.head_budgets(q_last, k, config, q_offset + r0, self.scale)[0, :, 0]
        rank_proxy = self._group_rank(q_last, k, q_offset + r0, config)
        rank_stride1 = self._group_rank(q_last, k, q_offset + r0, config.replace(stride=1))
        rank_block = _rank_of(block_mass, self.needle_block)
        rank_final = _rank_of(final_mass, self.needle_block)
        for head in readers:
            budget = int(budgets[head])
            ranks = (
                int(rank_proxy[head]),
                int(rank_stride1[head]),
                int(rank_block[head]),
                int(rank_final[head]),
            )
            is_kept = bool(kept[head])
            reason = "" if is_kept else self._reason(budget, *ranks)
            self.heads.append(
                HeadTrace(layer, head, float(share[head]), is_kept, budget, *ranks, reason=reason)
            )

    def _reason(
        self, budget: int, rank_proxy: int, rank_stride1: int, rank_block: int, rank_final: int
    ) -> str:
        if rank_stride1 < budget <= rank_proxy:
            return "stride"
        if rank_block < budget:
            return "proxy ranking"
        if rank_final < budget:
            return "last-block budget"
        if budget <= self.config.min_budget_blocks:
            return "min budget"
        return "budget"

    def _dense_block_mass(self, q_last, k, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per head: dense mass per key block averaged over the rows [Hq, Nkb], and the final
        row's mass per key block [Hq, Nkb]."""
        bs = self.config.block_size
        hq, rows, hkv, nk = q_last.shape[1], q_last.shape[2], k.shape[1], k.shape[2]
        keys = k[0].float().repeat_interleave(hq // hkv, dim=0)  # [Hq, Nk, d]
        logits = torch.einsum("hid,hjd->hij", q_last[0].float(), keys) * self.scale
        positions = offset + torch.arange(rows, device=q_last.device)
        visible = torch.arange(nk, device=q_last.device)[None, :] <= positions[:, None]
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        nkb = -(-nk // bs)
        probs = torch.nn.functional.pad(probs, (0, nkb * bs - nk)).reshape(hq, rows, nkb, bs).sum(-1)
        return probs.mean(dim=1), probs[:, -1]

    def _group_rank(self, q_last, k, offset: int, config: ProxyAttnConfig) -> torch.Tensor:
        """Rank of the needle block in its group's estimator scores, per query head [Hq]."""
        scores = api.estimate_block_scores(q_last, k, config, offset, self.scale, backend="torch")
        ranks = _rank_of(scores[0, :, 0], self.needle_block)  # [g]
        return ranks.repeat_interleave(q_last.shape[1] // scores.shape[1])

    def summary(self) -> dict:
        """Readers of the needle, how many lost it, and the rule behind each loss."""
        dropped = [h for h in self.heads if not h.kept]
        return {
            "readers": len(self.heads),
            "dropped": len(dropped),
            "dropped_share": sum(h.needle_share for h in dropped),
            "reasons": {r: sum(h.reason == r for h in dropped) for r in REASONS},
            "dropped_by_layer": {
                str(layer): sum(h.layer == layer for h in dropped)
                for layer in sorted({h.layer for h in dropped})
            },
            "dropped_heads": [h.to_dict() for h in dropped],
        }


def needle_token_span(prompt: str, needle: str, value: str, encode) -> tuple[int, int]:
    """Token positions [start, end) of the needle's value inside the encoded prompt.

    Found by encoding the prompt's text up to the value's first and last character: a
    tokenizer may merge across that boundary by one token, well inside a key block.
    """
    value_start = prompt.index(needle) + needle.index(value)
    return len(encode(prompt[:value_start])), len(encode(prompt[: value_start + len(value)]))
