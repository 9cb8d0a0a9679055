"""The KV wire format (workers/kv_wire.py): what the server encodes is what protobuf and the
client's reader both parse, the pieces rebuild the exact tensors, the header survives the proto,
and bad input is refused naming what is wrong."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pytest
import torch

from proxyprefill.protos import prefill_pb2 as pb
from proxyprefill.workers.kv_files import KVHeader
from proxyprefill.workers.kv_wire import (
    TensorSink,
    chunk_from_message,
    deliver,
    encode_chunk,
    encode_event,
    header_from_message,
    header_message,
    layer_pieces,
    read_chunk,
    token_pieces,
    token_sha256,
)

HEADS, TOKENS, DIM, LAYERS = 3, 300, 16, 2


def _header(dtype: str) -> KVHeader:
    return KVHeader(
        model_id="m",
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=DIM,
        dtype=dtype,
        rope_theta=10000.0,
        rope_scaling={"type": "linear", "factor": 2.0},
        num_tokens=TOKENS,
        token_sha256=token_sha256(np.arange(TOKENS)),
    )


def _kv(dtype: str):
    gen = torch.Generator().manual_seed(1)
    make = [
        torch.randn(HEADS, TOKENS, DIM, generator=gen).to(getattr(torch, dtype)) for _ in range(2 * LAYERS)
    ]
    return make[:LAYERS], make[LAYERS:]


def _encoded(keys, values, header: pb.KVHeader, max_chunk_bytes: int, with_tokens: bool) -> list[bytes]:
    pieces = list(token_pieces(np.arange(TOKENS), max_chunk_bytes)) if with_tokens else []
    for layer in range(LAYERS):
        pieces += layer_pieces(layer, keys[layer], values[layer], max_chunk_bytes)
    return [encode_chunk(piece, header if i == 0 else None) for i, piece in enumerate(pieces)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_encoded_chunks_rebuild_the_exact_tensors(dtype):
    keys, values = _kv(dtype)
    header = header_message(_header(dtype), last_token_id=7)
    encoded = _encoded(keys, values, header, max_chunk_bytes=5000, with_tokens=True)
    assert len(encoded) > 2 * LAYERS + 1  # several token ranges per layer
    sink = TensorSink()
    for data in encoded:
        parsed = pb.KVChunk.FromString(data)  # a plain protobuf reader sees the same chunk
        fast = read_chunk(data)
        assert fast.meta.layer == parsed.layer and list(fast.meta.shape) == list(parsed.shape)
        assert bytes(fast.keys) == parsed.keys and bytes(fast.values) == parsed.values
        assert bytes(fast.token_ids) == parsed.token_ids
        deliver(fast, sink)
    assert sink.message.last_token_id == 7
    assert sink.token_ids.tolist() == list(range(TOKENS))
    for layer in range(LAYERS):
        assert torch.equal(sink.keys[layer], keys[layer]) and torch.equal(sink.values[layer], values[layer])
    assert sink.bytes_received == sum(k.numel() * k.element_size() * 2 for k in keys)


def test_inline_events_carry_the_same_chunks():
    keys, values = _kv("float32")
    header = header_message(_header("float32"))
    piece = next(layer_pieces(1, keys[1], values[1], 4096))
    event = pb.PrefillEvent.FromString(encode_event(piece, header))
    assert event.WhichOneof("event") == "kv_chunk"
    assert (
        event.kv_chunk.SerializeToString()
        == pb.KVChunk.FromString(encode_chunk(piece, header)).SerializeToString()
    )
    sink = TensorSink()
    deliver(chunk_from_message(event.kv_chunk), sink)
    rows = piece.end - piece.start
    assert torch.equal(sink.keys[1][:, :rows], keys[1][:, :rows]) and sink.keys[0] is None
    assert piece.nbytes == 2 * HEADS * rows * DIM * 4
    assert next(token_pieces(np.arange(4), 64)).nbytes == 0


def test_header_round_trips_through_the_proto():
    header = _header("bfloat16")
    message = pb.KVHeader.FromString(header_message(header, 42).SerializeToString())
    assert header_from_message(message) == header and message.last_token_id == 42
    from dataclasses import asdict

    assert header_message(asdict(header), 42) == message  # the dict a worker sends through Ray


def test_token_sha256_is_the_int64_little_endian_hash_of_any_input():
    ids = [5, 0, 2**40, 17]
    expected = hashlib.sha256(np.array(ids, dtype="<i8").tobytes()).hexdigest()
    assert token_sha256(ids) == expected
    assert token_sha256(np.array(ids)) == expected
    assert token_sha256(np.array([1, 2], dtype=np.int32)) == token_sha256([1, 2])
    assert token_sha256(torch.tensor(ids)) == expected
    assert token_sha256(ids[::-1]) != expected


def test_refusals_name_the_problem():
    keys, values = _kv("float32")
    header = header_message(_header("float32"))
    first, second = _encoded(keys, values, header, 1 << 20, with_tokens=False)[:2]
    with pytest.raises(ValueError, match="runs past the end"):
        read_chunk(first[:-10])
    with pytest.raises(ValueError, match="did not start with a header"):
        deliver(read_chunk(second), TensorSink())
    sink = TensorSink()
    deliver(read_chunk(first), sink)
    other = pb.KVHeader()
    other.CopyFrom(header)
    other.num_tokens += 1
    with pytest.raises(ValueError, match="different headers"):
        sink.header(other)
    with pytest.raises(ValueError, match="layer 5"):
        sink.kv(5, 0, 1, "float32", [HEADS, 1, DIM], memoryview(b"\0" * 4 * HEADS * DIM), memoryview(b""))
    with pytest.raises(ValueError, match="differs from the header"):
        sink.kv(0, 0, 1, "float16", [HEADS, 1, DIM], memoryview(b""), memoryview(b""))


def test_streams_over_layer_ranges_fill_one_sink_from_threads():
    keys, values = _kv("float32")
    header = header_message(_header("float32"))
    streams = [
        [
            encode_chunk(p, header if i == 0 else None)
            for i, p in enumerate(layer_pieces(layer, keys[layer], values[layer], 3000))
        ]
        for layer in range(LAYERS)
    ]
    sink = TensorSink()

    def feed(stream):
        for data in stream:
            deliver(read_chunk(data), sink)

    threads = [threading.Thread(target=feed, args=(stream,)) for stream in streams]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for layer in range(LAYERS):
        assert torch.equal(sink.keys[layer], keys[layer]) and torch.equal(sink.values[layer], values[layer])
