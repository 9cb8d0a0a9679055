"""Per-token log-likelihood from the engine's chunk loop (`token_nll=True`), on a tiny random
Llama (CPU, float32). The oracle is log-softmax of the full [N, vocab] logits of a plain
transformers forward over the whole prompt, which the engine itself never builds."""

from __future__ import annotations

import copy

import pytest
import torch

from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.workers import engine as engine_mod
from proxyprefill.workers.engine import PrefillEngine

VOCAB = 300


def tiny_pair():
    """(engine, stock eager model) with the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(copy.deepcopy(cfg)).eval()
    stock = LlamaForCausalLM(copy.deepcopy(cfg)).eval()
    stock.load_state_dict(model.state_dict())
    config = ProxyAttnConfig(block_size=16, min_budget_tokens=0, dense_below_tokens=0)
    return PrefillEngine.from_model(model, model_id="tiny", attention="dense", config=config), stock


def reference_nll(stock, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = stock(ids[None]).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return -logprobs[:-1].gather(1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("chunk_size", [16, 48, 400])
def test_token_nll_matches_full_log_softmax(chunk_size, monkeypatch):
    engine, stock = tiny_pair()
    # 7 rows per slice: slices straddle chunk ends, and the last slice of a chunk is partial
    monkeypatch.setattr(engine_mod, "NLL_SLICE_VALUES", 7 * VOCAB)
    ids = torch.randint(0, VOCAB, (157,), generator=torch.Generator().manual_seed(1))
    result = engine.prefill(ids, chunk_size=chunk_size, logits="last", token_nll=True)
    expected = reference_nll(stock, ids)
    assert result.token_nll.shape == (156,)
    assert result.token_nll.dtype == torch.float32
    torch.testing.assert_close(result.token_nll.double(), expected, rtol=1e-4, atol=1e-4)
    # the last-position logits are still there, and agree with the stock forward
    with torch.no_grad():
        last = stock(ids[None]).logits[0, -1]
    torch.testing.assert_close(result.logits[0], last, rtol=1e-4, atol=1e-4)


def test_token_nll_is_off_by_default_and_empty_for_one_token():
    engine, _ = tiny_pair()
    ids = torch.tensor([5, 6, 7])
    assert engine.prefill(ids, chunk_size=16).token_nll is None
    single = engine.prefill(torch.tensor([5]), chunk_size=16, token_nll=True)
    assert single.token_nll.shape == (0,)


def test_token_nll_under_proxy_attention_tracks_dense():
    """ProxyAttn with gamma = 1 keeps every block that carries mass: the NLL matches dense."""
    engine, stock = tiny_pair()
    ids = torch.randint(0, VOCAB, (160,), generator=torch.Generator().manual_seed(2))
    config = ProxyAttnConfig(block_size=16, min_budget_tokens=0, dense_below_tokens=0, gamma=1.0)
    result = engine.prefill(ids, chunk_size=32, attention="proxy", config=config, token_nll=True)
    torch.testing.assert_close(result.token_nll.double(), reference_nll(stock, ids), rtol=1e-3, atol=1e-3)
