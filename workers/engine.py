"""The chunked-prefill engine: a stock Hugging Face causal LM, ProxyAttn (or dense) attention, a
preallocated KV cache, and logits only where they are asked for.

    engine = PrefillEngine.from_pretrained(None, attention="proxy")     # embedded SmolLM2
    result = engine.prefill(token_ids, chunk_size=8192, logits="last")
    result.keys[layer]            # [Hkv, N, d]
    result.to_hf_cache()          # continue decoding with transformers

A prompt of N tokens is run in chunks [c0, c0 + C): each chunk goes through the model runner
(workers/runner.py: embedding, every decoder layer, final norm) at positions c0..c0 + C - 1;
every layer writes its K/V into the preallocated cache and attends with the chunk's queries over
the whole prefix (proxyprefill/kernels/ with q_offset = c0).
The LM head is applied to the requested positions only: [N, vocab] logits at 128k tokens and a
128k vocabulary would be 64 GB. The per-token log-likelihood (`token_nll=True`) is scored chunk by
chunk in row slices of the LM head, so it never holds more than a slice of logits either.

Input is validated once, before any compute (`request()`, workers/request.py: PrefillError, a
ValueError whose message names the problem); `run()` prefills a request so checked.
"""

from __future__ import annotations

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
from .request import PrefillError, PrefillRequest, build_request, token_tensor
from .runner import ModelRunner, PrefillCancelled

# the engine's API names these too
__all__ = ["PrefillCancelled", "PrefillEngine", "PrefillError", "PrefillResult", "token_tensor"]


# Rows of LM-head logits scored at once for token_nll: at most 2**26 float32 values (256 MiB),
# i.e. 512 rows of a 128k vocabulary; the NLL costs no more memory than that at any length.
NLL_SLICE_VALUES = 1 << 26


