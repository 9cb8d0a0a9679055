"""Per-model calibration: the ProxyAttn settings with the most sparsity that keep quality.

    profile = calibrate(engine, calibration_texts(encode, 2048), CalibrationParameters())
    profile.save(default_profile_path(engine.model_info))     # the engine's default from now on

On texts the package reaches offline (workers/corpus.py `long_nll_texts`: licence prose, GPL-3
followed by other licences, ~22k tokens, and standard-library docstrings, ~40k), every
candidate prefills each text with sparse attention forced on (`dense_below_tokens=0`) and is
measured against dense attention on the same tokens: NLL per
token on each text (the target must hold on every text), attention-mass recall per layer, and
causal sparsity. The search, in a fixed order so a model and seed always give the same choice:

1. dense, the baseline;
2. for every (proxy groups, minimum budget) pair, gamma from the largest to the smallest, until a
   gamma misses the target (smaller ones only skip more);
3. per-layer gamma: from the runs of the best structure, every layer takes the smallest gamma
   whose recall in that layer reaches a floor (the best uniform setting's worst-layer recall, then
   its mean recall); each such assignment is measured like any candidate and kept only if it meets
   the target at a higher sparsity.

The chosen candidate is the sparsest one that meets the target and skips anything at all. When
none does, the profile keeps dense attention and says so (`proxy_met_target` false); every
candidate's figures are in the profile either way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from proxyprefill.kernels.config import ProxyAttnConfig

from . import corpus
from .attention_probe import AttentionProbe
from .profiles import (
    CalibrationEnvironment,
    CalibrationParameters,
    Measurement,
    Profile,
    ProfileSettings,
    TextDelta,
    TextSource,
    model_fingerprint,
    now_utc,
)


@dataclass(frozen=True)
class CalibrationText:
    """A text's token ids, with where the text came from."""

    source: TextSource
    ids: tuple[int, ...]


def calibration_texts(encode: Callable[[str], list[int]], tokens: int) -> list[CalibrationText]:
    """The first `tokens` tokens of each long corpus NLL text; ValueError naming a text that is
    shorter. The licence prose is GPL-3 extended by other licences, so a calibration can measure
    contexts past GPL-3's ~7k tokens, where serving runs sparse (dense_below_tokens is 8,192 by
    default); calibrations of fewer tokens see GPL-3 alone, as before."""
    texts = []
    for text in corpus.long_nll_texts():
        ids = tuple(encode(text.text)[:tokens])
        if len(ids) < tokens:
            raise ValueError(f"calibration text {text.name!r} has only {len(ids)} tokens; lower tokens")
        described = text.describe()
        texts.append(CalibrationText(TextSource(text.name, text.source, described["sha256"], len(ids)), ids))
    return texts


def default_proxy_groups(num_kv_heads: int) -> tuple[int, ...]:
    """One shared proxy head, and one per KV head (clearly better on small GQA models)."""
    return tuple(sorted({1, num_kv_heads}))


