"""The KV wire format, in one place: how a KV cache and its compatibility header travel.

- **Header**: the engine's `KVHeader` (workers/kv_files.py, also a KV file's JSON metadata) to
  and from the `KVHeader` proto message (`header_message`, `header_from_message`); the prompt's
  identity is `token_sha256` of its ids.
- **Pieces**: `layer_pieces` cuts one layer's `[Hkv, N, d]` keys and values into token ranges of
  at most `max_chunk_bytes`, `token_pieces` the prompt's ids; each piece is an item of a worker's
  fetch stream: a `LayerPiece` with little-endian numpy arrays (Ray moves them out of band, the
  server reads them in place) or a `TokenPiece` with int64 little-endian bytes.
- **Encoding** (server): `encode_chunk` serialises a piece as a `KVChunk` with one copy of its
  data, `encode_event` wraps such a chunk as a `PrefillEvent` (inline KV); the handlers' response
  serializer (`pass_through`) sends those bytes as they are.
- **Decoding** (client): `read_chunk` parses a serialised `KVChunk` without copying its bulk fields,
  and a `KVSink` receives what a transfer carries; `TensorSink` writes every piece straight into
  preallocated tensors (one copy). FetchKV and inline KV both end in a sink; a transport that
  delivers KV some other way implements the same three methods.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from proxyprefill.protos import prefill_pb2 as pb

from .kv_files import KVHeader

# dtype names on the wire -> little-endian numpy dtypes (bfloat16 travels as int16, same bits)
NUMPY_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<i2", "float64": "<f8", "int64": "<i8"}


def exact_narrowing(values: np.ndarray, dtype: str) -> np.ndarray | None:
    """float32 `values` as raw values of `dtype` ("bfloat16": its bit patterns as int16;
    "float16"), or None when some value is not exactly one of `dtype`. numpy, so one thread:
    torch's CPU ops would wake a pool of threads per call, which on a busy many-core host can
    stall for milliseconds."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        if np.any(bits & 0xFFFF):  # a bfloat16 is a float32 whose low 16 bits are zero
            return None
        return (bits >> 16).astype(np.uint16).view(np.int16)
    if dtype == "float16":
        half = values.astype(np.float16)
        return half if np.array_equal(half.astype(np.float32), values) else None
    return None


