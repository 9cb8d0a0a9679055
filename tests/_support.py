"""Small shared pieces of the tests (imported as `_support`; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import time


def save_tiny_llama(path, num_layers: int, max_position_embeddings: int = 4096, seed: int = 0):
    """A random fp32 Llama (hidden 64, 4 query / 2 KV heads, vocab 256) saved to `path`, so that
    every worker or stage loads the same weights. Returns the model."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=max_position_embeddings,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def wait_for(predicate, seconds: float = 20.0) -> bool:
    """Polls `predicate` until it holds (True) or `seconds` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