# --------------------------------------------------------------------------------------------
# Measuring one candidate
# --------------------------------------------------------------------------------------------
class _Runner:
    """Measures candidates on the texts and reports each one through `progress`."""

    def __init__(self, engine, texts, params: CalibrationParameters, progress, most_runs: int):
        self.engine = engine
        self.texts = texts
        self.params = params
        self.progress = progress
        self.most_runs = most_runs
        self.runs = 0
        self.dense_nll: tuple[float, ...] | None = None

    @torch.no_grad()
    def measure(self, name: str, attention: str, config: ProxyAttnConfig, layer_gammas=()) -> Measurement:
        info = self.engine.model_info
        probe = AttentionProbe(
            info.num_layers, 1.0 / math.sqrt(info.head_dim), config.block_size, seed=self.params.seed
        )
        configs = [config.replace(gamma=g) for g in layer_gammas] if layer_gammas else config
        started = time.perf_counter()
        deltas = []
        for i, text in enumerate(self.texts):
            result = self.engine.prefill(
                list(text.ids),
                chunk_size=self.params.chunk_size,
                logits=range(len(text.ids) - 1),
                config=configs,
                attention=attention,
                attention_observer=probe,
            )
            targets = torch.tensor(text.ids[1:], device=result.logits.device)
            nll = float(torch.nn.functional.cross_entropy(result.logits, targets).double())
            delta = 0.0 if self.dense_nll is None else nll - self.dense_nll[i]
            deltas.append(TextDelta(text.source.name, len(text.ids), nll, delta))
            del result
        sparsity, recall = probe.sparsity(), probe.recall()
        measured = Measurement(
            name=name,
            attention=attention,
            config=config,
            layer_gammas=tuple(layer_gammas),
            texts=tuple(deltas),
            sparsity=sparsity["overall"],
            layer_sparsity=tuple(sparsity["per_layer"]),
            recall=recall["overall"],
            layer_recall=tuple(recall["per_layer"]),
        )
        self.runs += 1
        figures = " ".join(f"{t.delta_nll:+.4f}" for t in measured.texts)
        verdict = "meets" if measured.meets(self.params.target_delta_nll) else "misses"
        self.progress(
            f"[{self.runs}/<={self.most_runs}] {name}: ΔNLL {figures}, sparsity {measured.sparsity:.3f}, "
            f"recall {measured.recall:.4f} (worst layer {min(measured.layer_recall):.4f}), "
            f"{verdict} the target ({time.perf_counter() - started:.1f} s)"
        )
        return measured


# --------------------------------------------------------------------------------------------
# The search
# --------------------------------------------------------------------------------------------
def sparsest_meeting(candidates: list[Measurement], target_delta_nll: float) -> Measurement | None:
    """The candidate with the highest sparsity among those that meet the target and skip any
    block at all (the first one on ties); None when there is none."""
    passing = [m for m in candidates if m.sparsity > 0 and m.meets(target_delta_nll)]
    return max(passing, key=lambda m: m.sparsity) if passing else None


def per_layer_gammas(sweep: list[Measurement], best: Measurement) -> list[tuple[float, ...]]:
    """Per-layer gamma assignments worth measuring, from the uniform-gamma runs of one structure.

    For each recall floor (best's worst-layer recall, then its mean recall), every layer takes the
    smallest gamma of the sweep whose recall in that layer reaches the floor (the largest gamma
    when none does). Assignments that are uniform or repeat an earlier one are left out.
    """
    largest = max(m.config.gamma for m in sweep)
    assignments: list[tuple[float, ...]] = []
    for floor in (min(best.layer_recall), best.recall):
        gammas = []
        for layer in range(len(best.layer_recall)):
            reaching = [m.config.gamma for m in sweep if m.layer_recall[layer] >= floor]
            gammas.append(min(reaching) if reaching else largest)
        assignment = tuple(gammas)
        if len(set(assignment)) > 1 and assignment not in assignments:
            assignments.append(assignment)
    return assignments


