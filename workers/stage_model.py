"""What a pipeline stage loads: its spec, and the model holding just its layers.

A stage owns decoder layers [layer_start, layer_stop) of a model. Where the checkpoint allows it,
only those layers (plus the embedding on the first stage, the final norm and LM head on the last)
are ever built or read; `load_stage_model` picks the way by the source:

- a dict of config fields: random weights, only the stage's layers built (timing runs);
- a Hugging Face safetensors directory: the model built without storage, then exactly the
  stage's tensors read from the files;
- a GGUF file or the embedded default: loaded whole on the host (the caller keeps its share).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import check_supported, load_model, model_info_from_config


@dataclass(frozen=True)
class StageSpec:
    """What one stage loads and how it attends.

    source: a Hugging Face model directory (a safetensors checkpoint: each stage reads only its
        own tensors), a .gguf file or None for the embedded default model (loaded whole on the
        host, then cut), or a dict of config fields (with "model_type") for random weights (timing
        runs: only the stage's own layers are built, so stages hold different random weights).
    layer_start, layer_stop: the stage's decoder layers [start, stop) of the whole model.
    attention: "proxy" or "dense"; config: ProxyAttnConfig fields (None: the defaults).
    """

    source: str | dict | None
    layer_start: int
    layer_stop: int
    attention: str = "proxy"
    config: dict | None = None
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = 1
    seed: int = 0
    model_id: str | None = None


def _random_stage_model(spec: StageSpec, attn_name: str, dtype: torch.dtype):
    """A randomly initialised model holding only layers [layer_start, layer_stop), built on the
    stage's device (a random 8B-shaped model is too big to build whole and then cut)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(spec.source)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    check_supported(config)
    total_layers = config.num_hidden_layers
    config.num_hidden_layers = spec.layer_stop - spec.layer_start
    torch.manual_seed(spec.seed + spec.layer_start)
    with torch.device(spec.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_name)
    model.config.num_hidden_layers = total_layers
    info = model_info_from_config(model.config, spec.model_id or "random", dtype)
    return model.eval(), info, spec.layer_start


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory (sharded or not); [] when there are none."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({directory / name for name in weight_map.values()})
    single = directory / "model.safetensors"
    return [single] if single.is_file() else []


def _partial_stage_model(spec: StageSpec, attn_name: str, dtype: torch.dtype):
    """Only this stage's share of a safetensors checkpoint: the model is built without storage
    for layers [layer_start, layer_stop) (renumbered from 0), then exactly those tensors, plus the
    embedding (first stage) or final norm and LM head (last stage), are read from the files. A
    stage of a model too big for one host's memory never holds the rest. None when the source
    is not a safetensors directory (GGUF, the embedded default): the caller loads it whole."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(spec.source) if spec.source is not None else None
    if directory is None or not directory.is_dir():
        return None
    files = _checkpoint_files(directory)
    if not files:
        return None
    config = AutoConfig.from_pretrained(str(directory))
    check_supported(config)
    total_layers = config.num_hidden_layers
    first, last = spec.layer_start == 0, spec.layer_stop == total_layers
    config.num_hidden_layers = spec.layer_stop - spec.layer_start
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_name)
    model.to_empty(device="cpu")
    base = model.get_decoder()
    base.rotary_emb = type(base.rotary_emb)(config=config)  # its buffers are computed, not stored
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted_prefixes = ["model.norm.", "lm_head."] if last else []
    if first or (last and tied):
        wanted_prefixes.append("model.embed_tokens.")
    state = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                match = _LAYER_KEY.match(name)
                if match:
                    layer = int(match.group(1))
                    if spec.layer_start <= layer < spec.layer_stop:
                        state[f"model.layers.{layer - spec.layer_start}.{match.group(2)}"] = f.get_tensor(
                            name
                        )
                elif any(name.startswith(prefix) for prefix in wanted_prefixes):
                    state[name] = f.get_tensor(name)
    missing, _ = model.load_state_dict(state, strict=False)
    if tied:
        model.tie_weights()
    needed = [
        name
        for name in missing
        if name.startswith("model.layers.")
        or (first and name.startswith("model.embed_tokens."))
        or (last and name.startswith("model.norm."))
        or (last and not tied and name.startswith("lm_head."))
    ]
    if needed:
        raise ValueError(
            f"checkpoint {directory} lacks tensors that stage [{spec.layer_start}, {spec.layer_stop}) "
            f"needs: {needed[:5]}"
        )
    model.config.num_hidden_layers = total_layers
    info = model_info_from_config(model.config, spec.model_id or directory.name, dtype)
    return model.eval(), info, spec.layer_start


def load_stage_model(spec: StageSpec, attn_name: str, dtype: torch.dtype):
    """(model, ModelInfo, index of the model's first built layer) for the stage's source."""
    if isinstance(spec.source, dict):
        return _random_stage_model(spec, attn_name, dtype)
    partial = _partial_stage_model(spec, attn_name, dtype)
    if partial is not None:
        return partial
    # GGUF or the embedded default: loaded whole on the host; the stage keeps its share
    model, _, info = load_model(spec.source, attn_name, torch.device("cpu"), dtype, spec.model_id)
    return model, info, 0
