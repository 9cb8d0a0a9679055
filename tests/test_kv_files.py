"""KV files: bit-exact round trip, and refusal of anything that does not match."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.workers.engine import PrefillEngine
from proxyprefill.workers.kv_files import HEADER_KEY, KVHeader, KVMismatchError, load_kv, read_header, save_kv


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def prefilled(request):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=50000.0,
    )
    model = LlamaForCausalLM(copy.deepcopy(cfg)).to(request.param)
    engine = PrefillEngine.from_model(
        model, model_id="tiny-llama", attention="dense", config=ProxyAttnConfig(block_size=16)
    )
    ids = torch.randint(0, 256, (77,), generator=torch.Generator().manual_seed(2))
    return engine, engine.prefill(ids, chunk_size=32)


def test_round_trip_is_bit_exact(prefilled, tmp_path):
    engine, result = prefilled
    path = tmp_path / "doc.kv.safetensors"
    save_kv(path, result)
    loaded = load_kv(path, expect=engine)
    assert loaded.header == result.header
    assert torch.equal(loaded.token_ids, result.token_ids)
    assert len(loaded.keys) == 3
    for mine, theirs in zip(loaded.keys + loaded.values, result.keys + result.values):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape == (2, 77, 16)
        # bit for bit, including NaN payloads and signed zeros
        assert torch.equal(
            mine.view(torch.int16 if mine.element_size() == 2 else torch.int32),
            theirs.view(torch.int16 if theirs.element_size() == 2 else torch.int32),
        )
    assert loaded.to_hf_cache().get_seq_length() == 77
    # the header alone, without the tensors
    assert read_header(path) == result.header
    # a loaded KVData can be saved again unchanged
    save_kv(tmp_path / "again.safetensors", loaded)
    assert load_kv(tmp_path / "again.safetensors", expect=result.header).header == result.header


def test_header_fields(prefilled):
    engine, result = prefilled
    header = result.header
    assert header.model_id == "tiny-llama" and header.num_layers == 3 and header.num_kv_heads == 2
    assert header.head_dim == 16 and header.layout == "[Hkv, N, d]" and header.num_tokens == 77
    assert header.dtype == str(result.keys[0].dtype).removeprefix("torch.")
    assert header.rope_theta == 50000.0 and header.rope_scaling is None
    import hashlib

    expected = hashlib.sha256(result.token_ids.numpy().astype("<i8").tobytes()).hexdigest()
    assert header.token_sha256 == expected
    assert KVHeader.from_json(header.to_json()) == header


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_id", "other-model"),
        ("num_layers", 4),
        ("num_kv_heads", 8),
        ("head_dim", 128),
        ("dtype", "float16"),
        ("rope_theta", 10000.0),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ],
)
def test_model_mismatch_is_refused_naming_the_field(prefilled, tmp_path, field, value):
    engine, result = prefilled
    path = tmp_path / "kv.safetensors"
    save_kv(path, result)
    other = dataclasses.replace(engine.model_info, **{field: value})
    with pytest.raises(KVMismatchError, match=f"mismatch in {field}") as caught:
        load_kv(path, expect=other)
    assert caught.value.field == field and isinstance(caught.value, ValueError)


def test_prompt_mismatch_is_refused(prefilled, tmp_path):
    engine, result = prefilled
    path = tmp_path / "kv.safetensors"
    save_kv(path, result)
    other_prompt = engine.kv_header(result.token_ids.flip(0))
    with pytest.raises(KVMismatchError, match="mismatch in token_sha256"):
        load_kv(path, expect=other_prompt)
    shorter = engine.kv_header(result.token_ids[:-1])
    with pytest.raises(KVMismatchError, match="mismatch in num_tokens"):
        load_kv(path, expect=shorter)


def _rewrite(path, tensors=None, header=None):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    data = load_file(str(path))
    if tensors is not None:
        tensors(data)
    if header is not None:
        values = json.loads(metadata[HEADER_KEY])
        header(values)
        metadata[HEADER_KEY] = json.dumps(values)
    save_file(data, str(path), metadata=metadata)


def test_file_contradicting_its_header_is_refused(prefilled, tmp_path):
    _, result = prefilled
    path = tmp_path / "kv.safetensors"

    save_kv(path, result)
    _rewrite(path, tensors=lambda d: d.__setitem__("token_ids", d["token_ids"] + 1))
    with pytest.raises(KVMismatchError, match="token_sha256"):
        load_kv(path)

    save_kv(path, result)
    _rewrite(
        path, tensors=lambda d: d.__setitem__("layers.1.value", d["layers.1.value"][:, :-1].contiguous())
    )
    with pytest.raises(KVMismatchError, match=r"layers\.1\.value\.shape"):
        load_kv(path)

    save_kv(path, result)
    _rewrite(path, tensors=lambda d: d.pop("layers.2.key"))
    with pytest.raises(KVMismatchError, match=r"layers\.2\.key"):
        load_kv(path)

    save_kv(path, result)
    _rewrite(path, header=lambda h: h.update(layout="[N, Hkv, d]"))
    with pytest.raises(KVMismatchError, match="layout"):
        load_kv(path, expect=prefilled[0])

    save_kv(path, result)
    _rewrite(path, header=lambda h: h.pop("head_dim"))
    with pytest.raises(KVMismatchError, match="header"):
        load_kv(path)


def test_file_without_header_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(KVMismatchError, match="header"):
        load_kv(path)
