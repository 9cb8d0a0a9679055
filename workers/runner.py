"""The model runner: one prefill chunk through a range of decoder layers, written out.

    runner = ModelRunner.from_model(model)                     # all layers: the engine
    runner = ModelRunner.from_model(model, 8, 16, last=False)  # a pipeline stage's share
    hidden = runner.forward_chunk(token_ids_or_hidden, q_offset, cache)

A chunk of n tokens at positions [q_offset, q_offset + n) goes

    token ids ─ embed (first range only) ─▶ hidden [1, n, H] ─ rotary(position ids) ─▶
    each decoder layer (attention writes the chunk's K/V into `cache`, then attends over the
    whole prefix, see workers/attention.py) ─ final norm (last range only) ─▶ hidden [1, n, H]

and the caller applies the LM head to the rows it wants (`ModelRunner.logits`). The single-GPU
engine (workers/engine.py) runs this over [0, L); every pipeline stage (workers/pipeline_stage.py)
runs it over its own [a, b). Neither calls the Hugging Face base model's forward, so the two cannot
drift: what a stage computes for its layers is what the engine computes for them.

Model-family specifics live here. Every supported family (`model.SUPPORTED_ARCHITECTURES`:
Llama, Mistral, Qwen2, Qwen3) has the same decoder shape: a base model with `embed_tokens`,
`rotary_emb`, `layers` and `norm`, and an LM head from `get_output_embeddings()`. Per-family
details inside a layer (Qwen3's q/k norms, biases) stay in the stock layer code. The causal mask is
not built: the attention function knows the chunk's offset and is causal by construction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class PrefillCancelled(Exception):
    """`should_stop()` returned True before a chunk or a layer; the partial work was dropped."""


def decoder_of(model) -> torch.nn.Module:
    """The base model (embedding, rotary, layers, norm) of a causal LM."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


class ModelRunner:
    """Decoder layers [layer_start, layer_stop) of one model, plus the embedding when the range
    starts at layer 0 and the final norm and LM head when it ends at the last layer.

    The layers keep their module objects (hooks registered on them see every chunk); their
    `self_attn.layer_idx` is renumbered 0..n-1 so that they index the range's own KV cache.
    """

    def __init__(
        self,
        layers: torch.nn.ModuleList,
        rotary: torch.nn.Module,
        embed: torch.nn.Module | None = None,
        norm: torch.nn.Module | None = None,
        lm_head: torch.nn.Module | None = None,
    ):
        self.layers = layers
        self.rotary = rotary
        self.embed = embed
        self.norm = norm
        self.lm_head = lm_head
        for local, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = local

    @classmethod
    def from_model(
        cls,
        model,
        layer_start: int = 0,
        layer_stop: int | None = None,
        first: bool | None = None,
        last: bool | None = None,
        built_from: int = 0,
    ) -> ModelRunner:
        """The runner over layers [layer_start, layer_stop) of `model`.

        built_from: the global index of `model`'s first built layer (a stage's model may hold
        only its own layers). first/last: whether the range holds the embedding / the final norm
        and LM head; by default, whether it starts at 0 / ends at the model's last built layer.
        """
        base = decoder_of(model)
        built = list(base.layers)
        layer_stop = built_from + len(built) if layer_stop is None else layer_stop
        first = layer_start == 0 if first is None else first
        last = layer_stop == built_from + len(built) if last is None else last
        owned = built[layer_start - built_from : layer_stop - built_from]
        return cls(
            torch.nn.ModuleList(owned),
            base.rotary_emb,
            embed=base.embed_tokens if first else None,
            norm=base.norm if last else None,
            lm_head=model.get_output_embeddings() if last else None,
        )

    @property
    def modules(self) -> list[torch.nn.Module]:
        """Every module the runner holds (to move them to a device)."""
        parts = (self.layers, self.rotary, self.embed, self.norm, self.lm_head)
        return [part for part in parts if part is not None]

    def forward_chunk(
        self,
        inputs: torch.Tensor,
        q_offset: int,
        cache,
        should_stop: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """One chunk through the range: `inputs` is int64 token ids [n] when the range holds the
        embedding, else the previous range's hidden states [1, n, H]. Returns hidden [1, n, H],
        after the final norm when the range holds it. `should_stop()` is checked before every
        layer (one chunk may cover a whole prompt), raising PrefillCancelled."""
        hidden = self.embed(inputs[None]) if self.embed is not None else inputs
        n = hidden.shape[1]
        position_ids = torch.arange(q_offset, q_offset + n, device=hidden.device)[None]
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        for layer in self.layers:
            if should_stop is not None and should_stop():
                raise PrefillCancelled("prefill cancelled inside a chunk")
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        return self.norm(hidden) if self.norm is not None else hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 LM-head logits of normed hidden rows [r, H] -> [r, vocab]."""
        return self.lm_head(hidden).float()
