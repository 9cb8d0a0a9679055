"""The chunked-prefill engine on tiny random models (CPU, float32, seconds).

The oracle is the same weights in a stock transformers model with eager attention, run on the
whole prompt at once.
"""

from __future__ import annotations

import copy

import pytest
import torch

from proxyprefill.kernels import reference
from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.kernels.index import BlockSparseIndex
from proxyprefill.workers.attention import dense_causal_attention, fixed_density_budgets
from proxyprefill.workers.engine import PrefillCancelled, PrefillEngine, PrefillError
from proxyprefill.workers.kv_cache import PreallocatedKVCache

VOCAB = 320
BLOCK = 16


def tiny_config(kind: str = "llama"):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if kind == "qwen3":
        return Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(kind)


def build_pair(kind: str = "llama", attention: str = "dense", config: ProxyAttnConfig | None = None):
    """(engine, stock eager model) sharing weights but not their config objects."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config(kind)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
    stock = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    stock.load_state_dict(model.state_dict())
    config = config or ProxyAttnConfig(dense_below_tokens=0, block_size=BLOCK, stride=4, min_budget_tokens=0)
    engine = PrefillEngine.from_model(model, model_id=f"tiny-{kind}", attention=attention, config=config)
    return engine, stock


@pytest.fixture(scope="module")
def llama_pair():
    return build_pair("llama")


@pytest.fixture(scope="module")
def prompt():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (200,), generator=generator)


def stock_forward(stock, ids):
    with torch.no_grad():
        return stock(ids[None], use_cache=True)


# --------------------------------------------------------------------------------------------
# Dense chunked prefill reproduces the unchunked model
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [16, 48, 64, 200, 4096])
def test_dense_chunked_prefill_matches_full_forward(llama_pair, prompt, chunk_size):
    engine, stock = llama_pair
    expected = stock_forward(stock, prompt)
    result = engine.prefill(prompt, chunk_size=chunk_size, logits="all", attention="dense")
    assert result.logits.shape == (200, VOCAB) and result.logits.dtype == torch.float32
    torch.testing.assert_close(result.logits, expected.logits[0].float(), atol=2e-5, rtol=1e-4)
    for layer in range(2):
        torch.testing.assert_close(result.keys[layer], expected.past_key_values.layers[layer].keys[0])
        torch.testing.assert_close(result.values[layer], expected.past_key_values.layers[layer].values[0])
    assert result.keys[0].shape == (2, 200, 16)
    assert torch.equal(result.sparsity, torch.zeros(2, 4))
    assert result.kv_bytes == 2 * 2 * 2 * 200 * 16 * 4
    assert result.peak_memory_bytes is None and result.total_seconds > 0


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_other_families_match_full_forward(kind, prompt):
    engine, stock = build_pair(kind)
    expected = stock_forward(stock, prompt)
    result = engine.prefill(prompt, chunk_size=64, logits="all")
    torch.testing.assert_close(result.logits, expected.logits[0].float(), atol=2e-5, rtol=1e-4)
    assert engine.model_info.architecture == kind


def test_proxy_gamma_one_is_dense_and_low_gamma_is_sparse(llama_pair, prompt):
    engine, stock = llama_pair
    expected = stock_forward(stock, prompt).logits[0, -1]
    full = engine.prefill(prompt, chunk_size=64, attention="proxy", config=engine.config.replace(gamma=1.0))
    torch.testing.assert_close(full.logits[0], expected, atol=2e-5, rtol=1e-4)
    sparse = engine.prefill(prompt, chunk_size=64, attention="proxy", config=engine.config.replace(gamma=0.3))
    assert sparse.sparsity.shape == (2, 4)
    assert float(sparse.sparsity.min()) >= 0.0 and float(sparse.sparsity.max()) > 0.05
    assert not torch.allclose(sparse.logits[0], expected, atol=1e-3)


def test_sparsity_is_token_weighted_mean_of_chunk_stats(llama_pair, prompt):
    """result.sparsity equals the per-chunk index sparsity (seen by the observer), weighted by
    each chunk's tokens; the observer sees every layer of every chunk with the right offset."""
    engine, _ = llama_pair
    seen = []

    def observer(layer, q, k, v, stats, q_offset):
        assert k.shape[2] == q_offset + q.shape[2]
        seen.append((layer, q_offset, q.shape[2], stats.causal_sparsity()[0].double()))

    config = engine.config.replace(gamma=0.5)
    result = engine.prefill(
        prompt, chunk_size=64, attention="proxy", config=config, attention_observer=observer
    )
    assert [(layer, offset) for layer, offset, _, _ in seen] == [
        (layer, offset) for offset in (0, 64, 128, 192) for layer in (0, 1)
    ]
    for layer in range(2):
        weighted = sum(s * n for lyr, _, n, s in seen if lyr == layer) / 200
        torch.testing.assert_close(result.sparsity[layer].double(), weighted, atol=1e-6, rtol=0)


