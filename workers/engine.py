"""The chunked-prefill engine: a stock Hugging Face causal LM, ProxyAttn (or dense) attention, a
preallocated KV cache, and logits only where they are asked for.

    engine = PrefillEngine.from_pretrained(None, attention="proxy")     # embedded SmolLM2
    result = engine.prefill(token_ids, chunk_size=8192, logits="last")
    result.keys[layer]            # [Hkv, N, d]
    result.to_hf_cache()          # continue decoding with transformers

A prompt of N tokens is run in chunks [c0, c0 + C): each chunk goes through the model's base
(`model.model`) with explicit position ids; every layer writes its K/V into the preallocated
cache and attends with the chunk's queries over the whole prefix (kernels/ with q_offset = c0).
The LM head is applied to the requested positions only: [N, vocab] logits at 128k tokens and a
128k vocabulary would be 64 GB. The per-token log-likelihood (`token_nll=True`) is scored chunk by
chunk in row slices of the LM head, so it never holds more than a slice of logits either.

Input is validated before any compute (PrefillError, a ValueError, whose message names the problem).
"""

from __future__ import annotations

import contextlib
import operator
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from proxyprefill.kernels.config import ProxyAttnConfig

from . import attention as attention_mod
from . import profiles as profiles_mod
from .kv_cache import PreallocatedKVCache, to_dynamic_cache
from .kv_files import KVHeader
from .kv_wire import token_sha256
from .model import ModelInfo, load_model
from .profiles import Profile


class PrefillError(ValueError):
    """A prefill request that cannot run (empty, out-of-vocabulary ids, too long, bad options)."""


# Rows of LM-head logits scored at once for token_nll: at most 2**26 float32 values (256 MiB),
# i.e. 512 rows of a 128k vocabulary; the NLL costs no more memory than that at any length.
NLL_SLICE_VALUES = 1 << 26


