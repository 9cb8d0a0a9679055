"""KV cache files: safetensors with the compatibility header every KV transfer carries.

A file holds, per layer i, `layers.{i}.key` and `layers.{i}.value` [Hkv, N, d] in the model's
dtype, `token_ids` int64 [N], and in the safetensors metadata the JSON header under
`proxyprefill.kv_header`. A consumer loads it with `load_kv(path, expect=...)`, which refuses a
header that does not match what it expects (another model, dtype, RoPE, prompt...) with a
KVMismatchError naming the field, and refuses a file whose tensors contradict its own header.
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, fields

import torch

HEADER_KEY = "proxyprefill.kv_header"
FORMAT_VERSION = 1
LAYOUT = "[Hkv, N, d]"

# fields that describe the model (compared against a ModelInfo) vs. the prompt
MODEL_FIELDS = ("model_id", "num_layers", "num_kv_heads", "head_dim", "dtype", "rope_theta", "rope_scaling")


class KVMismatchError(ValueError):
    """A KV header does not match the model or header it is checked against."""

    def __init__(self, field_name: str, found, expected):
        self.field = field_name
        self.found = found
        self.expected = expected
        super().__init__(f"KV header mismatch in {field_name}: KV has {found!r}, expected {expected!r}")


@dataclass(frozen=True)
class KVHeader:
    """Identity of a KV cache: which model made it (layers, heads, dtype, RoPE) and for which
    prompt (token count and sha256 of the token ids as int64 little-endian bytes)."""

    model_id: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    rope_theta: float
    rope_scaling: dict | None
    num_tokens: int
    token_sha256: str
    layout: str = LAYOUT
    format_version: int = FORMAT_VERSION

    @classmethod
    def for_model(cls, info, num_tokens: int, token_sha256: str) -> KVHeader:
        return cls(
            model_id=info.model_id,
            num_layers=info.num_layers,
            num_kv_heads=info.num_kv_heads,
            head_dim=info.head_dim,
            dtype=info.dtype,
            rope_theta=float(info.rope_theta),
            rope_scaling=info.rope_scaling,
            num_tokens=num_tokens,
            token_sha256=token_sha256,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVHeader:
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise KVMismatchError("header", "unparseable JSON", "a KVHeader") from exc
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in values]
        unknown = sorted(set(values) - known)
        if unknown or missing:
            raise KVMismatchError("header", sorted(values), sorted(known))
        try:
            return cls(**values)
        except TypeError as exc:
            raise KVMismatchError("header", sorted(values), sorted(known)) from exc

    def check_compatible(self, other) -> None:
        """Raise KVMismatchError naming the first differing field.

        `other` is a KVHeader (every field must match) or a ModelInfo-like object (the model
        fields must match: model_id, layers, KV heads, head_dim, dtype, RoPE).
        """
        if isinstance(other, KVHeader):
            names = [f.name for f in fields(self)]
        else:
            names = list(MODEL_FIELDS)
            if self.layout != LAYOUT:
                raise KVMismatchError("layout", self.layout, LAYOUT)
            if self.format_version != FORMAT_VERSION:
                raise KVMismatchError("format_version", self.format_version, FORMAT_VERSION)
        for name in names:
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "rope_theta":
                mine, theirs = float(mine), float(theirs)
            if mine != theirs:
                raise KVMismatchError(name, mine, theirs)


@dataclass
class KVData:
    """KV loaded from a file: per-layer [Hkv, N, d] keys/values, token ids, header."""

    header: KVHeader
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    token_ids: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def to_hf_cache(self):
        from .kv_cache import to_dynamic_cache

        return to_dynamic_cache(self.keys, self.values)


def save_kv(path: str | os.PathLike, result) -> None:
    """Write a PrefillResult's (or KVData's) KV, token ids and header to a safetensors file."""
    from safetensors.torch import save_file

    header = result.header
    tensors = {"token_ids": result.token_ids.detach().to("cpu", torch.int64).contiguous()}
    for i, (k, v) in enumerate(zip(result.keys, result.values, strict=True)):
        tensors[f"layers.{i}.key"] = k.detach().to("cpu").contiguous()
        tensors[f"layers.{i}.value"] = v.detach().to("cpu").contiguous()
    save_file(tensors, os.fspath(path), metadata={HEADER_KEY: header.to_json()})


def read_header(path: str | os.PathLike) -> KVHeader:
    """The header of a KV file without reading its tensors."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if HEADER_KEY not in metadata:
        raise KVMismatchError("header", "absent", f"metadata key {HEADER_KEY!r}")
    return KVHeader.from_json(metadata[HEADER_KEY])


def load_kv(path: str | os.PathLike, expect=None, device: str | torch.device = "cpu") -> KVData:
    """Read a KV file. `expect` (a KVHeader, a ModelInfo, or an engine with .model_info) is
    checked against the stored header first; then the tensors are checked against the header."""
    from safetensors.torch import load_file

    header = read_header(path)
    if expect is not None:
        header.check_compatible(getattr(expect, "model_info", expect))
    tensors = load_file(os.fspath(path), device=str(device))
    token_ids = tensors.pop("token_ids")
    if token_ids.numel() != header.num_tokens:
        raise KVMismatchError("num_tokens", int(token_ids.numel()), header.num_tokens)
    from .kv_wire import token_sha256  # kv_wire builds on this module's KVHeader

    if token_sha256(token_ids) != header.token_sha256:
        raise KVMismatchError("token_sha256", token_sha256(token_ids), header.token_sha256)
    keys, values = [], []
    expected_shape = (header.num_kv_heads, header.num_tokens, header.head_dim)
    expected_dtype = getattr(torch, header.dtype)
    for i in range(header.num_layers):
        for kind, bucket in (("key", keys), ("value", values)):
            name = f"layers.{i}.{kind}"
            if name not in tensors:
                raise KVMismatchError(name, "absent", f"tensor {expected_shape}")
            tensor = tensors.pop(name)
            if tuple(tensor.shape) != expected_shape:
                raise KVMismatchError(f"{name}.shape", tuple(tensor.shape), expected_shape)
            if tensor.dtype != expected_dtype:
                raise KVMismatchError(f"{name}.dtype", str(tensor.dtype), header.dtype)
            bucket.append(tensor)
    if tensors:
        raise KVMismatchError("tensors", sorted(tensors), "only token_ids and layers.{i}.key/value")
    return KVData(header=header, keys=keys, values=values, token_ids=token_ids)
