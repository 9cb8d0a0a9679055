"""Per-model ProxyAttn profiles: the settings a calibration chose, with the figures behind them.

A profile is a versioned JSON file written by `proxyprefill calibrate`. It names the model it was
measured on (model id and a fingerprint of its configuration), the chosen settings (dense, or a
ProxyAttnConfig with optionally one gamma per layer), whether they met the quality target, every
candidate that was measured, and the calibration's own parameters, so a reader can judge the
choice without rerunning it.

The engine loads the profile of its model by default (`profile="auto"`): the file
`profiles_dir() / default_profile_name(info)` when it exists. A profile for another model is refused
(`ProfileError` naming the field that differs). Settings a request gives explicitly (a config, or
dense attention) override the profile for that request.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from proxyprefill.kernels.config import ProxyAttnConfig

from .model import ModelInfo

PROFILE_FORMAT = "proxyprefill-profile"
PROFILE_VERSION = 1
AUTO = "auto"  # look for the model's profile in profiles_dir()
NONE = "none"  # no profile: the engine's own settings


class ProfileError(ValueError):
    """A profile file that cannot be used: unreadable, another format or version, another model."""


# --------------------------------------------------------------------------------------------
# Where profiles live, and which model a profile belongs to
# --------------------------------------------------------------------------------------------
def profiles_dir() -> Path:
    """$PROXYPREFILL_CACHE/profiles, or ~/.cache/proxyprefill/profiles."""
    override = os.environ.get("PROXYPREFILL_CACHE")
    root = Path(override).expanduser() if override else Path.home() / ".cache" / "proxyprefill"
    return root / "profiles"


def model_fingerprint(info: ModelInfo) -> str:
    """sha256 of the model's shape: everything in ModelInfo that the attention depends on (not the
    id, the dtype or the end-of-sequence tokens). Two checkpoints of one architecture share it,
    which is why a profile also records and checks the model id."""
    shape = {
        "architecture": info.architecture,
        "num_layers": info.num_layers,
        "num_heads": info.num_heads,
        "num_kv_heads": info.num_kv_heads,
        "head_dim": info.head_dim,
        "vocab_size": info.vocab_size,
        "max_position_embeddings": info.max_position_embeddings,
        "rope_theta": info.rope_theta,
        "rope_scaling": info.rope_scaling,
    }
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()


def default_profile_name(info: ModelInfo) -> str:
    """The file name of the model's default profile: its id (made file-safe) and fingerprint."""
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", info.model_id).strip("._") or "model"
    return f"{safe_id}-{model_fingerprint(info)[:16]}.json"


def default_profile_path(info: ModelInfo) -> Path:
    return profiles_dir() / default_profile_name(info)


# --------------------------------------------------------------------------------------------
# What a profile holds
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileSettings:
    """What the engine runs for requests that do not choose their own settings.

    attention: "proxy", or "dense" when no ProxyAttn setting met the quality target.
    config: the ProxyAttn settings (for "dense", the calibration's base settings, used only when a
        request asks for proxy attention without settings of its own).
    layer_gammas: one gamma per layer, overriding config.gamma layer by layer; empty = config.gamma
        everywhere.
    """

    attention: str
    config: ProxyAttnConfig
    layer_gammas: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.attention not in ("proxy", "dense"):
            raise ProfileError(f"settings.attention must be 'proxy' or 'dense', got {self.attention!r}")
        for layer, gamma in enumerate(self.layer_gammas):
            if not (isinstance(gamma, int | float) and 0.0 < float(gamma) <= 1.0):
                raise ProfileError(f"settings.layer_gammas[{layer}] must be in (0, 1], got {gamma!r}")

    def layer_configs(self, num_layers: int) -> tuple[ProxyAttnConfig, ...] | ProxyAttnConfig:
        """One ProxyAttnConfig per layer when the gammas differ by layer, else the one config."""
        if not self.layer_gammas:
            return self.config
        if len(self.layer_gammas) != num_layers:
            raise ProfileError(
                f"settings.layer_gammas has {len(self.layer_gammas)} entries; "
                f"the model has {num_layers} layers"
            )
        return tuple(self.config.replace(gamma=gamma) for gamma in self.layer_gammas)


@dataclass(frozen=True)
class TextDelta:
    """NLL per token on one calibration text, and its change against dense attention."""

    text: str
    tokens: int
    nll: float
    delta_nll: float


