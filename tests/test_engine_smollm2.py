"""Handoff proof on the real SmolLM2-135M-Instruct weights (CPU, float32).

The engine prefills a prompt of a few hundred tokens in chunks of 128; a stock transformers model
(SDPA attention) then decodes greedily from `PrefillResult.to_hf_cache()`. The 32 tokens must equal
`model.generate` on the full prompt, in dense mode and in ProxyAttn mode with gamma = 1.0.
"""

from __future__ import annotations

import pytest
import torch

from proxyprefill.kernels.config import ProxyAttnConfig

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
PROMPT = (
    "The lighthouse keeper on the northern island kept a logbook for forty years. Every evening he wrote "
    "down the weather, the ships that passed, the colour of the sea and the birds that rested on the rail "
    "of the gallery. In spring the puffins came back from the open ocean and dug their burrows in the turf "
    "above the cliffs; in autumn the geese flew south in long uneven lines, calling to each other through "
    "the fog. The supply boat arrived on the first Monday of each month, weather permitting, with flour, "
    "paraffin, letters and newspapers that were already three weeks old. His daughter, who lived on the "
    "mainland and taught mathematics at the grammar school, sent him puzzles to solve during the long "
    "winter nights: a chessboard with eight queens, a river crossed by a farmer with a wolf, a goat and a "
    "cabbage, the sum of the first hundred odd numbers. He solved them with a pencil stub on the back of "
    "the tide tables and posted the answers back with the boat. When the lamp was finally automated, the "
    "engineers who came to install the new equipment found the logbooks stacked in the storeroom, forty "
    "volumes bound in green cloth, and a drawer full of puzzles, each one marked with the date it was "
    "solved. They asked him what he would do now that the light no longer needed him. He said he would "
    "move to the mainland, learn to play the piano, and finally read the newspapers on the day they were "
    "printed. On his first morning on the mainland he woke before dawn, out of habit, and walked down to the "
    "harbour, where"
)


@pytest.fixture(scope="session")
def smollm2_engine():
    from proxyprefill.workers.engine import PrefillEngine

    return PrefillEngine.from_pretrained(None, attention="dense", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def stock_model():
    """The same weights in a stock transformers model (its own SDPA attention)."""
    from transformers import AutoModelForCausalLM

    from proxyprefill.workers.model import default_model_dir

    model = AutoModelForCausalLM.from_pretrained(
        str(default_model_dir()), dtype=torch.float32, attn_implementation="sdpa"
    )
    return model.eval()


@pytest.fixture(scope="session")
def prompt_ids(smollm2_engine):
    ids = smollm2_engine.tokenizer(PROMPT, return_tensors="pt").input_ids[0]
    assert 256 < ids.numel() < 512, ids.numel()
    return ids


@pytest.fixture(scope="session")
def reference_continuation(stock_model, prompt_ids):
    with torch.no_grad():
        out = stock_model.generate(prompt_ids[None], max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = out[0, prompt_ids.numel() :].tolist()
    assert len(tokens) == NEW_TOKENS, "the reference stopped early (end of sequence): change the prompt"
    return tokens


def continue_greedy(model, result, steps: int) -> list[int]:
    """Greedy decode from a prefill: the first token from the prefill's last logits, the rest
    by the stock model reading the handed-over cache."""
    cache = result.to_hf_cache()
    token = int(result.logits[-1].argmax())
    tokens = [token]
    position = result.num_tokens
    with torch.no_grad():
        for _ in range(steps - 1):
            out = model(
                input_ids=torch.tensor([[token]]),
                position_ids=torch.tensor([[position]]),
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            position += 1
    return tokens


def proxy_config(gamma: float) -> ProxyAttnConfig:
    return ProxyAttnConfig(dense_below_tokens=0, block_size=64, stride=4, gamma=gamma, min_budget_tokens=0)


def test_model_info_describes_smollm2(smollm2_engine):
    info = smollm2_engine.model_info
    assert (info.architecture, info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (
        "llama",
        30,
        9,
        3,
        64,
    )
    assert info.vocab_size == 49152 and info.max_position_embeddings == 8192
    assert info.dtype == "float32" and info.rope_theta == 100000.0


def test_dense_prefill_hands_off_to_generate(smollm2_engine, stock_model, prompt_ids, reference_continuation):
    result = smollm2_engine.prefill(prompt_ids, chunk_size=128, attention="dense")
    assert result.num_tokens == prompt_ids.numel() and len(result.keys) == 30
    assert result.keys[0].shape == (3, prompt_ids.numel(), 64)
    assert continue_greedy(stock_model, result, NEW_TOKENS) == reference_continuation


def test_proxy_prefill_gamma_one_hands_off_to_generate(
    smollm2_engine, stock_model, prompt_ids, reference_continuation
):
    result = smollm2_engine.prefill(prompt_ids, chunk_size=128, attention="proxy", config=proxy_config(1.0))
    assert result.sparsity.shape == (30, 9)
    assert continue_greedy(stock_model, result, NEW_TOKENS) == reference_continuation


@pytest.mark.parametrize("gamma", [0.95, 0.9])
def test_proxy_prefill_agreement_report(
    smollm2_engine, stock_model, prompt_ids, reference_continuation, gamma, record_property
):
    """Not asserted: how many of the 32 greedy tokens survive a sparser prefill (printed, -rP)."""
    result = smollm2_engine.prefill(prompt_ids, chunk_size=128, attention="proxy", config=proxy_config(gamma))
    tokens = continue_greedy(stock_model, result, NEW_TOKENS)
    pairs = list(zip(tokens, reference_continuation))
    same_prefix = next((i for i, (a, b) in enumerate(pairs) if a != b), NEW_TOKENS)
    agree = sum(a == b for a, b in zip(tokens, reference_continuation))
    mean_sparsity = float(result.sparsity.mean())
    record_property("agreement", agree)
    print(
        f"gamma={gamma}: {agree}/{NEW_TOKENS} tokens equal, first {same_prefix} identical, "
        f"mean causal sparsity {mean_sparsity:.3f}"
    )
    assert len(tokens) == NEW_TOKENS


def test_gguf_file_loads_to_the_same_model(smollm2_engine, prompt_ids):
    """Loading the GGUF directly (dequantised by transformers) gives the converted copy's model."""
    from proxyprefill.workers.engine import PrefillEngine
    from proxyprefill.workers.model import default_gguf_path

    engine = PrefillEngine.from_pretrained(default_gguf_path(), attention="dense", device="cpu")
    assert engine.model_info == smollm2_engine.model_info
    ids = prompt_ids[:100]
    direct = engine.prefill(ids, chunk_size=64)
    converted = smollm2_engine.prefill(ids, chunk_size=64)
    torch.testing.assert_close(direct.logits, converted.logits)
    assert direct.header == converted.header