def test_dense_below_tokens_counts_as_dense(llama_pair, prompt):
    engine, _ = llama_pair
    config = engine.config.replace(gamma=0.3, dense_below_tokens=128)
    kinds = []
    engine.prefill(
        prompt,
        chunk_size=64,
        attention="proxy",
        config=config,
        attention_observer=lambda layer, q, k, v, stats, off: kinds.append((off, stats is None)),
    )
    assert (
        kinds
        == [(0, True), (0, True), (64, True), (64, True), (128, False), (128, False)] + [(192, False)] * 2
    )


def test_fixed_density_sets_the_sparsity(llama_pair):
    engine, _ = llama_pair
    ids = torch.arange(512) % VOCAB
    config = engine.config.replace(sink_blocks=0)
    result = engine.prefill(ids, chunk_size=256, attention="proxy", config=config, fixed_density=0.25)
    # every row keeps ceil(0.25 x causal) blocks (the diagonal is among them or added): about 70% skipped
    assert 0.6 < float(result.sparsity.mean()) < 0.75
    budgets = fixed_density_budgets(4, 256, 256, 0.25, config, "cpu")
    causal = torch.arange(17, 33)
    assert torch.equal(budgets[0, 0], torch.ceil(causal * 0.25).long())


# --------------------------------------------------------------------------------------------
# Logits, progress, cancellation
# --------------------------------------------------------------------------------------------
def test_logits_only_where_asked(llama_pair, prompt):
    engine, _ = llama_pair
    everything = engine.prefill(prompt, chunk_size=64, logits="all")
    last = engine.prefill(prompt, chunk_size=64, logits="last")
    assert last.logit_positions == [199] and last.logits.shape == (1, VOCAB)
    torch.testing.assert_close(last.logits[0], everything.logits[199])
    picked = engine.prefill(prompt, chunk_size=64, logits=[3, 130, 63, 64])
    torch.testing.assert_close(picked.logits, everything.logits[[3, 130, 63, 64]])
    ranged = engine.prefill(prompt, chunk_size=64, logits=range(60, 70))
    assert ranged.logit_positions == list(range(60, 70))
    torch.testing.assert_close(ranged.logits, everything.logits[60:70])
    assert engine.prefill(prompt, chunk_size=64, logits="none").logits is None


def test_token_ids_as_list_tuple_numpy_or_tensor(llama_pair, prompt):
    import numpy as np

    engine, _ = llama_pair
    expected = engine.prefill(prompt, chunk_size=64).logits
    for ids in (prompt.tolist(), tuple(prompt.tolist()), prompt.numpy(), list(prompt.numpy()), prompt[None]):
        torch.testing.assert_close(engine.prefill(ids, chunk_size=64).logits, expected)
    with pytest.raises(PrefillError, match="is not an integer"):
        engine.prefill([1, np.float32(2.0)], chunk_size=64)


def test_progress_and_cancellation(llama_pair, prompt):
    engine, _ = llama_pair
    calls = []
    engine.prefill(prompt, chunk_size=64, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(64, 200), (128, 200), (192, 200), (200, 200)]
    done = []  # should_stop is also asked before every layer; this one answers after two chunks

    with pytest.raises(PrefillCancelled, match="after 128 of 200"):
        engine.prefill(
            prompt,
            chunk_size=64,
            progress=lambda tokens, total: done.append(tokens),
            should_stop=lambda: bool(done) and done[-1] >= 128,
        )