@dataclass(frozen=True)
class Measurement:
    """One candidate's measured figures (dense: sparsity 0, recall 1, deltas 0)."""

    name: str
    attention: str
    config: ProxyAttnConfig
    layer_gammas: tuple[float, ...]
    texts: tuple[TextDelta, ...]
    sparsity: float  # fraction of causal blocks skipped, all layers and heads
    layer_sparsity: tuple[float, ...]
    recall: float  # dense attention mass inside the kept blocks, sampled rows
    layer_recall: tuple[float, ...]

    @property
    def worst_delta_nll(self) -> float:
        return max(t.delta_nll for t in self.texts)

    def meets(self, target_delta_nll: float) -> bool:
        """The quality target holds on every text (not only on average)."""
        return self.worst_delta_nll <= target_delta_nll


@dataclass(frozen=True)
class TextSource:
    """A calibration text: its name, where it came from, and the sha256 of the text used."""

    name: str
    source: str
    sha256: str
    tokens: int


@dataclass(frozen=True)
class CalibrationParameters:
    """How a calibration was run (recorded in the profile; `proxyprefill calibrate --help`)."""

    target_delta_nll: float = 0.02
    tokens: int = 2048
    chunk_size: int = 1024
    block_size: int = 128
    gammas: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98, 0.99)
    proxy_groups: tuple[int, ...] = ()  # empty: 1 and the model's KV-head count
    min_budget_tokens: tuple[int, ...] = (256, 1024)
    per_layer_gamma: bool = True
    dense_below_tokens: int = 8192  # written into the chosen settings; calibration runs all sparse
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.target_delta_nll, int | float) and self.target_delta_nll >= 0):
            raise ValueError(f"target_delta_nll must be >= 0, got {self.target_delta_nll!r}")
        if self.tokens < 2:
            raise ValueError(f"tokens must be >= 2, got {self.tokens}")
        if self.chunk_size <= 0 or self.chunk_size % self.block_size:
            raise ValueError(
                f"chunk_size must be a positive multiple of block_size ({self.block_size}), "
                f"got {self.chunk_size}"
            )
        if not self.gammas:
            raise ValueError("gammas must list at least one value")
        if not self.min_budget_tokens:
            raise ValueError("min_budget_tokens must list at least one value")
        # every grid point must be a valid ProxyAttnConfig: fail here, before any model work
        for gamma in self.gammas:
            for budget in self.min_budget_tokens:
                for groups in self.proxy_groups or (1,):
                    ProxyAttnConfig(
                        block_size=self.block_size, gamma=gamma, min_budget_tokens=budget, proxy_groups=groups
                    )
        ProxyAttnConfig(dense_below_tokens=self.dense_below_tokens)


@dataclass(frozen=True)
class CalibrationEnvironment:
    """Where a calibration ran (for readers; figures can differ slightly across devices)."""

    device: str = ""
    dtype: str = ""
    torch: str = ""
    transformers: str = ""
    proxyprefill: str = ""


