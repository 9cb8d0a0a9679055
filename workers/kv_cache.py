"""A preallocated KV cache that a stock Hugging Face model fills chunk by chunk.

Transformers' DynamicCache grows by `torch.cat` on every update: at 128k tokens in 8k chunks that
copies each layer's cache 16 times and, worse, needs old + new copies alive at once. Here every
layer owns two buffers [B, Hkv, N_max, d] allocated once; `update` copies the chunk's keys and
values into the next slots and returns views of the filled prefix [B, Hkv, filled, d], which is
exactly what the attention function must see (the chunk's queries against the whole prefix).

The layer subclasses transformers' DynamicLayer and the cache its Cache container, so the model's
own bookkeeping (get_seq_length, mask sizes) works unchanged on every transformers 5.x version.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's K/V in fixed buffers; `keys`/`values` are views of the filled prefix."""

    def __init__(self, batch: int, num_kv_heads: int, max_tokens: int, head_dim: int, dtype, device):
        super().__init__()
        self.max_tokens = max_tokens
        self.key_buffer = torch.empty(batch, num_kv_heads, max_tokens, head_dim, dtype=dtype, device=device)
        self.value_buffer = torch.empty_like(self.key_buffer)
        self.filled = 0
        self.dtype, self.device = dtype, torch.device(device)
        self.keys = self.key_buffer[:, :, :0]
        self.values = self.value_buffer[:, :, :0]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Buffers exist from construction; nothing to do."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write [B, Hkv, n, d] new states after the filled prefix; return the prefix views."""
        n = key_states.shape[-2]
        end = self.filled + n
        if end > self.max_tokens:
            raise RuntimeError(
                f"KV cache overflow: {self.filled} + {n} tokens exceed the preallocated {self.max_tokens}"
            )
        self.key_buffer[:, :, self.filled : end].copy_(key_states)
        self.value_buffer[:, :, self.filled : end].copy_(value_states)
        self.filled = end
        self.keys = self.key_buffer[:, :, :end]
        self.values = self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.filled

    def get_max_length(self) -> int:
        return self.max_tokens

    def reset(self) -> None:
        self.filled = 0
        self.keys = self.key_buffer[:, :, :0]
        self.values = self.value_buffer[:, :, :0]

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.filled + max_length
        self.filled = max(0, min(self.filled, max_length))
        self.keys = self.key_buffer[:, :, : self.filled]
        self.values = self.value_buffer[:, :, : self.filled]


class PreallocatedKVCache(Cache):
    """A transformers Cache whose layers are PreallocatedLayer buffers for `max_tokens` tokens."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        max_tokens: int,
        head_dim: int,
        dtype: torch.dtype,
        device,
        batch: int = 1,
    ):
        layers = [
            PreallocatedLayer(batch, num_kv_heads, max_tokens, head_dim, dtype, device)
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)

    @property
    def num_tokens(self) -> int:
        return self.layers[0].filled if self.layers else 0

    def layer_kv(self, layer_idx: int, batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled K and V of one layer and batch row, [Hkv, N, d] views of the buffers."""
        layer = self.layers[layer_idx]
        return layer.keys[batch_index], layer.values[batch_index]


def to_dynamic_cache(keys: list[torch.Tensor], values: list[torch.Tensor]) -> DynamicCache:
    """A transformers DynamicCache holding per-layer [Hkv, N, d] K/V (batch of one), ready for
    `model.generate(..., past_key_values=cache)` or a manual decode loop. The tensors are copied,
    so decoding never writes into the source."""
    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(zip(keys, values, strict=True)):
        cache.update(k.unsqueeze(0).clone(), v.unsqueeze(0).clone(), layer_idx)
    return cache
