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
import difflib
import json
import os
import tomllib
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from proxyprefill.kernels import BACKENDS, ProxyAttnConfig

ENV_PREFIX = "PROXYPREFILL_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
WARM_UP_MODES = ("auto", "on", "off")
MiB = 1024 * 1024
GiB = 1024 * MiB


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the field."""


def option(default: Any, description: str) -> Any:
    """A ServerConfig field with its description, which `serve --help` shows with the default and
    the environment name (the flag, the environment and the file set the same field)."""
    return field(default=default, metadata={"help": description})


@dataclass(frozen=True)
class ServerConfig:
    # where to listen, and how
    listen: str = option("127.0.0.1:50051", "HOST:PORT the gRPC service listens on (port 0: any free port)")
    tls_cert: str | None = option(None, "PEM certificate chain; TLS is on when tls_cert and tls_key are set")
    tls_key: str | None = option(None, "PEM private key of tls_cert")
    tls_client_ca: str | None = option(
        None, "PEM CA certificate; when set, clients must present a certificate it signed (mutual TLS)"
    )
    auth_tokens_file: str | None = option(
        None, "file of lines 'principal token'; bearer-token auth is on when any token is configured"
    )
    auth_tokens: str | None = option(
        None, "tokens as 'principal=token,principal=token' (for the environment)"
    )
    metrics_port: int | None = option(None, "port of the Prometheus /metrics endpoint over HTTP; unset = off")
    metrics_host: str = option(
        "127.0.0.1", "address /metrics binds to: loopback unless told, whatever listen says"
    )
    metrics_require_token: bool = option(
        False, "serve /metrics only to callers with a bearer token of auth_tokens(_file)"
    )
    tracing: bool = option(
        False,
        "OpenTelemetry spans per RPC (needs the otel extra), exported as OTEL_TRACES_EXPORTER says: otlp "
        "(to OTEL_EXPORTER_OTLP_ENDPOINT), console or none; or to the tracer provider the process has",
    )
    max_message_bytes: int = option(64 * MiB, "largest gRPC message the server receives or sends, in bytes")
    drain_seconds: float = option(30.0, "grace period for in-flight requests on SIGTERM, in seconds")

    # the model and its workers
    model: str | None = option(
        None, "Hugging Face model directory or .gguf file; unset = the embedded SmolLM2"
    )
    profile: str = option(
        "auto",
        "calibrated ProxyAttn profile for requests that set no attention settings: auto (the "
        "model's profile written by `proxyprefill calibrate`, when there is one), none, or a "
        "profile file (refused when it is for another model)",
    )
    attention: str = option("proxy", "default attention mode of requests: proxy or dense")
    device: str | None = option(
        None, "torch device of the workers (cpu, cuda, cuda:N); unset = cuda when present"
    )
    dtype: str | None = option(None, "float32, float16 or bfloat16; unset = bfloat16 on cuda, float32 on cpu")
    backend: str = option("auto", f"attention kernels: {', '.join(BACKENDS)} (auto = Triton on CUDA tensors)")
    num_workers: int = option(0, "prefill workers; 0 = one per GPU in the Ray cluster, or one CPU worker")
    worker_slots: int = option(1, "prefills one worker runs at once")
    ray_address: str | None = option(
        None, "Ray cluster to join (auto, or HOST:PORT); unset = start Ray in-process"
    )
    ray_num_cpus: int | None = option(None, "CPUs of the in-process Ray; unset = Ray's own count")
    warm_up: str = option(
        "auto",
        "warm each worker up at start (kernels compiled for the default chunk and every length "
        "bucket up to max_prompt_tokens) before health reports SERVING: on, off, or auto (on for "
        "GPU workers)",
    )
    # sharded (pipeline) prefill: one prompt over several stage workers, each holding a layer range
    pipeline_workers: int = option(
        0,
        "stage workers one sharded request may use (layer ranges); 0 = sharding off. "
        "Requests force a count with pipeline_stages",
    )
    shard_above_tokens: int = option(
        65536, "prompts longer than this go to the planner, which may shard them over the stage workers"
    )
    pipeline_stage_memory_bytes: int = option(
        0,
        "memory one stage may use for requests; requests that fit no split are refused with "
        "RESOURCE_EXHAUSTED (0 = the device's free memory)",
    )

    # ProxyAttn defaults and the bounds a client may choose within
    gamma: float = option(0.95, "attention mass each head's block budget must cover (ProxyAttn default)")
    min_budget_tokens: int = option(2048, "floor on every row's block budget, in tokens")
    stride: int = option(4, "keep every s-th query and key when estimating block scores")
    # None keeps ProxyAttnConfig's default (the H100 crossover, 8192), which keeps an 8k-context model
    # such as SmolLM2 dense: set 0 on CPU to see sparsity
    dense_below_tokens: int | None = option(
        None, "contexts this short run dense; unset = ProxyAttnConfig's default (8192)"
    )
    min_gamma: float = option(0.5, "smallest gamma a request may ask for")
    min_budget_tokens_floor: int = option(128, "smallest min_budget_tokens a request may ask for")
    max_alpha: float = option(64.0, "largest alpha a request may ask for")

    # request limits
    max_prompt_tokens: int = option(
        0, "longest prompt accepted, in tokens; 0 = the model's max_position_embeddings"
    )
    max_pending_tokens: int = option(
        1 << 20, "admitted prompt tokens not yet finished, over all workers; more is RESOURCE_EXHAUSTED"
    )
    default_chunk_size: int = option(8192, "prefill chunk, in tokens, of requests that do not choose one")
    min_chunk_size: int = option(128, "smallest chunk a request may ask for")
    max_chunk_size: int = option(65536, "largest chunk a request may ask for")
    max_logit_positions: int = option(1024, "most logit positions one request may ask for")
    max_text_bytes: int = option(32 * MiB, "largest text prompt, in bytes (before tokenisation)")

    # KV leases
    default_lease_seconds: int = option(300, "lease of a KV handle when the request does not choose one")
    max_lease_seconds: int = option(3600, "longest lease a request or RenewLease may ask for")
    kv_memory_cap_bytes: int = option(
        16 * GiB, "KV bytes the leases may hold in all; more is RESOURCE_EXHAUSTED"
    )
    max_kv_chunk_bytes: int = option(4 * MiB, "largest KV piece FetchKV sends (64 KiB to 64 MiB)")
    default_kv_chunk_bytes: int = option(4 * MiB, "KV piece size when the request does not choose one")

    log_level: str = option("INFO", "logging level: DEBUG, INFO, WARNING, ERROR or CRITICAL")

    def proxy_config(self) -> ProxyAttnConfig:
        extra = {} if self.dense_below_tokens is None else {"dense_below_tokens": self.dense_below_tokens}
        return ProxyAttnConfig(
            gamma=self.gamma, min_budget_tokens=self.min_budget_tokens, stride=self.stride, **extra
        )

    def engine_kwargs(self) -> dict:
        """PrefillEngine.from_pretrained's arguments: what every worker loads and how it attends."""
        return {
            "path": self.model,
            "profile": self.profile,
            "attention": self.attention,
            "config": self.proxy_config(),
            "device": self.device,
            "dtype": self.dtype,
            "backend": self.backend,
        }

    def pool_kwargs(self) -> dict:
        """WorkerPool.start's options."""
        from proxyprefill.workers.prefill_worker import WarmUpPlan

        return {
            "num_workers": self.num_workers,
            "ray_address": self.ray_address,
            "ray_num_cpus": self.ray_num_cpus,
            "pipeline_workers": self.pipeline_workers,
            "pipeline_stage_memory_bytes": self.pipeline_stage_memory_bytes,
            "warm_up": WarmUpPlan(self.warm_up, self.default_chunk_size, self.max_prompt_tokens),
        }

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    def check(self) -> ServerConfig:
        """Returns self when every field is usable; raises ConfigError naming the first bad one."""
        self._check_edge()
        self._check_model_and_workers()
        self._check_limits()
        try:
            self.proxy_config()
        except ValueError as error:
            raise ConfigError(f"ProxyAttn defaults: {error}") from None
        return self

    def _need(self, ok: bool, name: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{name} {what}, got {getattr(self, name)!r}")

    def _check_edge(self) -> None:
        """Listening address, TLS, tokens, metrics, tracing."""
        need = self._need
        need(":" in self.listen, "listen", "must be HOST:PORT")
        need(bool(self.tls_cert) == bool(self.tls_key), "tls_key", "must be set together with tls_cert")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file"):
            path = getattr(self, name)
            need(path is None or Path(path).is_file(), name, "must name a readable file")
        need(self.tls_client_ca is None or self.tls_enabled, "tls_client_ca", "needs tls_cert and tls_key")
        need(self.metrics_port is None or 0 <= self.metrics_port <= 65535, "metrics_port", "must be a port")
        need(bool(self.metrics_host), "metrics_host", "must name an address")
        need(
            not self.metrics_require_token or bool(self.auth_tokens_file or self.auth_tokens),
            "metrics_require_token",
            "needs auth_tokens or auth_tokens_file",
        )
        need(self.log_level in LOG_LEVELS, "log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.tracing:
            from .tracing import TracingUnavailable, check_available

            try:
                check_available()
            except TracingUnavailable as error:
                raise ConfigError(f"tracing cannot be on: {error}") from None

    def _check_model_and_workers(self) -> None:
        """How the model runs and on how many workers."""
        need = self._need
        need(self.attention in ("proxy", "dense"), "attention", "must be 'proxy' or 'dense'")
        need(self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}")
        need(self.device is None or _is_torch_device(self.device), "device", "must be cpu, cuda or cuda:N")
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
        need(self.ray_num_cpus is None or self.ray_num_cpus >= 1, "ray_num_cpus", "must be >= 1")
        need(self.warm_up in WARM_UP_MODES, "warm_up", f"must be one of {', '.join(WARM_UP_MODES)}")

    def _check_limits(self) -> None:
        """What a request may ask for, and what the server holds for it."""
        need = self._need
        need(0.0 < self.min_gamma <= 1.0, "min_gamma", "must be in (0, 1]")
        need(self.min_gamma <= self.gamma <= 1.0, "gamma", "must be in [min_gamma, 1]")
        need(self.min_budget_tokens_floor >= 1, "min_budget_tokens_floor", "must be >= 1")
        need(self.min_budget_tokens >= self.min_budget_tokens_floor, "min_budget_tokens", "must be >= floor")
        need(self.max_alpha > 0, "max_alpha", "must be > 0")
        need(self.max_text_bytes >= 1, "max_text_bytes", "must be >= 1")
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


_FIELDS = {f.name: f for f in fields(ServerConfig)}
_UNDESCRIBED = [name for name, spec in _FIELDS.items() if "help" not in spec.metadata]
if _UNDESCRIBED:  # every field is a flag and an environment variable: `serve --help` describes it
    raise TypeError(f"ServerConfig fields need option(default, description): {_UNDESCRIBED}")


def _is_torch_device(name: str) -> bool:
    import torch

    try:
        torch.device(name)
    except RuntimeError:
        return False
    return True


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _coerce(name: str, raw: Any) -> Any:
    """Converts a string (environment, flags) or a file value to the field's type."""
    kind = str(_FIELDS[name].type)
    if raw is None:
        return None
    if kind == "bool":
        text = str(raw).strip().lower()  # also True/False from a file
        if text not in _TRUE + _FALSE:
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return text in _TRUE
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
    """The PROXYPREFILL_<FIELD> variables. Other PROXYPREFILL_ variables belong to other parts
    (PROXYPREFILL_CACHE, the client's PROXYPREFILL_TOKEN), except near-misses of a field's name,
    which are refused as the typos they are."""
    environ = os.environ if environ is None else environ
    names = list(_FIELDS)
    for key in environ:
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() not in _FIELDS:
            near = difflib.get_close_matches(key[len(ENV_PREFIX) :].lower(), names, n=1, cutoff=0.85)
            if near:
                raise ConfigError(f"{key} is not a setting; did you mean {ENV_PREFIX}{near[0].upper()}?")
    values = {}
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            values[name] = _coerce(name, environ[key])
    return values


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Adds --config and one --flag per field. The parsed default stays None (unset), so the file
    and environment layers show through; the help names the field's own default."""
    parser.add_argument(
        "--config",
        help=f"TOML or JSON file of ServerConfig fields (default: none; environment {ENV_PREFIX}CONFIG)",
    )
    for name, spec in _FIELDS.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(), help=flag_help(spec)
        )


def flag_help(spec: Field) -> str:
    """'<what it is> (default: D; environment PROXYPREFILL_NAME)', with argparse's % escaped."""
    default = "unset" if spec.default is None else repr(spec.default).strip("'")
    text = f"{spec.metadata['help']} (default: {default}; environment {ENV_PREFIX}{spec.name.upper()})"
    return text.replace("%", "%%")


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