def nll_slice_rows(vocab_size: int) -> int:
    return max(1, NLL_SLICE_VALUES // vocab_size)


class PrefillCancelled(Exception):
    """`should_stop()` returned True before a chunk or a layer; the partial work was dropped."""


def _available_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class PrefillResult:
    """The output of one prefill.

    keys/values: per layer [Hkv, N, d] (engine dtype and device). logits: float32
    [len(logit_positions), vocab] or None. sparsity: float [L, Hq], the fraction of causal blocks
    skipped, token-weighted over chunks (dense chunks count as 0). Times in seconds;
    peak_memory_bytes is the CUDA max_memory_allocated increase during the prefill (None on CPU).
    profile: the name of the calibrated profile whose settings served, "" when none did.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_ids: torch.Tensor
    logits: torch.Tensor | None
    logit_positions: list[int]
    sparsity: torch.Tensor
    estimate_seconds: float
    attention_seconds: float
    total_seconds: float
    peak_memory_bytes: int | None
    header: KVHeader
    chunk_size: int = 0
    attention: str = "dense"
    token_nll: torch.Tensor | None = None
    profile: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def to_hf_cache(self):
        """A transformers DynamicCache holding this KV (batch of one)."""
        return to_dynamic_cache(self.keys, self.values)


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


class PrefillEngine:
    """A loaded model plus the settings of its prefill attention.

    profile: a calibrated Profile of this model (workers/profiles.py). Requests that choose
    neither a config nor the attention mode run its settings; when it keeps dense attention (no
    ProxyAttn setting met its quality target) the engine's default mode becomes dense.
    """

    def __init__(
        self,
        model,
        tokenizer,
        model_info: ModelInfo,
        attention: str = "proxy",
        config: ProxyAttnConfig | None = None,
        backend: str = "auto",
        profile: Profile | None = None,
    ):
        if attention not in attention_mod.MODES:
            raise ValueError(f"attention must be one of {attention_mod.MODES}, got {attention!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.model_info = model_info
        self.attention = attention
        self.config = config or ProxyAttnConfig()
        self.backend = backend
        self.profile = profile
        if profile is not None:
            profile.check_model(model_info)
            if profile.settings.attention == "dense":
                self.attention = "dense"
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self._lm_head = model.get_output_embeddings()
        if model.config._attn_implementation != attention_mod.ATTENTION_NAME:
            raise ValueError(
                f"model must be loaded with attn_implementation={attention_mod.ATTENTION_NAME!r} "
                f"(got {model.config._attn_implementation!r}); "
                "use PrefillEngine.from_pretrained or from_model"
            )

    # construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike | None = None,
        attention: str = "proxy",
        config: ProxyAttnConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        model_id: str | None = None,
        profile: str | os.PathLike | Profile | None = profiles_mod.AUTO,
    ) -> PrefillEngine:
        """Load a HF directory, a .gguf file, or (path None) the embedded SmolLM2.

        device None: cuda if available, else cpu. dtype None: bfloat16 on cuda, float32 on cpu.
        profile: "auto" (the model's calibrated profile when one is in profiles_dir()), "none"
        or None, a profile file, or a Profile (see profiles.resolve).
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        name = attention_mod.register()
        model, tokenizer, info = load_model(path, name, device, dtype, model_id=model_id)
        chosen = profiles_mod.resolve(profile, info)
        return cls(
            model, tokenizer, info, attention=attention, config=config, backend=backend, profile=chosen
        )

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer=None,
        model_id: str = "custom",
        attention: str = "proxy",
        config: ProxyAttnConfig | None = None,
        backend: str = "auto",
        profile: str | os.PathLike | Profile | None = None,
    ) -> PrefillEngine:
        """Wrap an already built transformers causal LM (e.g. random weights from a config);
        profile as in from_pretrained, but none unless asked for."""
        from .model import check_supported, model_info_from_config

        check_supported(model.config)
        model.set_attn_implementation(attention_mod.register())
        model.eval()
        dtype = next(model.parameters()).dtype
        info = model_info_from_config(model.config, model_id, dtype)
        chosen = profiles_mod.resolve(profile, info)
        return cls(
            model, tokenizer, info, attention=attention, config=config, backend=backend, profile=chosen
        )

    # validation ------------------------------------------------------------------------------
    def _token_tensor(self, token_ids) -> torch.Tensor:
        info = self.model_info
        return token_tensor(token_ids, info.vocab_size, info.max_position_embeddings)

    def _logit_positions(self, logits, num_tokens: int) -> list[int]:
        if isinstance(logits, str):
            choices = {"last": [num_tokens - 1], "all": list(range(num_tokens)), "none": []}
            if logits not in choices:
                raise PrefillError(
                    f"logits must be 'last', 'all', 'none', a range or positions; got {logits!r}"
                )
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

    def _check_memory(self, num_tokens: int, chunk_size: int, num_logits: int) -> None:
        """Refuse prompts whose KV cache and chunk activations cannot fit, before allocating."""
        info = self.model_info
        item = torch.finfo(self.dtype).bits // 8
        kv = 2 * info.num_layers * info.num_kv_heads * num_tokens * info.head_dim * item
        text = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else None
        hidden = getattr(text, "hidden_size", info.num_heads * info.head_dim)
        inter = getattr(text, "intermediate_size", 4 * hidden)
        chunk = min(chunk_size, num_tokens)
        activations = chunk * (4 * hidden + 3 * inter + 2 * info.num_heads * info.head_dim) * item
        # float32 attention output/merge buffers of the chunk, plus the requested logits
        activations += 3 * chunk * info.num_heads * info.head_dim * 4 + num_logits * info.vocab_size * 4
        need = kv + activations
        available = _available_memory_bytes(self.device)
        if available is not None and need > available:
            gib = 1024**3
            raise PrefillError(
                f"prompt has {num_tokens} tokens; its KV cache ({kv / gib:.2f} GiB) and chunk activations "
                f"({activations / gib:.2f} GiB) exceed the {available / gib:.2f} GiB free on {self.device}"
            )

    def kv_header(self, token_ids) -> KVHeader:
        """The compatibility header for this model's KV of `token_ids`."""
        ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor(list(token_ids))
        ids = ids.reshape(-1)
        return KVHeader.for_model(
            self.model_info, num_tokens=int(ids.numel()), token_sha256=token_sha256(ids)
        )

    def _attention_settings(self, attention, config):
        """(mode, config, per-layer configs or None, profile name) for one request: what the
        request chose, else the profile's settings, else the engine's own. The profile name is
        "" unless the profile's settings served."""
        mode = attention or self.attention
        if mode not in attention_mod.MODES:
            raise PrefillError(f"attention must be one of {attention_mod.MODES}, got {mode!r}")
        profile_name = ""
        if config is None and attention != "dense" and self.profile is not None:
            settings = self.profile.settings
            config = settings.layer_configs(self.model_info.num_layers)
            if mode == "proxy" or settings.attention == "dense":
                profile_name = self.profile.name
        config = self.config if config is None else config
        if isinstance(config, ProxyAttnConfig):
            return mode, config, None, profile_name
        if not isinstance(config, list | tuple) or not all(isinstance(c, ProxyAttnConfig) for c in config):
            raise PrefillError(
                f"config must be a ProxyAttnConfig or one per layer, got {type(config).__name__}"
            )
        if len(config) != self.model_info.num_layers:
            raise PrefillError(
                f"config has {len(config)} per-layer settings; "
                f"the model has {self.model_info.num_layers} layers"
            )
        if len({c.block_size for c in config}) > 1:
            raise PrefillError("per-layer configs must share one block_size (the chunk grid)")
        return mode, config[0], tuple(config), profile_name

    # the prefill -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stop_between_layers(self, should_stop: Callable[[], bool] | None):
        """Checks `should_stop()` before every decoder layer while the block runs, so that a
        cancelled prefill stops within a layer's time rather than a chunk's."""
        if should_stop is None:
            yield
            return

        def check(module, args):
            if should_stop():
                raise PrefillCancelled("prefill cancelled inside a chunk")

        hooks = [layer.register_forward_pre_hook(check) for layer in self._base.layers]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    @torch.no_grad()
    def prefill(
        self,
        token_ids: Sequence[int] | torch.Tensor,
        chunk_size: int = 8192,
        logits: str | range | Sequence[int] = "last",
        config: ProxyAttnConfig | Sequence[ProxyAttnConfig] | None = None,
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        attention_observer: Callable | None = None,
        attention: str | None = None,
        fixed_density: float | None = None,
        token_nll: bool = False,
    ) -> PrefillResult:
        """Run the prompt through the model in chunks; see PrefillResult.

        config overrides the engine's ProxyAttnConfig (or its profile's settings) for this request:
        one config, or one per layer (same block size); attention overrides its mode.
        progress(tokens_done, total) is called after each chunk; should_stop() is checked before
        each chunk and each decoder layer (one chunk may cover a whole prompt) and raises
        PrefillCancelled when it returns True. attention_observer(layer,
        q, k, v, stats_or_None, q_offset) sees every layer of every chunk. fixed_density (0, 1]
        replaces the gamma budgets with ceil(density x causal blocks) per row (benchmarks on
        models whose attention is near uniform). token_nll=True also scores every next token
        (PrefillResult.token_nll), chunk by chunk.
        """
        mode, config, layer_configs, profile_name = self._attention_settings(attention, config)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise PrefillError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if mode == "proxy" and chunk_size % config.block_size:
            raise PrefillError(
                f"chunk_size ({chunk_size}) must be a multiple of block_size ({config.block_size})"
            )
        for layer_config in layer_configs or (config,):
            if mode == "proxy" and self.model_info.num_kv_heads % layer_config.proxy_groups:
                raise PrefillError(
                    f"proxy_groups ({layer_config.proxy_groups}) must divide the model's KV heads "
                    f"({self.model_info.num_kv_heads})"
                )
        if fixed_density is not None and not (0.0 < float(fixed_density) <= 1.0):
            raise PrefillError(f"fixed_density must be in (0, 1], got {fixed_density!r}")
        ids = self._token_tensor(token_ids)
        n = int(ids.numel())
        positions = self._logit_positions(logits, n)
        slice_rows = nll_slice_rows(self.model_info.vocab_size)
        self._check_memory(n, chunk_size, len(positions) + (slice_rows if token_nll else 0))

        info = self.model_info
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        cache = PreallocatedKVCache(
            info.num_layers, info.num_kv_heads, n, info.head_dim, self.dtype, self.device
        )
        out_logits = None
        if positions:
            out_logits = torch.empty(len(positions), info.vocab_size, dtype=torch.float32, device=self.device)
        wanted = torch.tensor(positions, dtype=torch.int64)
        nll = torch.empty(n - 1, dtype=torch.float32, device=self.device) if token_nll else None
        ctx = attention_mod.PrefillContext(
            mode=mode,
            config=config,
            layer_configs=layer_configs,
            num_layers=info.num_layers,
            num_heads=info.num_heads,
            device=self.device,
            backend=self.backend,
            observer=attention_observer,
            fixed_density=fixed_density,
        )
        device_ids = ids.to(self.device)
        with attention_mod.active_context(ctx), self._stop_between_layers(should_stop):
            for start in range(0, n, chunk_size):
                if should_stop is not None and should_stop():
                    raise PrefillCancelled(f"prefill cancelled after {start} of {n} tokens")
                end = min(n, start + chunk_size)
                position_ids = torch.arange(start, end, device=self.device)[None]
                hidden = self._base(
                    input_ids=device_ids[None, start:end],
                    position_ids=position_ids,
                    past_key_values=cache,
                    use_cache=True,
                ).last_hidden_state[0]
                if out_logits is not None:
                    slots = ((wanted >= start) & (wanted < end)).nonzero().flatten()
                    if slots.numel():
                        rows = (wanted[slots] - start).to(self.device)
                        out_logits[slots.to(self.device)] = self._lm_head(hidden[rows]).float()
                if nll is not None:
                    self._score_next_tokens(hidden, device_ids, start, nll, slice_rows)
                del hidden
                if progress is not None:
                    progress(end, n)
        estimate_s, attention_s = ctx.finish_timing()
        if cuda:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) - baseline
        else:
            peak = None
        total_s = time.perf_counter() - started
        keys, values = zip(*(cache.layer_kv(i) for i in range(info.num_layers)), strict=True)
        sparsity = (ctx.sparsity_sum / n).float().cpu()
        return PrefillResult(
            keys=list(keys),
            values=list(values),
            token_ids=ids,
            logits=out_logits,
            logit_positions=positions,
            sparsity=sparsity,
            estimate_seconds=estimate_s,
            attention_seconds=attention_s,
            total_seconds=total_s,
            peak_memory_bytes=peak,
            header=KVHeader.for_model(info, num_tokens=n, token_sha256=token_sha256(ids)),
            chunk_size=chunk_size,
            attention=mode,
            token_nll=None if nll is None else nll.cpu(),
            profile=profile_name,
        )

    def _score_next_tokens(
        self, hidden: torch.Tensor, ids: torch.Tensor, start: int, nll: torch.Tensor, slice_rows: int
    ) -> None:
        """nll[p] = -log softmax(lm_head(hidden))[ids[p + 1]] for the chunk's positions p that
        have a next token, `slice_rows` positions at a time."""
        end = min(start + hidden.shape[0], ids.numel() - 1)  # the last token has no next one
        for row in range(start, end, slice_rows):
            stop = min(end, row + slice_rows)
            logits = self._lm_head(hidden[row - start : stop - start]).float()
            targets = ids[row + 1 : stop + 1]
            picked = logits.gather(1, targets[:, None])[:, 0]
            nll[row:stop] = torch.logsumexp(logits, dim=-1) - picked
