"""Server configuration: defaults < file (TOML or JSON) < environment (PROXYPREFILL_*) < flags.

Every field of `ServerConfig` can be set in each layer under its own name: `max_pending_tokens`
in a file, `PROXYPREFILL_MAX_PENDING_TOKENS` in the environment, `--max-pending-tokens` on the
command line. `ServerConfig.check()` validates the merged result once, so a bad value fails at
start-up with the field's name rather than at the first request.

Sharded (pipeline) prefill. With `pipeline_workers` = S >= 2 the server starts S stage workers
besides the replicas; each holds a contiguous range of layers and the KV of those layers, and a
sharded request's chunks flow through them in turn (workers/pipeline.py). A request runs sharded
when it asks for `pipeline_stages` = N >= 2 (at most S), or when it asks for 0 (the default), is
longer than `shard_above_tokens`, and the planner (workers/planner.py: prompt length, model shape,
free memory per stage, pending tokens) picks N >= 2. A request that fits on no split is refused
with RESOURCE_EXHAUSTED before any work, naming the bytes it needs. `pipeline_stage_memory_bytes`
caps what one stage may use for requests (its share of a GPU); 0 = the device's free memory. On a
GPU cluster every stage takes one GPU: with num_workers = 0 the replicas get the GPUs the stages
leave. The KV of a sharded request stays on the stages under the usual handle and lease, and
FetchKV streams it from them in layer order.
"""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from proxyprefill.kernels.config import ProxyAttnConfig

ENV_PREFIX = "PROXYPREFILL_"
MiB = 1024 * 1024
GiB = 1024 * MiB


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