@dataclass(frozen=True)
class Profile:
    """A calibrated profile of one model; see the module docstring."""

    model_id: str
    model_fingerprint: str
    settings: ProfileSettings
    proxy_met_target: bool  # False: no ProxyAttn setting met the target; the settings keep dense
    dense: Measurement
    chosen: Measurement | None  # None when nothing met the target (settings are then dense)
    candidates: tuple[Measurement, ...]
    calibration: CalibrationParameters
    texts: tuple[TextSource, ...]
    environment: CalibrationEnvironment = field(default_factory=CalibrationEnvironment)
    created_utc: str = ""
    version: int = PROFILE_VERSION

    @property
    def digest(self) -> str:
        """sha256 of what decides behaviour and quality: model, settings and measured figures."""
        decisive = {
            "model_id": self.model_id,
            "model_fingerprint": self.model_fingerprint,
            "settings": asdict(self.settings),
            "chosen": None if self.chosen is None else asdict(self.chosen),
        }
        return hashlib.sha256(json.dumps(decisive, sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        """How the service reports the profile that served: model id and digest."""
        return f"{self.model_id}@{self.digest[:12]}"

    def check_model(self, info: ModelInfo) -> None:
        """ProfileError unless this profile was calibrated on `info`'s model."""
        fingerprint = model_fingerprint(info)
        if self.model_fingerprint != fingerprint:
            raise ProfileError(
                f"profile model_fingerprint {self.model_fingerprint[:16]} (model {self.model_id!r}) does not "
                f"match the loaded model {info.model_id!r} (fingerprint {fingerprint[:16]}): "
                "the profile is for another model; calibrate this one with `proxyprefill calibrate`"
            )
        if self.model_id != info.model_id:
            raise ProfileError(
                f"profile model_id {self.model_id!r} does not match the loaded model {info.model_id!r} "
                "(same architecture, possibly other weights); "
                "calibrate this one with `proxyprefill calibrate`"
            )
        self.settings.layer_configs(info.num_layers)  # the per-layer list fits the model

    # files -----------------------------------------------------------------------------------
    def to_json(self) -> str:
        document = {"format": PROFILE_FORMAT, **asdict(self)}
        document["name"] = self.name
        return json.dumps(document, indent=1) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a reader never sees half a profile); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(path.name + ".tmp")
        staging.write_text(self.to_json())
        os.replace(staging, path)
        return path

    @classmethod
    def from_json(cls, text: str, origin: str = "profile") -> Profile:
        try:
            document = json.loads(text)
        except ValueError as error:
            raise ProfileError(f"{origin} is not JSON: {error}") from None
        if not isinstance(document, dict) or document.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{origin}: format must be {PROFILE_FORMAT!r}")
        if document.get("version") != PROFILE_VERSION:
            raise ProfileError(
                f"{origin}: version {document.get('version')!r} is not supported (this build reads "
                f"version {PROFILE_VERSION}); calibrate again"
            )
        try:
            return cls(
                model_id=document["model_id"],
                model_fingerprint=document["model_fingerprint"],
                settings=_settings(document["settings"]),
                proxy_met_target=bool(document["proxy_met_target"]),
                dense=_measurement(document["dense"]),
                chosen=None if document["chosen"] is None else _measurement(document["chosen"]),
                candidates=tuple(_measurement(m) for m in document["candidates"]),
                calibration=_parameters(document["calibration"]),
                texts=tuple(TextSource(**t) for t in document["texts"]),
                environment=CalibrationEnvironment(**document["environment"]),
                created_utc=document.get("created_utc", ""),
            )
        except KeyError as error:
            raise ProfileError(f"{origin}: missing field {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:
            raise ProfileError(f"{origin}: {error}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Profile:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as error:
            raise ProfileError(f"cannot read profile {path}: {error.strerror or error}") from None
        return cls.from_json(text, origin=f"profile {path}")


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _settings(values: dict) -> ProfileSettings:
    return ProfileSettings(
        attention=values["attention"],
        config=ProxyAttnConfig.from_dict(values["config"]),
        layer_gammas=tuple(values["layer_gammas"]),
    )


def _measurement(values: dict) -> Measurement:
    return Measurement(
        name=values["name"],
        attention=values["attention"],
        config=ProxyAttnConfig.from_dict(values["config"]),
        layer_gammas=tuple(values["layer_gammas"]),
        texts=tuple(TextDelta(**t) for t in values["texts"]),
        sparsity=values["sparsity"],
        layer_sparsity=tuple(values["layer_sparsity"]),
        recall=values["recall"],
        layer_recall=tuple(values["layer_recall"]),
    )


def _parameters(values: dict) -> CalibrationParameters:
    tuples = ("gammas", "proxy_groups", "min_budget_tokens")
    return CalibrationParameters(**{k: tuple(v) if k in tuples else v for k, v in values.items()})


# --------------------------------------------------------------------------------------------
# What an engine loads
# --------------------------------------------------------------------------------------------
def resolve(spec: str | os.PathLike | Profile | None, info: ModelInfo) -> Profile | None:
    """The profile an engine serving `info` uses.

    spec: "auto" (the model's profile in profiles_dir() when there is one), "none" or None (no
    profile), a path to a profile file (it must exist), or a Profile. Any profile found is
    checked against the model (ProfileError when it is for another one).
    """
    if spec is None or spec == NONE:
        return None
    if isinstance(spec, Profile):
        profile = spec
    elif spec == AUTO:
        path = default_profile_path(info)
        if not path.is_file():
            return None
        profile = Profile.load(path)
    else:
        profile = Profile.load(spec)
    profile.check_model(info)
    return profile
