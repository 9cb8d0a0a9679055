"""What every Triton kernel module of the backend shares: numerics, launch helpers, reductions.

Numerics: every kernel accumulates in float32 and exponentiates with exp2, the softmax scale
folded with log2(e) (`LOG2E`); log-sum-exp values are returned in natural log. Half-precision
inputs feed the tensor cores directly; float32 inputs use full-precision ("ieee") dots
(`dot_precision`). Nothing in the backend synchronises with the host: every launch size is
derived from tensor shapes.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(cuda_index(device))
    return 4  # interpreter: keep grids small


# Reductions through tl.reduce with the standard combine functions: the same code tl.max/tl.sum
# generate, but callable from kernels that Triton's interpreter runs while the rest of the process
# keeps compiled kernels (tl.max/tl.sum are themselves jit functions, bound to one mode at import).
@triton.jit
def reduce_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def reduce_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


# Resource use of the last compiled launch of each kernel (registers, spills, shared memory),
# filled on the GPU for the benchmark's record; LAST_LAUNCH keeps the compiled kernel itself
# (its TTGIR and PTX), for the benchmarks that inspect it.
KERNEL_RESOURCES: dict[str, dict] = {}
LAST_LAUNCH: dict[str, object] = {}


def record_launch(name: str, kernel) -> None:
    if kernel is not None and hasattr(kernel, "n_regs"):
        shared = getattr(getattr(kernel, "metadata", None), "shared", None)
        KERNEL_RESOURCES[name] = {
            "registers": kernel.n_regs,
            "spills": kernel.n_spills,
            "shared_bytes": shared,
        }
        LAST_LAUNCH[name] = kernel


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
