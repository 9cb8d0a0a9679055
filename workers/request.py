"""One prefill request, validated once, for the engine and the pipeline driver alike.

`build_request` turns what a caller passes (token ids in any of the accepted forms, a chunk size,
the logits wanted, the attention mode and settings) into a `PrefillRequest`, or raises
PrefillError naming the field that is wrong. Nothing is computed or allocated before that, and
nothing after it checks the same things again.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from proxyprefill.kernels.config import ProxyAttnConfig

from .attention import MODES
from .model import ModelInfo


class PrefillError(ValueError):
    """A prefill request that cannot run (empty, out-of-vocabulary ids, too long, bad options)."""


@dataclass(frozen=True)
class PrefillRequest:
    """A checked request.

    token_ids: CPU int64 [N]. logit_positions: the prompt positions whose logits are returned,
    in the caller's order. mode: "proxy" or "dense". config: the settings of layer 0 (and of
    every layer when layer_configs is None); layer_configs: one per layer of the model.
    fixed_density: (0, 1] keeps ceil(density x causal blocks) of every row instead of the
    measured budgets; for timing runs on random weights, whose attention is near uniform.
    """

    token_ids: torch.Tensor
    chunk_size: int
    logit_positions: list[int]
    mode: str
    config: ProxyAttnConfig
    layer_configs: tuple[ProxyAttnConfig, ...] | None = None
    fixed_density: float | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def chunks(self):
        """(start, end) of every chunk, in order."""
        n = self.num_tokens
        return [(start, min(n, start + self.chunk_size)) for start in range(0, n, self.chunk_size)]


def build_request(
    info: ModelInfo,
    token_ids,
    chunk_size: int,
    logits,
    mode: str,
    config: ProxyAttnConfig | list | tuple,
    fixed_density: float | None = None,
    check_positions: bool = True,
) -> PrefillRequest:
    """A PrefillRequest for `info`'s model, or PrefillError.

    config: one ProxyAttnConfig, or one per layer (sharing a block size: the chunk grid).
    check_positions: refuse prompts longer than the model's max_position_embeddings (a sharded
    prefill bounds the length by its memory plan instead).
    """
    if mode not in MODES:
        raise PrefillError(f"attention must be one of {MODES}, got {mode!r}")
    config, layer_configs = _configs(info, config)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise PrefillError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if mode == "proxy":
        if chunk_size % config.block_size:
            raise PrefillError(
                f"chunk_size ({chunk_size}) must be a multiple of block_size ({config.block_size})"
            )
        for layer_config in layer_configs or (config,):
            if info.num_kv_heads % layer_config.proxy_groups:
                raise PrefillError(
                    f"proxy_groups ({layer_config.proxy_groups}) must divide the model's KV heads "
                    f"({info.num_kv_heads})"
                )
    if fixed_density is not None and not 0.0 < float(fixed_density) <= 1.0:
        raise PrefillError(f"fixed_density must be in (0, 1], got {fixed_density!r}")
    ids = token_tensor(token_ids, info.vocab_size, info.max_position_embeddings if check_positions else None)
    return PrefillRequest(
        token_ids=ids,
        chunk_size=chunk_size,
        logit_positions=logit_positions(logits, int(ids.numel())),
        mode=mode,
        config=config,
        layer_configs=layer_configs,
        fixed_density=fixed_density,
    )


def _configs(info: ModelInfo, config) -> tuple[ProxyAttnConfig, tuple[ProxyAttnConfig, ...] | None]:
    if isinstance(config, ProxyAttnConfig):
        return config, None
    if not isinstance(config, list | tuple) or not all(isinstance(c, ProxyAttnConfig) for c in config):
        raise PrefillError(f"config must be a ProxyAttnConfig or one per layer, got {type(config).__name__}")
    if len(config) != info.num_layers:
        raise PrefillError(
            f"config has {len(config)} per-layer settings; the model has {info.num_layers} layers"
        )
    if len({c.block_size for c in config}) > 1:
        raise PrefillError("per-layer configs must share one block_size (the chunk grid)")
    return config[0], tuple(config)


def logit_positions(logits, num_tokens: int) -> list[int]:
    """The positions `logits` asks for: "last", "all", "none"/None, a range or positions."""
    if isinstance(logits, str):
        choices = {"last": [num_tokens - 1], "all": list(range(num_tokens)), "none": []}
        if logits not in choices:
            raise PrefillError(f"logits must be 'last', 'all', 'none', a range or positions; got {logits!r}")
        return choices[logits]
    if logits is None:
        return []
    try:
        positions = list(logits)
    except TypeError:
        raise PrefillError(
            f"logits must be 'last', 'all', 'none', a range or positions; got {logits!r}"
        ) from None
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < num_tokens:
            raise PrefillError(f"logit position {p!r} is outside the prompt [0, {num_tokens})")
    return positions


def token_tensor(token_ids, vocab_size: int, max_positions: int | None = None) -> torch.Tensor:
    """Prompt token ids as a CPU int64 [N] tensor, or PrefillError naming what is wrong: text
    instead of ids, non-integers, wrong shape, empty, outside the vocabulary, or (when
    max_positions is given) longer than the model allows. Accepts lists, tuples, numpy arrays
    and tensors of shape [N] or [1, N]."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.detach()
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise PrefillError(f"token_ids must be 1-D (or [1, N]), got shape {tuple(token_ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise PrefillError(f"token_ids must be integers, got {ids.dtype}")
        ids = ids.to("cpu", torch.int64)
    else:
        if isinstance(token_ids, str | bytes):
            raise PrefillError("token_ids must be a sequence of integers, not text; tokenize first")
        if hasattr(token_ids, "__array__") and not isinstance(token_ids, list | tuple):
            return token_tensor(torch.as_tensor(token_ids), vocab_size, max_positions)  # numpy arrays
        values = []
        for position, value in enumerate(token_ids):
            try:
                if isinstance(value, bool):
                    raise TypeError
                values.append(operator.index(value))  # int and numpy integers, not floats
            except TypeError:
                raise PrefillError(f"token id {value!r} at position {position} is not an integer") from None
        ids = torch.tensor(values, dtype=torch.int64)
    if ids.numel() == 0:
        raise PrefillError("token_ids is empty; a prompt needs a non-empty sequence of token ids")
    bad = ((ids < 0) | (ids >= vocab_size)).nonzero()
    if bad.numel():
        position = int(bad[0, 0])
        raise PrefillError(
            f"token id {int(ids[position])} at position {position} is outside the vocabulary ({vocab_size})"
        )
    if max_positions is not None and ids.numel() > max_positions:
        raise PrefillError(f"prompt has {ids.numel()} tokens; the model allows at most {max_positions}")
    return ids