def widened(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw values of wire `dtype` (as NUMPY_DTYPES reads them) as a new float32 array, exactly."""
    if dtype == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


# field numbers of KVChunk's bulk fields, and of PrefillEvent's kv_chunk
_KEYS, _VALUES, _TOKEN_IDS = 7, 8, 9
_EVENT_KV_CHUNK = 4
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


def token_sha256(token_ids) -> str:
    """sha256 of the token ids as int64 little-endian bytes: the KV header's prompt identity.
    `token_ids`: a torch tensor, numpy array or sequence of ints."""
    if hasattr(token_ids, "detach"):  # torch
        token_ids = token_ids.detach().to("cpu").numpy()
    data = np.ascontiguousarray(np.asarray(token_ids), dtype="<i8").tobytes()
    return hashlib.sha256(data).hexdigest()


# header ------------------------------------------------------------------------------------------
def header_message(header: KVHeader | dict, last_token_id: int = -1) -> pb.KVHeader:
    """The proto KVHeader of an engine header (or of its fields as a dict, as Ray carries it)."""
    if isinstance(header, dict):
        header = KVHeader(**header)
    return pb.KVHeader(
        model_id=header.model_id,
        num_layers=header.num_layers,
        num_kv_heads=header.num_kv_heads,
        head_dim=header.head_dim,
        dtype=header.dtype,
        layout=header.layout,
        rope_theta=float(header.rope_theta),
        rope_scaling_json=json.dumps(header.rope_scaling),
        num_tokens=header.num_tokens,
        token_sha256=header.token_sha256,
        format_version=header.format_version,
        last_token_id=last_token_id,
    )


def header_from_message(message: pb.KVHeader) -> KVHeader:
    """The engine header a proto KVHeader describes (last_token_id is the message's alone)."""
    return KVHeader(
        model_id=message.model_id,
        num_layers=message.num_layers,
        num_kv_heads=message.num_kv_heads,
        head_dim=message.head_dim,
        dtype=message.dtype,
        rope_theta=message.rope_theta,
        rope_scaling=json.loads(message.rope_scaling_json or "null"),
        num_tokens=message.num_tokens,
        token_sha256=message.token_sha256,
        layout=message.layout,
        format_version=message.format_version,
    )


# pieces ------------------------------------------------------------------------------------------
def tensor_array(tensor) -> tuple[str, np.ndarray]:
    """(dtype name, C-contiguous little-endian numpy array) of a CPU-or-GPU tensor, with one copy
    at most. bfloat16 goes through int16, which numpy can hold, with the same bits."""
    import torch

    tensor = tensor.detach()
    name = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    array = np.ascontiguousarray(tensor.to("cpu").numpy())
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return name, array


@dataclass(frozen=True)
class LayerPiece:
    """Keys and values of one layer for tokens [start, end): arrays of `shape` [Hkv, n, d] in
    the wire `dtype` (bfloat16 travels as int16 bits)."""

    layer: int
    start: int
    end: int
    dtype: str
    shape: list[int]
    keys: np.ndarray
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


@dataclass(frozen=True)
class TokenPiece:
    """The prompt's token ids [start, end) as int64 little-endian bytes."""

    start: int
    end: int
    data: bytes

    nbytes = 0  # carries no KV


def layer_pieces(layer: int, keys, values, max_chunk_bytes: int) -> Iterator[LayerPiece]:
    """The pieces of one layer's KV ([Hkv, N, d] each): token ranges whose keys plus values take at
    most `max_chunk_bytes` (at least one token)."""
    heads, num_tokens, head_dim = keys.shape
    step = max(1, max_chunk_bytes // (2 * heads * head_dim * keys.element_size()))
    for start in range(0, num_tokens, step):
        end = min(num_tokens, start + step)
        dtype, key_array = tensor_array(keys[:, start:end])
        _, value_array = tensor_array(values[:, start:end])
        yield LayerPiece(layer, start, end, dtype, [heads, end - start, head_dim], key_array, value_array)


def token_pieces(token_ids: np.ndarray, max_chunk_bytes: int) -> Iterator[TokenPiece]:
    """The prompt's ids as pieces of at most `max_chunk_bytes` (int64 little-endian)."""
    ids = np.asarray(token_ids).astype("<i8", copy=False)
    per_piece = max(1, max_chunk_bytes // 8)
    for start in range(0, ids.shape[0], per_piece):
        end = min(ids.shape[0], start + per_piece)
        yield TokenPiece(start, end, ids[start:end].tobytes())


Piece = LayerPiece | TokenPiece


# encoding ----------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field_prefix(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def encode_chunk(piece: Piece, header: pb.KVHeader | None = None) -> bytes:
    """A serialised KVChunk of `piece` (with `header` on a transfer's first chunk), built with one
    copy of the data: the small fields are serialised by protobuf and the bulk fields appended in
    wire format (a message is the concatenation of its fields, in any order) straight from the
    arrays Ray handed over, where building a KVChunk and serialising it would copy twice more."""
    if isinstance(piece, TokenPiece):
        meta = pb.KVChunk(token_start=piece.start, token_end=piece.end, dtype="int64")
        bulk = [(_TOKEN_IDS, memoryview(piece.data))]
    else:
        meta = pb.KVChunk(
            layer=piece.layer,
            token_start=piece.start,
            token_end=piece.end,
            dtype=piece.dtype,
            shape=piece.shape,
        )
        bulk = [
            (_KEYS, memoryview(piece.keys).cast("B")),
            (_VALUES, memoryview(piece.values).cast("B")),
        ]
    if header is not None:
        meta.header.CopyFrom(header)
    parts = [meta.SerializeToString()]
    for number, data in bulk:
        parts += [_field_prefix(number, data.nbytes), data]
    return b"".join(parts)


def encode_event(piece: Piece, header: pb.KVHeader | None = None) -> bytes:
    """A serialised PrefillEvent carrying `piece` as its kv_chunk (inline KV)."""
    chunk = encode_chunk(piece, header)
    return _field_prefix(_EVENT_KV_CHUNK, len(chunk)) + chunk


def pass_through(message) -> bytes:
    """A response serializer that sends pre-serialised bytes as they are, messages serialised."""
    return message if isinstance(message, bytes) else message.SerializeToString()


# decoding ----------------------------------------------------------------------------------------
@dataclass
class ReadChunk:
    """A KVChunk read by `read_chunk`: its small fields parsed, its bulk fields views of the
    received bytes (empty when absent)."""

    meta: pb.KVChunk  # header, layer, token range, dtype, shape
    keys: memoryview
    values: memoryview
    token_ids: memoryview


def _read_varint(data, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("KVChunk: truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def read_chunk(data: bytes) -> ReadChunk:
    """Parses a serialised KVChunk, leaving keys, values and token ids as views of `data` (a
    protobuf parse would copy each of them, and every access to them once more)."""
    view = memoryview(data)
    bulk = {_KEYS: view[:0], _VALUES: view[:0], _TOKEN_IDS: view[:0]}
    small = []
    pos = 0
    while pos < len(view):
        start = pos
        key, pos = _read_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _LENGTH_DELIMITED:
            length, pos = _read_varint(view, pos)
            if pos + length > len(view):
                raise ValueError("KVChunk: a field runs past the end of the message")
            if number in bulk:
                bulk[number] = view[pos : pos + length]
                pos += length
                continue
            pos += length
        elif wire_type == _VARINT:
            _, pos = _read_varint(view, pos)
        elif wire_type == _FIXED64:
            pos += 8
        elif wire_type == _FIXED32:
            pos += 4
        else:
            raise ValueError(f"KVChunk: unsupported wire type {wire_type}")
        small.append(view[start:pos])
    meta = pb.KVChunk.FromString(b"".join(small))
    return ReadChunk(meta, bulk[_KEYS], bulk[_VALUES], bulk[_TOKEN_IDS])


def chunk_from_message(chunk: pb.KVChunk) -> ReadChunk:
    """A parsed KVChunk message (inline KV in a PrefillEvent) as a ReadChunk."""
    return ReadChunk(chunk, memoryview(chunk.keys), memoryview(chunk.values), memoryview(chunk.token_ids))


class KVSink(Protocol):
    """Where a transfer's KV goes: `header` once per stream (streams of one transfer carry the
    same header), then `kv` and `tokens` pieces in any order."""

    def header(self, header: pb.KVHeader) -> None: ...

    def kv(self, layer: int, start: int, end: int, dtype: str, shape, keys, values) -> None: ...

    def tokens(self, start: int, end: int, data) -> None: ...


def deliver(chunk: ReadChunk, sink: KVSink) -> None:
    """Hands one received chunk to `sink`."""
    meta = chunk.meta
    if meta.HasField("header"):
        sink.header(meta.header)
    if len(chunk.token_ids):
        sink.tokens(meta.token_start, meta.token_end, chunk.token_ids)
    elif len(chunk.keys):
        sink.kv(
            meta.layer, meta.token_start, meta.token_end, meta.dtype, meta.shape, chunk.keys, chunk.values
        )


class TensorSink:
    """Builds per-layer [Hkv, N, d] CPU tensors from pieces, each written once into tensors
    allocated when its layer's first piece arrives. Several streams of one transfer (disjoint layer
    ranges) may feed one sink from their own threads."""

    def __init__(self):
        self.message: pb.KVHeader | None = None
        self.keys: list = []
        self.values: list = []
        self.token_ids = None
        self.bytes_received = 0
        self._lock = threading.Lock()

    def header(self, header: pb.KVHeader) -> None:
        import torch

        with self._lock:
            if self.message is not None:
                if header != self.message:
                    raise ValueError("KV streams of one transfer carried different headers")
                return
            if header.dtype not in NUMPY_DTYPES:
                raise ValueError(
                    f"KV header dtype: expected one of {sorted(NUMPY_DTYPES)}, got {header.dtype!r}"
                )
            self.message = header
            self._dtype = getattr(torch, header.dtype)
            self._shape = (header.num_kv_heads, header.num_tokens, header.head_dim)
            self.keys = [None] * header.num_layers
            self.values = [None] * header.num_layers

    def _started(self) -> pb.KVHeader:
        if self.message is None:
            raise ValueError("KV stream did not start with a header")
        return self.message

    def tokens(self, start: int, end: int, data) -> None:
        import torch

        header = self._started()
        with self._lock:
            if self.token_ids is None:
                self.token_ids = torch.empty(header.num_tokens, dtype=torch.int64)
        self.token_ids.numpy()[start:end] = np.frombuffer(data, dtype="<i8")

    def kv(self, layer: int, start: int, end: int, dtype: str, shape, keys, values) -> None:
        import torch

        header = self._started()
        if dtype != header.dtype:
            raise ValueError(f"KV chunk dtype {dtype} differs from the header's {header.dtype}")
        if not 0 <= layer < len(self.keys):
            raise ValueError(f"KV chunk layer {layer} is outside the header's {len(self.keys)} layers")
        with self._lock:
            if self.keys[layer] is None:
                self.keys[layer] = torch.empty(self._shape, dtype=self._dtype)
                self.values[layer] = torch.empty(self._shape, dtype=self._dtype)
            self.bytes_received += len(keys) + len(values)
        shape = tuple(shape)
        for target, data in ((self.keys[layer], keys), (self.values[layer], values)):
            _numpy_view(target)[:, start:end] = np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(shape)


def _numpy_view(tensor) -> np.ndarray:
    """A writable numpy view of a CPU tensor (bfloat16 seen as int16, the same bits)."""
    import torch

    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()