@dataclass(frozen=True)
class ServerConfig:
    # where to listen, and how
    listen: str = "127.0.0.1:50051"
    tls_cert: str | None = None  # PEM certificate chain; TLS is on when cert and key are set
    tls_key: str | None = None
    tls_client_ca: str | None = None  # when set, clients must present a certificate it signed
    auth_tokens_file: str | None = None  # lines "principal token"; auth is on when tokens exist
    auth_tokens: str | None = None  # "principal=token,principal=token" (environment use)
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None = off
    max_message_bytes: int = 64 * MiB  # largest request the server will receive
    drain_seconds: float = 30.0  # grace period for in-flight requests on SIGTERM

    # the model and its workers
    model: str | None = None  # HF directory or .gguf; None = the embedded SmolLM2
    profile: str = "auto"  # calibrated ProxyAttn profile: "auto", "none" or a file
    attention: str = "proxy"  # default attention mode: "proxy" or "dense"
    device: str | None = None  # None: cuda when the worker has a GPU, else cpu
    dtype: str | None = None  # None: bfloat16 on cuda, float32 on cpu
    backend: str = "auto"
    num_workers: int = 0  # 0 = one per GPU in the Ray cluster, or one CPU worker
    worker_slots: int = 1  # prefills a worker runs at once
    ray_address: str | None = None  # None = start Ray in-process
    ray_num_cpus: int | None = None
    # sharded (pipeline) prefill: one prompt over several stage workers, each holding a layer range
    pipeline_workers: int = 0  # stage workers one sharded request may use; 0 = sharding off
    shard_above_tokens: int = 65536  # longer prompts go to the planner (when pipeline_workers >= 2)
    pipeline_stage_memory_bytes: int = 0  # memory a stage may use for requests; 0 = its free memory

    # ProxyAttn defaults and the bounds a client may choose within
    gamma: float = 0.95
    min_budget_tokens: int = 2048
    stride: int = 4
    # contexts this short run dense; None = ProxyAttnConfig's default (the H100 crossover, 8192),
    # which keeps an 8k-context model such as SmolLM2 dense: set 0 on CPU to see sparsity
    dense_below_tokens: int | None = None
    min_gamma: float = 0.5
    min_budget_tokens_floor: int = 128
    max_alpha: float = 64.0

    # request limits
    max_prompt_tokens: int = 0  # 0 = the model's max_position_embeddings
    max_pending_tokens: int = 1 << 20  # admitted prompt tokens not yet finished, all workers
    default_chunk_size: int = 8192
    min_chunk_size: int = 128
    max_chunk_size: int = 65536
    max_logit_positions: int = 1024
    max_text_bytes: int = 32 * MiB

    # KV leases
    default_lease_seconds: int = 300
    max_lease_seconds: int = 3600
    kv_memory_cap_bytes: int = 16 * GiB
    max_kv_chunk_bytes: int = 4 * MiB
    default_kv_chunk_bytes: int = 4 * MiB

    log_level: str = "INFO"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def proxy_config(self) -> ProxyAttnConfig:
        extra = {} if self.dense_below_tokens is None else {"dense_below_tokens": self.dense_below_tokens}
        return ProxyAttnConfig(
            gamma=self.gamma, min_budget_tokens=self.min_budget_tokens, stride=self.stride, **extra
        )

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def check(self) -> ServerConfig:
        """Returns self when every field is usable; raises ConfigError naming the first bad one."""

        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"{name} {what}, got {getattr(self, name)!r}")

        need(":" in self.listen, "listen", "must be HOST:PORT")
        need(bool(self.tls_cert) == bool(self.tls_key), "tls_key", "must be set together with tls_cert")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
            path = getattr(self, name)
            need(path is None or Path(path).is_file(), name, "must name a readable file")
        need(self.tls_client_ca is None or self.tls_enabled, "tls_client_ca", "needs tls_cert and tls_key")
        need(self.attention in ("proxy", "dense"), "attention", "must be 'proxy' or 'dense'")
        need(
            self.profile in ("auto", "none") or Path(self.profile).is_file(),
            "profile",
            "must be 'auto', 'none' or a readable profile file",
        )
        need(
            self.dtype in (None, "float32", "float16", "bfloat16"),
            "dtype",
            "must be float32/float16/bfloat16",
        )
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.pipeline_workers >= 0, "pipeline_workers", "must be >= 0 (0 = sharding off)")
        need(self.pipeline_workers != 1, "pipeline_workers", "must be 0 (off) or >= 2 stages")
        need(self.shard_above_tokens >= 1, "shard_above_tokens", "must be >= 1")
        need(self.pipeline_stage_memory_bytes >= 0, "pipeline_stage_memory_bytes", "must be >= 0")
        need(self.worker_slots >= 1, "worker_slots", "must be >= 1")
        need(0.0 < self.min_gamma <= 1.0, "min_gamma", "must be in (0, 1]")
        need(self.min_gamma <= self.gamma <= 1.0, "gamma", "must be in [min_gamma, 1]")
        need(self.min_budget_tokens >= self.min_budget_tokens_floor, "min_budget_tokens", "must be >= floor")
        need(self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0")
        need(self.max_pending_tokens >= 1, "max_pending_tokens", "must be >= 1")
        need(
            1 <= self.min_chunk_size <= self.max_chunk_size,
            "min_chunk_size",
            "must be in [1, max_chunk_size]",
        )
        need(
            self.min_chunk_size <= self.default_chunk_size <= self.max_chunk_size,
            "default_chunk_size",
            "must be in [min_chunk_size, max_chunk_size]",
        )
        need(self.max_logit_positions >= 1, "max_logit_positions", "must be >= 1")
        need(
            1 <= self.default_lease_seconds <= self.max_lease_seconds,
            "default_lease_seconds",
            "must be in [1, max]",
        )
        need(self.kv_memory_cap_bytes >= 0, "kv_memory_cap_bytes", "must be >= 0")
        need(
            64 * 1024 <= self.max_kv_chunk_bytes <= 64 * MiB,
            "max_kv_chunk_bytes",
            "must be in [64 KiB, 64 MiB]",
        )
        need(
            1024 <= self.default_kv_chunk_bytes <= self.max_kv_chunk_bytes,
            "default_kv_chunk_bytes",
            "must be in [1 KiB, max_kv_chunk_bytes]",
        )
        need(self.max_message_bytes >= 1 * MiB, "max_message_bytes", "must be >= 1 MiB")
        need(self.drain_seconds >= 0, "drain_seconds", "must be >= 0")
        try:
            self.proxy_config()
        except ValueError as error:
            raise ConfigError(f"ProxyAttn defaults: {error}") from None
        return self


_FIELDS = {f.name: f for f in fields(ServerConfig) if f.name != "extra"}


def _coerce(name: str, raw: Any) -> Any:
    """Converts a string (environment, flags) or a file value to the field's type."""
    kind = str(_FIELDS[name].type)
    if raw is None:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if "None" in kind and text.lower() in ("", "none", "null"):
            return None
        try:
            if kind.startswith("int"):
                return int(text, 0)
            if kind.startswith("float"):
                return float(text)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        return text
    if kind.startswith("int") and (isinstance(raw, bool) or not isinstance(raw, int)):
        raise ConfigError(f"{name} must be an integer, got {raw!r}")
    if kind.startswith("float") and (isinstance(raw, bool) or not isinstance(raw, int | float)):
        raise ConfigError(f"{name} must be a number, got {raw!r}")
    return raw


def from_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    text = path.read_text()
    values = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    values = values.get("server", values)
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown configuration field(s) in {path}: {unknown}")
    return {name: _coerce(name, value) for name, value in values.items()}


def from_environment(environ: dict[str, str] | None = None) -> dict:
    environ = os.environ if environ is None else environ
    values = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _coerce(name, environ[key])
    return values


_HELP = {
    "profile": "calibrated ProxyAttn profile for requests that set no attention settings: 'auto' "
    "(default: the model's profile written by `proxyprefill calibrate`, when there is one), "
    "'none', or a profile file (refused when it is for another model)",
    "pipeline_workers": "stage workers one sharded request may use (layer ranges); 0 = sharding off "
    "(default). Requests force a count with pipeline_stages",
    "shard_above_tokens": "prompts longer than this go to the planner, which may shard them over "
    "the stage workers (default 65536)",
    "pipeline_stage_memory_bytes": "memory one stage may use for requests; requests that fit no "
    "split are refused with RESOURCE_EXHAUSTED (default 0 = the device's free memory)",
}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --config and one --flag per field (default: unset, so lower layers show through)."""
    parser.add_argument("--config", help="TOML or JSON file with ServerConfig fields")
    for name in _FIELDS:
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(), help=_HELP.get(name)
        )


def load(
    args: argparse.Namespace | None = None, environ: dict[str, str] | None = None, **overrides
) -> ServerConfig:
    """Merges the layers into a checked ServerConfig."""
    values: dict = {}
    config_file = getattr(args, "config", None) if args is not None else None
    config_file = config_file or (environ if environ is not None else os.environ).get(ENV_PREFIX + "CONFIG")
    if config_file:
        values.update(from_file(config_file))
    values.update(from_environment(environ))
    if args is not None:
        for name in _FIELDS:
            raw = getattr(args, name, None)
            if raw is not None:
                values[name] = _coerce(name, raw)
    values.update(overrides)
    return replace(ServerConfig(), **values).check()