# --------------------------------------------------------------------------------------------
# Bad input fails before any compute
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "token_ids, message",
    [
        ([], "token_ids is empty"),
        (torch.tensor([], dtype=torch.long), "token_ids is empty"),
        ([1, 2, VOCAB + 5], f"token id {VOCAB + 5} at position 2 is outside the vocabulary \\({VOCAB}\\)"),
        ([1, -1], f"token id -1 at position 1 is outside the vocabulary \\({VOCAB}\\)"),
        ([1, 2.5], "token id 2.5 at position 1 is not an integer"),
        ("hello", "not text"),
        (torch.zeros(2, 3, dtype=torch.long), "1-D"),
        (torch.zeros(3), "must be integers"),
        ([1] * 513, "prompt has 513 tokens; the model allows at most 512"),
    ],
)
def test_bad_tokens_are_refused_before_compute(llama_pair, token_ids, message):
    engine, _ = llama_pair
    observed = []
    with pytest.raises(PrefillError, match=message):
        engine.prefill(token_ids, chunk_size=64, attention_observer=lambda *a: observed.append(a))
    assert observed == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(chunk_size=0), "chunk_size must be a positive integer"),
        (dict(chunk_size=40, attention="proxy"), "multiple of block_size"),
        (dict(logits=[0, 10]), "logit position 10 is outside the prompt"),
        (dict(logits="first"), "logits must be"),
        (dict(attention="sparse"), "attention must be one of"),
        (
            dict(
                config=ProxyAttnConfig(dense_below_tokens=0, block_size=16, proxy_groups=4), attention="proxy"
            ),
            "must divide",
        ),
        (dict(fixed_density=1.5), "fixed_density"),
    ],
)
def test_bad_options_are_refused(llama_pair, kwargs, message):
    engine, _ = llama_pair
    with pytest.raises(PrefillError, match=message):
        engine.prefill([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], **{"chunk_size": 64, **kwargs})


def test_prompt_beyond_memory_is_refused(llama_pair, monkeypatch):
    import proxyprefill.workers.engine as engine_mod

    engine, _ = llama_pair
    monkeypatch.setattr(engine_mod, "_available_memory_bytes", lambda device: 10_000)
    with pytest.raises(PrefillError, match=r"prompt has 300 tokens; its KV cache .* exceed the"):
        engine.prefill(list(range(300)), chunk_size=64)


# --------------------------------------------------------------------------------------------
# The preallocated cache and the handoff
# --------------------------------------------------------------------------------------------
def test_preallocated_cache_writes_in_place_and_returns_prefix_views():
    cache = PreallocatedKVCache(
        num_layers=2, num_kv_heads=2, max_tokens=10, head_dim=4, dtype=torch.float32, device="cpu"
    )
    layer = cache.layers[1]
    k1, v1 = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    keys, values = cache.update(k1, v1, 1)
    assert keys.shape == (1, 2, 6, 4) and keys.data_ptr() == layer.key_buffer.data_ptr()
    k2, v2 = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    keys, values = cache.update(k2, v2, 1)
    assert (
        keys.data_ptr() == layer.key_buffer.data_ptr() and values.data_ptr() == layer.value_buffer.data_ptr()
    )
    assert torch.equal(keys, torch.cat([k1, k2], dim=2)) and torch.equal(values, torch.cat([v1, v2], dim=2))
    assert cache.get_seq_length(1) == 10 and cache.get_seq_length(0) == 0
    with pytest.raises(RuntimeError, match="overflow"):
        cache.update(k2[:, :, :1], v2[:, :, :1], 1)


def test_to_hf_cache_continues_like_generate(llama_pair, prompt):
    engine, stock = llama_pair
    with torch.no_grad():
        expected = stock.generate(prompt[None], max_new_tokens=8, do_sample=False, min_new_tokens=8)[0, 200:]
        result = engine.prefill(prompt, chunk_size=48)
        cache = result.to_hf_cache()
        assert cache.get_seq_length() == 200
        tokens = [int(result.logits[-1].argmax())]
        for step in range(7):
            out = stock(
                torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[200 + step]]), past_key_values=cache
            )
            tokens.append(int(out.logits[0, -1].argmax()))
    assert tokens == expected.tolist()
    # decoding wrote into the DynamicCache, not into the result
    assert result.keys[0].shape[1] == 200


