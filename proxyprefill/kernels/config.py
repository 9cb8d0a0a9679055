"""ProxyAttn settings, validated once at construction.

Every knob of the algorithm lives here (ARCHITECTURE.md, "The algorithm"); functions take a
`ProxyAttnConfig` rather than loose keyword arguments so that the reference, the Triton path and
the service agree on names and defaults.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Literal

from .registry import ESTIMATORS

BudgetPolicy = Literal["gamma", "power", "gamma+power"]
RowRule = Literal["fixed", "scaled"]

BUDGET_POLICIES = ("gamma", "power", "gamma+power")
ROW_RULES = ("fixed", "scaled")


@dataclass(frozen=True)
class ProxyAttnConfig:
    """Settings of ProxyAttn block-sparse attention.

    block_size: tokens per query/key block of the mask (B).
    stride: keep every `stride`-th query and key (the first of each window) when estimating
        block scores. Must divide `block_size`.
    proxy_groups: number of proxy heads g; must divide the number of KV heads. Each group holds
        whole KV heads and all their query heads.
    gamma: cumulative attention mass a head's budget must cover (0 < gamma <= 1).
    min_budget_tokens: floor on every row's budget, in tokens (rounded up to whole blocks).
    budget: "gamma" (per-head cumulative-mass budget from the chunk's last query block),
        "power" (a row seeing n keys keeps ceil(alpha * n**exponent / B) blocks), or
        "gamma+power" (the power budget as a floor under the gamma budget).
    alpha, exponent: the `alpha * n**C` policy.
    row_rule: how the gamma budget (measured on the last query block) applies to earlier rows:
        "fixed" keeps the same block count (clamped to the row's causal blocks); "scaled" keeps
        the same fraction of the row's causal blocks.
    sink_blocks: leading key blocks always kept (attention sinks).
    local_blocks: blocks ending at the diagonal always kept (1 = the diagonal block only).
    dense_below_tokens: contexts (keys seen by the chunk) at or below this length use dense
        attention; estimation would cost more than it saves. The default is the crossover
        measured on an H100 (bench/results/kernels-h100.json, block 128, d=128, 32/8 heads): at
        8k keys the whole sparse path at ~66% sparsity ties cuDNN (1.62 vs 1.59 ms), from 12k it
        wins (1.72 vs 2.02 ms). On the CPU, or with smaller blocks, set it explicitly.
    estimator: the block-score estimator, a name in proxyprefill/kernels/registry.ESTIMATORS: "proxy"
        (ProxyAttn's strided proxy-head scores) or "meanpool" (the coarse baseline: per-group
        scores of mean-pooled query and key blocks, as sequence-compressing methods do), kept
        for comparison in the accuracy harness.
    """

    block_size: int = 128
    stride: int = 4
    proxy_groups: int = 1
    gamma: float = 0.95
    min_budget_tokens: int = 2048
    budget: BudgetPolicy = "gamma"
    alpha: float = 1.0
    exponent: float = 0.8
    row_rule: RowRule = "fixed"
    sink_blocks: int = 1
    local_blocks: int = 1
    dense_below_tokens: int = 8192
    estimator: str = "proxy"

    def __post_init__(self) -> None:
        _check_int("block_size", self.block_size, minimum=16)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        _check_int("stride", self.stride, minimum=1)
        if self.block_size % self.stride:
            raise ValueError(
                f"stride must divide block_size, got stride={self.stride}, block_size={self.block_size}"
            )
        _check_int("proxy_groups", self.proxy_groups, minimum=1)
        if not (isinstance(self.gamma, int | float) and 0.0 < float(self.gamma) <= 1.0):
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma!r}")
        _check_int("min_budget_tokens", self.min_budget_tokens, minimum=0)
        if self.budget not in BUDGET_POLICIES:
            raise ValueError(f"budget must be one of {BUDGET_POLICIES}, got {self.budget!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not (isinstance(self.exponent, int | float) and 0.0 < float(self.exponent) <= 1.0):
            raise ValueError(f"exponent must be in (0, 1], got {self.exponent!r}")
        if self.row_rule not in ROW_RULES:
            raise ValueError(f"row_rule must be one of {ROW_RULES}, got {self.row_rule!r}")
        _check_int("sink_blocks", self.sink_blocks, minimum=0)
        _check_int("local_blocks", self.local_blocks, minimum=1)
        _check_int("dense_below_tokens", self.dense_below_tokens, minimum=0)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {self.estimator!r}")

    @property
    def min_budget_blocks(self) -> int:
        return -(-self.min_budget_tokens // self.block_size)

    def replace(self, **changes) -> ProxyAttnConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ProxyAttnConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ProxyAttnConfig field(s): {sorted(unknown)}")
        return cls(**values)


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