def nll_slice_rows(vocab_size: int) -> int:
    return max(1, NLL_SLICE_VALUES // vocab_size)


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


@dataclass(frozen=True)
class WarmUpReport:
    """What `PrefillEngine.warm_up` ran and how long it took.

    prompt_tokens: the synthetic prompt run through the whole model (0 when none fitted).
    key_lengths: the contexts at which the sparse kernels alone ran one chunk (one per length
    bucket the kernels are compiled for; empty off the Triton backend, which compiles nothing).
    """

    seconds: float
    chunk_size: int
    prompt_tokens: int
    key_lengths: tuple[int, ...]


# Tokens past the last whole chunk of the warm-up prompt: a ragged last chunk (not a multiple of
# 16) takes the kernels' and the libraries' unaligned paths, as most real prompts' last chunk does.
WARM_UP_TAIL = 77


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
        self.runner = ModelRunner.from_model(model)
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

    def request(
        self,
        token_ids,
        chunk_size: int = 8192,
        logits="last",
        config: ProxyAttnConfig | Sequence[ProxyAttnConfig] | None = None,
        attention: str | None = None,
        fixed_density: float | None = None,
    ) -> tuple[PrefillRequest, str]:
        """The checked request (workers/request.py) and the name of the profile whose settings
        serve it ("" when none do): what the request chose, else the profile's settings, else the
        engine's own."""
        mode = attention or self.attention
        profile_name = ""
        if config is None and attention != "dense" and self.profile is not None:
            settings = self.profile.settings
            config = settings.layer_configs(self.model_info.num_layers)
            if mode == "proxy" or settings.attention == "dense":
                profile_name = self.profile.name
        config = self.config if config is None else config
        request = build_request(self.model_info, token_ids, chunk_size, logits, mode, config, fixed_density)
        return request, profile_name

    # warm-up ---------------------------------------------------------------------------------
    @torch.no_grad()
    def warm_up(
        self,
        chunk_size: int = 8192,
        max_tokens: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> WarmUpReport:
        """Compile and plan, before the first request, what a request of up to `max_tokens`
        (default and cap: the model's max_position_embeddings) in chunks of `chunk_size` meets,
        so that it runs at steady-state speed:

        1. the model over a synthetic prompt of a dense first chunk, a sparse whole chunk and a
           ragged last chunk (the libraries' plans, the LM head, both kernel alignments);
        2. on the Triton backend, the sparse path of one chunk, whole and ragged, at one context
           per length bucket the kernels are compiled for (`triton_index.warm_up_key_lengths`),
           up to max_tokens, on scratch K/V (freed afterwards).

        progress(message) is called after each step. Runs in the engine's own attention mode
        and settings (its profile's, when it has one)."""
        started = time.perf_counter()
        info = self.model_info
        # what a request that chooses nothing runs (the profile's settings when there is one);
        # a one-token request checks chunk_size the way a real one would
        default, _ = self.request([0], chunk_size, logits="none")
        mode, config = default.mode, default.config
        limit = info.max_position_embeddings
        max_tokens = limit if not max_tokens else min(max_tokens, limit)
        say = progress or (lambda message: None)

        aligned = (config.dense_below_tokens // chunk_size + 2) * chunk_size
        prompt = min(aligned + WARM_UP_TAIL, max_tokens)
        ids = torch.randint(0, info.vocab_size, (prompt,), generator=torch.Generator().manual_seed(0))
        self.prefill(ids, chunk_size=chunk_size, logits="last")
        say(f"warm-up: model over {prompt} tokens in chunks of {chunk_size}")

        key_lengths: list[int] = []
        if mode == "proxy" and self._compiles_kernels():
            from proxyprefill.kernels.triton_index import warm_up_key_lengths

            key_lengths = warm_up_key_lengths(config.dense_below_tokens + 1, max_tokens, config.block_size)
            self._warm_up_sparse_kernels(key_lengths, chunk_size, config, say)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - started
        say(f"warm-up done in {seconds:.1f}s")
        return WarmUpReport(
            seconds=seconds, chunk_size=chunk_size, prompt_tokens=prompt, key_lengths=tuple(key_lengths)
        )

    def _compiles_kernels(self) -> bool:
        """Whether this engine's chunks run the Triton kernels (compiled per shape)."""
        from proxyprefill.kernels.registry import select_backend

        probe = torch.empty(1, 1, 1, self.model_info.head_dim, dtype=self.dtype, device=self.device)
        try:
            return select_backend(self.backend, probe).name == "triton" and self.device.type == "cuda"
        except ValueError:
            return False

    def _warm_up_sparse_kernels(self, key_lengths, chunk_size, config, say) -> None:
        """One sparse chunk per context of `key_lengths`, whole and ragged (the kernels compile
        a variant for lengths that are not multiples of 16), on K/V laid out as the cache's."""
        from proxyprefill.kernels.chunk import attention_chunk

        info = self.model_info
        longest = max(key_lengths, default=0)
        if not longest:
            return
        shape = (1, info.num_kv_heads, longest, info.head_dim)
        try:
            keys = torch.randn(shape, dtype=self.dtype, device=self.device)
            values = torch.randn(shape, dtype=self.dtype, device=self.device)
        except torch.cuda.OutOfMemoryError:
            say(f"warm-up: no memory for {longest}-token scratch K/V; length buckets left cold")
            return
        for length in key_lengths:
            whole = min(chunk_size, length)
            q_offset = length - whole
            for queries in {whole, max(1, whole - WARM_UP_TAIL)}:
                q = torch.randn(
                    1, info.num_heads, queries, info.head_dim, dtype=self.dtype, device=self.device
                )
                end = q_offset + queries
                attention_chunk(
                    q, keys[:, :, :end], values[:, :, :end], config, q_offset, backend=self.backend
                )
            say(f"warm-up: sparse kernels at {length} keys")
        del keys, values

    # the prefill -----------------------------------------------------------------------------
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
        request, profile_name = self.request(token_ids, chunk_size, logits, config, attention, fixed_density)
        return self.run(request, profile_name, progress, should_stop, attention_observer, token_nll)

    @torch.no_grad()
    def run(
        self,
        request: PrefillRequest,
        profile_name: str = "",
        progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        attention_observer: Callable | None = None,
        token_nll: bool = False,
    ) -> PrefillResult:
        """Prefill a checked request (`request()`); the arguments as for `prefill`."""
        info = self.model_info
        ids, n, positions = request.token_ids, request.num_tokens, request.logit_positions
        slice_rows = nll_slice_rows(info.vocab_size)
        self._check_memory(n, request.chunk_size, len(positions) + (slice_rows if token_nll else 0))
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
            mode=request.mode,
            config=request.config,
            layer_configs=request.layer_configs,
            num_layers=info.num_layers,
            num_heads=info.num_heads,
            device=self.device,
            backend=self.backend,
            observer=attention_observer,
            fixed_density=request.fixed_density,
        )
        device_ids = ids.to(self.device)
        with attention_mod.active_context(ctx):
            for start, end in request.chunks():
                if should_stop is not None and should_stop():
                    raise PrefillCancelled(f"prefill cancelled after {start} of {n} tokens")
                hidden = self.runner.forward_chunk(device_ids[start:end], start, cache, should_stop)[0]
                if out_logits is not None:
                    self._keep_logits(hidden, wanted, start, end, out_logits)
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
            chunk_size=request.chunk_size,
            attention=request.mode,
            token_nll=None if nll is None else nll.cpu(),
            profile=profile_name,
        )

    def _keep_logits(self, hidden, wanted: torch.Tensor, start: int, end: int, out: torch.Tensor) -> None:
        """out[i] = logits at prompt position wanted[i], for the wanted positions in [start, end)."""
        slots = ((wanted >= start) & (wanted < end)).nonzero().flatten()
        if slots.numel():
            rows = (wanted[slots] - start).to(self.device)
            out[slots.to(self.device)] = self.runner.logits(hidden[rows])

    def _score_next_tokens(
        self, hidden: torch.Tensor, ids: torch.Tensor, start: int, nll: torch.Tensor, slice_rows: int
    ) -> None:
        """nll[p] = -log softmax(lm_head(hidden))[ids[p + 1]] for the chunk's positions p that
        have a next token, `slice_rows` positions at a time."""
        end = min(start + hidden.shape[0], ids.numel() - 1)  # the last token has no next one
        for row in range(start, end, slice_rows):
            stop = min(end, row + slice_rows)
            logits = self.runner.logits(hidden[row - start : stop - start])
            targets = ids[row + 1 : stop + 1]
            picked = logits.gather(1, targets[:, None])[:, 0]
            nll[row:stop] = torch.logsumexp(logits, dim=-1) - picked
