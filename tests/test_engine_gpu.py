"""The engine's CUDA paths: the offset-causal dense attention (cuDNN with an exact LSE merge) and
a chunked prefill in bf16 against the stock model. Skipped without CUDA."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.workers.attention import dense_causal_attention
from proxyprefill.workers.engine import PrefillEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def oracle(q, k, v, q_offset):
    rep = q.shape[1] // k.shape[1]
    kf, vf = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    logits = q.double() @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])
    nq, nk = q.shape[2], k.shape[2]
    visible = (
        torch.arange(nk, device=q.device)[None, :] <= (q_offset + torch.arange(nq, device=q.device))[:, None]
    )
    return torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ vf


def relative_error(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "hq, hkv, d, nq, q_offset",
    [(32, 8, 128, 1024, 0), (32, 8, 128, 1024, 4096), (14, 2, 64, 384, 256), (8, 8, 128, 1, 777)],
)
def test_dense_causal_attention_cuda(dtype, hq, hkv, d, nq, q_offset):
    generator = torch.Generator(device="cuda").manual_seed(hq * 1000 + q_offset)
    q = torch.randn(1, hq, nq, d, device="cuda", dtype=dtype, generator=generator)
    k = torch.randn(1, hkv, q_offset + nq, d, device="cuda", dtype=dtype, generator=generator)
    v = torch.randn(1, hkv, q_offset + nq, d, device="cuda", dtype=dtype, generator=generator)
    out = dense_causal_attention(q, k, v, q_offset)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, oracle(q, k, v, q_offset)) < 1e-2


@pytest.fixture(scope="module")
def cuda_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=8192,
    )
    model = LlamaForCausalLM(copy.deepcopy(cfg)).to("cuda", torch.bfloat16).eval()
    stock = LlamaForCausalLM(copy.deepcopy(cfg)).to("cuda", torch.bfloat16).eval()
    stock.load_state_dict(model.state_dict())
    stock.set_attn_implementation("sdpa")
    config = ProxyAttnConfig(dense_below_tokens=0, block_size=128, min_budget_tokens=0)
    return PrefillEngine.from_model(model, model_id="tiny-cuda", config=config), stock


def test_chunked_prefill_on_cuda_matches_stock(cuda_pair):
    engine, stock = cuda_pair
    ids = torch.randint(0, 1000, (3000,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = stock(ids[None].cuda(), use_cache=True)
    dense = engine.prefill(ids, chunk_size=1024, attention="dense", logits=range(2900, 3000))
    assert relative_error(dense.logits, expected.logits[0, 2900:].double()) < 5e-2
    for layer in range(2):
        ref_k = expected.past_key_values.layers[layer].keys[0].double()
        assert relative_error(dense.keys[layer], ref_k) < 1e-2
    assert dense.peak_memory_bytes is not None and dense.peak_memory_bytes >= dense.kv_bytes
    assert dense.attention_seconds > 0 and dense.estimate_seconds == 0

    proxy = engine.prefill(
        ids,
        chunk_size=1024,
        attention="proxy",
        config=engine.config.replace(gamma=1.0),
        logits=range(2900, 3000),
    )
    assert relative_error(proxy.logits, dense.logits.double()) < 5e-2
    assert proxy.estimate_seconds > 0 and proxy.attention_seconds > 0

    sparse = engine.prefill(ids, chunk_size=1024, attention="proxy", fixed_density=0.2)
    assert 0.3 < float(sparse.sparsity.mean()) < 0.9