# --------------------------------------------------------------------------------------------
# Dense attention with an offset
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q_offset, nq", [(0, 40), (32, 40), (96, 5)])
def test_dense_causal_attention_matches_reference(q_offset, nq):
    torch.manual_seed(3)
    q = torch.randn(1, 6, nq, 8)
    k, v = torch.randn(1, 2, q_offset + nq, 8), torch.randn(1, 2, q_offset + nq, 8)
    index = BlockSparseIndex.dense(1, 6, 1, nq, q_offset + nq, 16, q_offset)
    if q_offset % 16 == 0:
        expected, _ = reference.block_sparse_attention(q, k, v, index, q_offset)
        torch.testing.assert_close(dense_causal_attention(q, k, v, q_offset), expected, atol=1e-5, rtol=1e-5)
    # brute force
    kf, vf = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    logits = q @ kf.transpose(-1, -2) / 8**0.5
    visible = torch.arange(q_offset + nq)[None, :] <= (q_offset + torch.arange(nq))[:, None]
    brute = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ vf
    torch.testing.assert_close(dense_causal_attention(q, k, v, q_offset), brute, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_offset, nq, hq, hkv", [(0, 48, 6, 2), (64, 48, 6, 2), (100, 7, 4, 4)])
def test_cuda_split_merge_logic_on_cpu(monkeypatch, q_offset, nq, hq, hkv):
    """The CUDA dense path (prefix with stacked query heads + own square, merged by LSE) checked on
    the CPU by standing in an exact float64 (out, lse) attention for the cuDNN op."""
    import proxyprefill.kernels.dense as attention_mod

    def exact_lse_attention(q, k, v, causal, scale):
        logits = (q.double() @ k.double().transpose(-1, -2)) * scale
        if causal:
            n = q.shape[2]
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        return (torch.exp(logits - lse[..., None]) @ v.double()).to(q.dtype), lse.float()

    monkeypatch.setattr(attention_mod, "_lse_attention_cuda", exact_lse_attention)
    torch.manual_seed(q_offset + nq)
    q = torch.randn(1, hq, nq, 8)
    k, v = torch.randn(1, hkv, q_offset + nq, 8), torch.randn(1, hkv, q_offset + nq, 8)
    out = attention_mod._dense_cuda(q, k, v, q_offset, 8**-0.5)
    rep = hq // hkv
    logits = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * 8**-0.5
    visible = torch.arange(q_offset + nq)[None, :] <= (q_offset + torch.arange(nq))[:, None]
    brute = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ v.repeat_interleave(rep, 1)
    torch.testing.assert_close(out, brute, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Loading from a directory, model info, header
# --------------------------------------------------------------------------------------------
def test_from_pretrained_directory_and_header(tmp_path, prompt):
    engine, _ = build_pair("llama")
    engine.model.save_pretrained(tmp_path / "tiny")
    loaded = PrefillEngine.from_pretrained(tmp_path / "tiny", attention="dense", device="cpu")
    info = loaded.model_info
    assert (info.model_id, info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (
        "tiny",
        2,
        4,
        2,
        16,
    )
    assert info.dtype == "float32" and info.vocab_size == VOCAB and info.max_position_embeddings == 512
    a = loaded.prefill(prompt, chunk_size=64)
    b = engine.prefill(prompt, chunk_size=64)
    torch.testing.assert_close(a.logits, b.logits)
    header = loaded.kv_header(prompt)
    assert header == a.header and header.num_tokens == 200 and header.layout == "[Hkv, N, d]"
    assert loaded.kv_header(prompt.flip(0)).token_sha256 != header.token_sha256


def test_sliding_window_models_are_refused():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        sliding_window=64,
    )
    with pytest.raises(ValueError, match="sliding-window"):
        PrefillEngine.from_model(MistralForCausalLM(cfg))


def test_default_model_discovery_uses_the_cache(tmp_path, monkeypatch):
    """The converted copy is found by its marker; a missing or stale marker converts again."""
    import json

    from proxyprefill.workers import model as model_mod

    monkeypatch.setenv("PROXYPREFILL_CACHE", str(tmp_path))
    assert model_mod.cache_dir() == tmp_path
    gguf = model_mod.default_gguf_path()
    assert gguf.name == model_mod.DEFAULT_MODEL_FILE and gguf.stat().st_size > 50_000_000
    conversions = []

    def fake_convert(source, target, dtype):
        conversions.append((source, target))
        target.mkdir(parents=True, exist_ok=True)
        return target

    monkeypatch.setattr(model_mod, "convert_gguf", fake_convert)
    target = model_mod.default_model_dir()
    assert target == tmp_path / model_mod.DEFAULT_MODEL_DIRNAME and len(conversions) == 1
    assert model_mod.default_model_dir() == target and len(conversions) == 1  # cached
    marker = target / "proxyprefill-source.json"
    marker.write_text(json.dumps({"source": gguf.name, "size": 1}))
    model_mod.default_model_dir()
    assert len(conversions) == 2  # stale marker: converted again


def test_prefill_benchmark_smoke_run(tmp_path):
    """bench/prefill.py end to end on a 2-layer CPU model: every planned row ran and the JSON
    carries the baselines, versions and speedup entries."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "prefill.py"
    spec = importlib.util.spec_from_file_location("bench_prefill", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "prefill.json"
    bench.main(["--tiny", "--lengths", "512", "--chunks", "256", "--densities", "0.1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [(r["mode"], r["chunk_size"]) for r in report["rows"]] == [
        ("stock", None),
        ("dense", 256),
        ("proxy", 256),
    ]
    assert all("error" not in r and r["seconds"] > 0 for r in report["rows"])
    assert report["versions"]["torch"] == torch.__version__
    (entry,) = report["speedups"]
    assert entry["vs_dense_engine"] > 0 and entry["vs_stock_sdpa"] > 0 and entry["mean_causal_sparsity"] > 0.3
