"""The paged decode-side layout: pages written and read back through any block table, bad tables
refused naming the field, and a stock model decoding from the pages like `generate`."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from proxyprefill.service.decode import greedy_continue
from proxyprefill.service.paged_kv import (
    PagedDecodeCache,
    PagedKV,
    PagedLayoutError,
    gather_paged,
    write_paged,
)


def _layers(num_layers=3, heads=2, tokens=37, dim=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, tokens, dim, generator=gen).to(dtype) for _ in range(num_layers)]
    values = [torch.randn(heads, tokens, dim, generator=gen).to(dtype) for _ in range(num_layers)]
    return keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, block_size", [(37, 8), (32, 8), (1, 16), (40, 1)])
def test_pages_round_trip_through_a_shuffled_table(dtype, tokens, block_size):
    keys, values = _layers(tokens=tokens, dtype=dtype)
    needed = -(-tokens // block_size)
    table = torch.randperm(needed + 5, generator=torch.Generator().manual_seed(1))[:needed].to(torch.int32)
    pages = PagedKV.from_layers(keys, values, block_size=block_size, num_blocks=needed + 5, block_table=table)
    assert pages.key_pages[0].shape == (needed + 5, block_size, 2, 8)
    assert torch.equal(pages.block_table, table)
    back_k, back_v = pages.to_layers()
    for a, b in zip(keys + values, back_k + back_v, strict=True):
        assert torch.equal(a, b)
    # token t of head h sits at (table[t // bs], t % bs, h)
    t = tokens - 1
    assert torch.equal(pages.key_pages[1][table[t // block_size], t % block_size], keys[1][:, t])


def test_write_paged_appends_after_start():
    keys, values = _layers(num_layers=1, tokens=20)
    pool_k, pool_v = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    table = torch.tensor([5, 0, 3, 1, 2], dtype=torch.int32)
    write_paged(pool_k, pool_v, table, keys[0][:, :13], values[0][:, :13])
    write_paged(pool_k, pool_v, table, keys[0][:, 13:], values[0][:, 13:], start=13)
    assert torch.equal(gather_paged(pool_k, table, 20), keys[0])
    assert torch.equal(gather_paged(pool_v, table, 20), values[0])
    assert pool_k[4].abs().sum() == 0  # the block outside the table is untouched


@pytest.mark.parametrize(
    "table, message",
    [
        (torch.tensor([0, 0, 1], dtype=torch.int32), "listed twice"),
        (torch.tensor([0, 9, 1], dtype=torch.int32), r"ids must lie in \[0, 4\)"),
        (torch.tensor([0, 1], dtype=torch.int32), "2 entries, the KV needs 3"),
        (torch.tensor([[0, 1, 2]], dtype=torch.int32), "1-D"),
        (torch.tensor([0.0, 1.0, 2.0]), "int32/int64"),
    ],
)
def test_bad_block_tables_are_refused_naming_the_field(table, message):
    keys, values = _layers(num_layers=1, tokens=10)
    pool_k, pool_v = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    with pytest.raises(PagedLayoutError, match="block_table") as err:
        write_paged(pool_k, pool_v, table, keys[0], values[0])
    assert err.match(message)


def test_pool_too_small_and_shape_mismatch_are_refused():
    keys, values = _layers(num_layers=1, tokens=10)
    with pytest.raises(PagedLayoutError, match="num_blocks"):
        PagedKV.from_layers(keys, values, block_size=4, num_blocks=2)
    with pytest.raises(PagedLayoutError, match="keys"):
        write_paged(torch.zeros(4, 4, 3, 8), torch.zeros(4, 4, 3, 8), torch.arange(3), keys[0], values[0])
    pages = PagedKV.from_layers(keys, values, block_size=4)
    pages.num_tokens = 12  # fill the table's capacity, then ask for one more block: none is free
    with pytest.raises(PagedLayoutError, match="num_blocks"):
        pages.append_block()


def test_decode_cache_writes_new_tokens_into_free_blocks():
    keys, values = _layers(num_layers=2, tokens=7)
    pages = PagedKV.from_layers(keys, values, block_size=4, num_blocks=4, block_table=torch.tensor([3, 1]))
    cache = PagedDecodeCache(pages)
    assert cache.get_seq_length() == 7
    new_k, new_v = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8)
    for layer in range(2):
        out_k, out_v = cache.update(new_k, new_v, layer)
        assert torch.equal(out_k[0], torch.cat([keys[layer], new_k[0]], dim=1))
        assert torch.equal(out_v[0], torch.cat([values[layer], new_v[0]], dim=1))
    assert pages.block_table.tolist() == [3, 1, 0] and pages.num_tokens == 9
    assert torch.equal(pages.key_pages[1][0, 0], new_k[0, :, 1])


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_a_stock_model_decodes_from_the_pages_like_generate(page_size):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from proxyprefill.workers.engine import PrefillEngine

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg)).eval()
    engine = PrefillEngine.from_model(model, model_id="tiny-llama", attention="dense")
    prompt = torch.randint(0, 320, (150,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.generate(prompt[None], max_new_tokens=12, do_sample=False, min_new_tokens=12)
    result = engine.prefill(prompt, chunk_size=64)
    transfer = SimpleNamespace(
        header=SimpleNamespace(num_tokens=150, last_token_id=int(prompt[-1])),
        keys=result.keys,
        values=result.values,
        token_ids=None,
    )
    tokens = greedy_continue(model, transfer, 12, eos_token_ids=[], layout="paged", page_size=page_size)
    assert tokens == expected[0, 150:].tolist()
    assert tokens == greedy_continue(model, transfer, 12, eos_token_ids=[])