def calibrate(
    engine,
    texts: list[CalibrationText],
    params: CalibrationParameters,
    progress: Callable[[str], None] = lambda line: None,
) -> Profile:
    """Run the search (module docstring) on `engine`'s model; returns the profile (not saved).

    The engine's own profile, if any, plays no part: every run passes its settings explicitly."""
    info = engine.model_info
    groups = params.proxy_groups or default_proxy_groups(info.num_kv_heads)
    for g in groups:
        if info.num_kv_heads % g:
            raise ValueError(f"proxy_groups {g} does not divide the model's {info.num_kv_heads} KV heads")
    gammas = sorted(set(params.gammas), reverse=True)
    structures = [(g, budget) for g in groups for budget in params.min_budget_tokens]
    most_runs = 1 + len(structures) * len(gammas) + (2 if params.per_layer_gamma else 0)
    runner = _Runner(engine, texts, params, progress, most_runs)
    base = ProxyAttnConfig(block_size=params.block_size, dense_below_tokens=0)

    dense = runner.measure("dense", "dense", base)
    runner.dense_nll = tuple(t.nll for t in dense.texts)
    candidates: list[Measurement] = []
    sweeps: list[list[Measurement]] = []
    for g, budget in structures:
        structure = base.replace(proxy_groups=g, min_budget_tokens=budget)
        sweep = []
        for gamma in gammas:
            name = f"groups={g} min_budget={budget} gamma={gamma}"
            sweep.append(runner.measure(name, "proxy", structure.replace(gamma=gamma)))
            if not sweep[-1].meets(params.target_delta_nll):
                break
        sweeps.append(sweep)
        candidates += sweep

    best = sparsest_meeting(candidates, params.target_delta_nll)
    if best is not None and params.per_layer_gamma:
        sweep = next(s for s in sweeps if best in s)
        for assignment in per_layer_gammas(sweep, best):
            config = best.config.replace(gamma=max(assignment))
            name = f"groups={config.proxy_groups} min_budget={config.min_budget_tokens} per-layer gamma"
            candidates.append(runner.measure(name, "proxy", config, assignment))
        best = sparsest_meeting(candidates, params.target_delta_nll)

    if best is None:
        progress(
            f"no ProxyAttn setting met ΔNLL <= {params.target_delta_nll} on every text with any sparsity; "
            "the profile keeps dense attention"
        )
        defaults = ProxyAttnConfig(block_size=params.block_size, dense_below_tokens=params.dense_below_tokens)
        settings = ProfileSettings("dense", defaults)
    else:
        settings = ProfileSettings(
            "proxy", best.config.replace(dense_below_tokens=params.dense_below_tokens), best.layer_gammas
        )
    return Profile(
        model_id=info.model_id,
        model_fingerprint=model_fingerprint(info),
        settings=settings,
        proxy_met_target=best is not None,
        dense=dense,
        chosen=best,
        candidates=tuple(candidates),
        calibration=params,
        texts=tuple(t.source for t in texts),
        environment=_environment(engine),
        created_utc=now_utc(),
    )


def _environment(engine) -> CalibrationEnvironment:
    import transformers

    from proxyprefill import __version__

    device = str(engine.device)
    if engine.device.type == "cuda":
        device = torch.cuda.get_device_name(engine.device)
    return CalibrationEnvironment(
        device=device,
        dtype=str(engine.dtype).removeprefix("torch."),
        torch=torch.__version__,
        transformers=transformers.__version__,
        proxyprefill=__version__,
    )


def describe(profile: Profile) -> str:
    """A few lines for people: what was chosen, at what measured cost, or why dense was kept."""
    target = profile.calibration.target_delta_nll
    lines = [f"profile {profile.name} for {profile.model_id}"]
    chosen = profile.chosen
    if chosen is None:
        lines.append(f"settings: dense attention (no ProxyAttn setting met ΔNLL <= {target} on every text)")
        tried = [m for m in profile.candidates if m.sparsity > 0]
        if tried:
            closest = min(tried, key=lambda m: m.worst_delta_nll)
            lines.append(
                f"closest: {closest.name}, worst ΔNLL {closest.worst_delta_nll:+.4f} "
                f"at sparsity {closest.sparsity:.3f}"
            )
        return "\n".join(lines)
    config = profile.settings.config
    gammas = (
        "gamma per layer " + " ".join(f"{g:g}" for g in profile.settings.layer_gammas)
        if profile.settings.layer_gammas
        else f"gamma {config.gamma:g}"
    )
    lines.append(
        f"settings: proxy_groups {config.proxy_groups}, {gammas}, min_budget_tokens "
        f"{config.min_budget_tokens}, block_size {config.block_size}, "
        f"dense_below_tokens {config.dense_below_tokens}"
    )
    deltas = ", ".join(f"{t.text} {t.delta_nll:+.4f}" for t in chosen.texts)
    lines.append(
        f"measured: sparsity {chosen.sparsity:.3f}, recall {chosen.recall:.4f}, ΔNLL {deltas} "
        f"(target <= {target}, {profile.calibration.tokens} tokens per text)"
    )
    return "\n".join(lines)
