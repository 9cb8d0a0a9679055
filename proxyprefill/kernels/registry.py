"""Attention backends and block-score estimators by name.

Each entry maps a name to "module:Class". Modules are imported on first use, so a backend whose
library is missing (Triton on a machine without it) is simply unavailable. Order matters for
backends: backend="auto" takes the first one that supports the tensors natively.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .backend import AttentionBackend, BlockScoreEstimator

BACKENDS: dict[str, str] = {
    "triton": "proxyprefill.kernels.triton_backend:TritonBackend",
    "torch": "proxyprefill.kernels.reference:ReferenceBackend",
}
ESTIMATORS: dict[str, str] = {
    "proxy": "proxyprefill.kernels.backend:ProxyScores",
    "meanpool": "proxyprefill.kernels.meanpool:MeanPoolScores",
}
BACKEND_CHOICES = ("auto", *BACKENDS)


def _load(path: str):
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)()


# Backends whose import failed (their library is missing), with the error: the hook selects a
# backend for every layer of every chunk, and a failed import is not cached by Python itself.
_MISSING: dict[str, ImportError] = {}


def load_backend(name: str) -> AttentionBackend:
    """The backend registered as `name`; ValueError for an unknown name, ImportError when its
    library is missing."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {name!r}")
    if name in _MISSING:
        raise _MISSING[name]
    try:
        return _load(BACKENDS[name])
    except ImportError as error:
        _MISSING[name] = error
        raise


def backend_available(name: str) -> bool:
    try:
        load_backend(name)
    except ImportError:
        return False
    return True


def select_backend(choice: str | AttentionBackend, tensor: torch.Tensor) -> AttentionBackend:
    """The backend that runs a chunk of `tensor`'s device, dtype and head dim.

    "auto": the first registered backend that supports the tensor natively. A name: that
    backend, or ValueError saying why it cannot run the tensor. A backend object is taken as is
    once it accepts the tensor (tests hand in one built under Triton's interpreter)."""
    shape = (tensor.device, tensor.dtype, tensor.shape[-1])
    if choice == "auto":
        for name in BACKENDS:
            try:
                backend = load_backend(name)
            except ImportError:
                continue
            if backend.unsupported_reason(*shape) is None:
                return backend
        raise ValueError(f"no attention backend supports {tensor.dtype} on {tensor.device}")
    backend = load_backend(choice) if isinstance(choice, str) else choice
    reason = backend.unsupported_reason(*shape, emulated=True)
    if reason is not None:
        raise ValueError(f"backend={backend.name!r} {reason}")
    return backend


def load_estimator(name: str) -> BlockScoreEstimator:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {name!r}")
    return _load(ESTIMATORS[name])
