"""Paired quality of ProxyAttn settings against dense on a real model, sized for the GPU.

Every variant runs the same workload as dense in the same process:

- single-needle retrieval (bench/ruler.py), `--samples` prompts per length, scored as served
  (the prompt prefilled with the variant, the answer decoded teacher-forced with dense attention
  over that KV; exact match = greedy decoding would emit the answer). Per length: successes,
  lost and gained against dense on the same prompts, the paired difference with its 95%
  Newcombe interval and the exact McNemar p-value (bench/paired.py);
- ΔNLL (variant - dense, nats/token) on two texts: licence prose and Python docstrings
  (bench/corpus.py), the first `--nll-length` tokens of each (or all the text has);
- causal sparsity (skipped causal blocks over causal blocks, all chunks, heads and layers) and
  attention-mass recall per layer (accuracy.AttentionProbe, on the first `--recall-samples`
  prompts per length);
- time per sample: wall seconds of the prompt's prefill (measurement hooks included) and the
  attention seconds (estimation + attention, CUDA events, hooks excluded);
- for sparse variants, where the needle's block was dropped and by which rule
  (bench/needle_trace.py);
- prefill speed: per length, the first prompt prefilled `--timing-repeats` times more without
  any measurement hook (wall seconds, synchronised), against dense's.

Variants are named settings on top of the library defaults (`ProxyAttnConfig()`), written
`name:field=value,...` (`proxy_groups=kv` means one proxy per KV head), e.g.
`default:` or `g-kv:proxy_groups=kv`. A variant whose settings start with `profile` runs the
settings of the calibrated profile given by `--profile` (per-layer gammas included, dense when
the profile keeps dense attention), with any further `field=value` changed on top, e.g.
`profile:profile` (what the engine serves with that profile) or
`profile-meanpool:profile,estimator=meanpool` (the coarse estimator on the same budgets).
`dense` is always run first. Results go to a JSON file (rewritten after every variant) and
tables on stdout (`--summarize FILE` prints them again); bench/plot_quality.py draws the PNGs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # accuracy, corpus, paired, ruler: siblings

import accuracy  # noqa: E402
import corpus  # noqa: E402
import needle_trace  # noqa: E402
import paired  # noqa: E402
import ruler  # noqa: E402

from proxyprefill.kernels import ProxyAttnConfig  # noqa: E402
from proxyprefill.workers import profiles  # noqa: E402

DEFAULT_VARIANTS = ("default:", "meanpool:estimator=meanpool", "g-kv:proxy_groups=kv")
PROFILE_SETTING = "profile"  # first setting of a variant: start from the --profile file's settings

# The quality bound of the GPU targets (bench/ACCURACY.md), per length against dense on the same
# prompts: successes lost at most this share of dense's successes, exact-match rate at most this
# far below dense's, and ΔNLL at most this much on every text.
MAX_LOST_SHARE = 0.02
MAX_EM_DROP = 0.02
MAX_DELTA_NLL = 0.02


# --------------------------------------------------------------------------------------------
# Variants and workload
# --------------------------------------------------------------------------------------------
def parse_variant(
    spec: str, num_kv_heads: int, base: ProxyAttnConfig, profile: profiles.Profile | None = None
) -> accuracy.Variant:
    """`name:field=value,...` -> a proxy Variant on `base`; `name:profile,field=value,...` -> the
    profile's settings with those changes; `dense` -> the dense variant."""
    if spec == "dense":
        return accuracy.Variant("dense", "dense", base, "")
    name, sep, settings = spec.partition(":")
    if not sep or not name:
        raise ValueError(f"variant {spec!r}: expected name:field=value,... (or 'dense')")
    items = [item for item in settings.split(",") if item]
    attention, layer_gammas, start = "proxy", (), base
    from_profile = bool(items) and items[0] == PROFILE_SETTING
    if from_profile:
        if profile is None:
            raise ValueError(f"variant {name!r}: {PROFILE_SETTING!r} needs --profile FILE")
        items = items[1:]
        attention, start = profile.settings.attention, profile.settings.config
        layer_gammas = profile.settings.layer_gammas
        if attention == "dense" and items:
            raise ValueError(
                f"variant {name!r}: the profile keeps dense attention, so {','.join(items)} has "
                "nothing to change; leave the variant out"
            )
    fields = {f.name: f for f in dataclasses.fields(ProxyAttnConfig)}
    changes: dict = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"variant {name!r}: unknown setting {item!r}; fields: {sorted(fields)}")
        if key == "proxy_groups" and text == "kv":
            changes[key] = num_kv_heads
            continue
        kind = type(getattr(start, key))
        try:
            changes[key] = kind(text)
        except ValueError:
            raise ValueError(f"variant {name!r}: {key}={text!r} is not a {kind.__name__}") from None
    if layer_gammas and "gamma" in changes:
        raise ValueError(f"variant {name!r}: the profile sets gamma per layer; gamma= would be ignored")
    try:
        config = start.replace(**changes)
    except ValueError as error:
        raise ValueError(f"variant {name!r}: {error}") from None
    factor = ",".join([PROFILE_SETTING] * from_profile + sorted(changes))
    return accuracy.Variant(name, attention, config, factor, tuple(layer_gammas))


@dataclass(frozen=True)
class NeedleSample:
    """One single-needle prompt, its answer, and where the needle's value sits (token span)."""

    length: int
    seed: int
    prompt_ids: list[int]
    answer_ids: list[int]
    needle_span: tuple[int, int]
    depth: float


def build_needles(encode, lengths: list[int], count: int) -> list[NeedleSample]:
    """`count` seeded single-needle prompts per length."""
    paragraphs, _ = corpus.haystack_paragraphs()
    samples = []
    for length in lengths:
        for seed in range(count):
            target = length
            while True:  # paragraphs encoded one by one undercount the joined prompt by a few tokens
                try:
                    sample = ruler.make_sample(
                        "single_needle", target, seed, paragraphs, lambda s: len(encode(s))
                    )
                except ValueError:
                    raise ValueError(
                        f"--lengths {length}: too short for this haystack (seed {seed})"
                    ) from None
                prompt_ids, answer_ids = encode(sample.prompt), encode(sample.answer)
                excess = len(prompt_ids) + len(answer_ids) - length
                if excess <= 0:
                    break
                target -= excess + 16
            span = needle_trace.needle_token_span(
                sample.prompt, sample.needles[0], sample.answer.strip(), encode
            )
            samples.append(NeedleSample(length, seed, prompt_ids, answer_ids, span, sample.depths[0]))
    return samples


def nll_workload(encode, nll_length: int) -> tuple[list[dict], list[dict]]:
    """The two NLL texts (long licence prose, docstrings), their first `nll_length` tokens."""
    items, sources = [], []
    for text in corpus.long_nll_texts():
        ids = encode(text.text)[:nll_length]
        items.append({"name": text.name, "ids": ids})
        sources.append({**text.describe(), "tokens_used": len(ids)})
    return items, sources


# --------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------
def chain(*observers):
    """One attention observer calling each of `observers` (None entries skipped)."""
    active = [o for o in observers if o is not None]

    def call(layer, q, k, v, stats, q_offset):
        for observer in active:
            observer(layer, q, k, v, stats, q_offset)

    return call


def run_variant(
    engine, variant, needles, nll_items, chunk_size: int, recall_samples: int, timing_repeats: int = 0
) -> dict:
    """Retrieval, trace, sparsity, recall, NLL and prefill time of one variant (per length where
    it applies)."""
    info = engine.model_info
    scale = 1.0 / math.sqrt(info.head_dim)
    bs = variant.config.block_size
    probes: dict[int, accuracy.AttentionProbe] = {}
    recall_probes: dict[int, accuracy.AttentionProbe] = {}
    samples = []
    for sample in needles:
        probe = probes.setdefault(
            sample.length, accuracy.AttentionProbe(info.num_layers, scale, bs, measure_recall=False)
        )
        recall_probe = None
        if sample.seed < recall_samples and variant.attention == "proxy":
            recall_probe = recall_probes.setdefault(
                sample.length, accuracy.AttentionProbe(info.num_layers, scale, bs)
            )
        trace = None
        if variant.attention == "proxy":
            middle = (sample.needle_span[0] + sample.needle_span[1]) // 2
            trace = needle_trace.NeedleTrace(
                variant.config,
                middle // bs,
                len(sample.prompt_ids) - 1,
                scale,
                layer_gammas=variant.layer_gammas,
            )
        predicted, result = accuracy.prefill_and_decode(
            engine,
            sample.prompt_ids,
            sample.answer_ids,
            variant,
            chunk_size,
            chain(probe, recall_probe, trace),
        )
        exact = predicted == sample.answer_ids
        entry = {
            "length": sample.length,
            "seed": sample.seed,
            "depth": sample.depth,
            "tokens": len(sample.prompt_ids),
            "exact": exact,
            "first_token": predicted[0] == sample.answer_ids[0],
            "seconds": result.total_seconds,
            "attention_seconds": result.estimate_seconds + result.attention_seconds,
        }
        if trace is not None:
            summary = trace.summary()
            if exact:  # the heads are kept only where the answer was lost (file size)
                summary.pop("dropped_heads")
            entry["needle"] = summary
        samples.append(entry)
        del result

    nll = {}
    for item in nll_items:
        nll_probe = accuracy.AttentionProbe(info.num_layers, scale, bs, measure_recall=False)
        entry, _ = accuracy.measure_nll(engine, variant, item["ids"], chunk_size, nll_probe)
        nll[item["name"]] = {**entry, "sparsity": nll_probe.sparsity()["overall"]}
    lengths = sorted(probes)
    return {
        "name": variant.name,
        "attention": variant.attention,
        "factor": variant.factor,
        "config": variant.config.to_dict(),
        "layer_gammas": list(variant.layer_gammas),
        "sparsity": {str(n): probes[n].sparsity() for n in lengths},
        "recall": {str(n): recall_probes[n].recall() for n in sorted(recall_probes)},
        "nll": nll,
        "prefill_seconds": time_prefills(engine, variant, needles, chunk_size, timing_repeats),
        "samples": samples,
    }


@torch.no_grad()
def time_prefills(engine, variant, needles, chunk_size: int, repeats: int) -> dict[str, list[float]]:
    """Per length: wall seconds of `repeats` prefills of its first prompt, without any observer
    (the retrieval runs before them compiled the kernels); empty when `repeats` is 0."""
    seconds: dict[str, list[float]] = {}
    for sample in needles if repeats else ():
        if str(sample.length) in seconds:
            continue
        runs = seconds[str(sample.length)] = []
        for _ in range(repeats):
            result = engine.prefill(
                sample.prompt_ids,
                chunk_size=chunk_size,
                config=variant.prefill_config,
                attention=variant.attention,
            )
            runs.append(result.total_seconds)
            del result
    return seconds


# --------------------------------------------------------------------------------------------
# Against dense
# --------------------------------------------------------------------------------------------
def compare_with_dense(variant: dict, dense: dict) -> dict:
    """Per length: paired retrieval, time per sample, needle-drop reasons; ΔNLL per text."""
    per_length = {}
    for length in sorted({s["length"] for s in variant["samples"]}):
        mine = [s for s in variant["samples"] if s["length"] == length]
        theirs = {s["seed"]: s for s in dense["samples"] if s["length"] == length}
        pairs = [(theirs[s["seed"]]["exact"], s["exact"]) for s in mine if s["seed"] in theirs]
        comparison = paired.compare_paired([d for d, _ in pairs], [v for _, v in pairs])
        attention_seconds = [s["attention_seconds"] for s in mine]
        entry = {
            "retrieval": comparison.to_dict(),
            "seconds_per_sample": sum(s["seconds"] for s in mine) / len(mine),
            "attention_seconds_per_sample": sum(attention_seconds) / len(mine),
            # the median leaves out the first prompts' kernel compilation
            "attention_seconds_median": statistics.median(attention_seconds),
        }
        timed = variant.get("prefill_seconds", {}).get(str(length))
        dense_timed = dense.get("prefill_seconds", {}).get(str(length))
        if timed and dense_timed:
            entry["prefill_seconds"] = {
                "median": statistics.median(timed),
                "min": min(timed),
                "max": max(timed),
            }
            entry["prefill_speedup"] = statistics.median(dense_timed) / statistics.median(timed)
        traced = [s["needle"] for s in mine if "needle" in s]
        if traced:
            entry["needle_drops"] = {
                "samples_with_a_drop": sum(t["dropped"] > 0 for t in traced),
                "reader_heads": sum(t["readers"] for t in traced),
                "dropped_heads": sum(t["dropped"] for t in traced),
                "reasons": {r: sum(t["reasons"][r] for t in traced) for r in needle_trace.REASONS},
                "dropped_by_layer": _sum_counts(t.get("dropped_by_layer", {}) for t in traced),
                "lost_samples_reasons": _lost_reasons(mine, theirs),
            }
        per_length[str(length)] = entry
    nll_delta = {
        name: entry["nll"] - dense["nll"][name]["nll"]
        for name, entry in variant["nll"].items()
        if name in dense["nll"]
    }
    return {"per_length": per_length, "nll_delta": nll_delta}


def _sum_counts(counts) -> dict:
    """Key-wise sum of count dicts, keys sorted numerically."""
    total: dict[str, int] = {}
    for c in counts:
        for key, value in c.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items(), key=lambda item: int(item[0])))


def _lost_reasons(mine: list[dict], dense_by_seed: dict) -> dict:
    """For the samples dense got and the variant lost: the dropped needle heads by reason and layer."""
    reasons: dict[str, int] = {}
    layers: dict[int, int] = {}
    for s in mine:
        if s["exact"] or not dense_by_seed.get(s["seed"], {}).get("exact"):
            continue
        for head in s.get("needle", {}).get("dropped_heads", []):
            reasons[head["reason"]] = reasons.get(head["reason"], 0) + 1
            layers[head["layer"]] = layers.get(head["layer"], 0) + 1
    return {"reasons": reasons, "layers": dict(sorted(layers.items()))}


def table(report: dict) -> str:
    """Markdown: one row per (variant, length)."""
    variants = report["variants"]
    texts = list(variants[0]["nll"]) if variants else []
    head = ["variant", "length", "sparsity", "EM", "lost", "gained", "Δ EM [95% CI]", "McNemar p"]
    head += [f"ΔNLL {t.split(':')[0]}" for t in texts] + [
        "recall mean / min layer",
        "s / sample",
        "attn s (median)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        for length, entry in v["against_dense"]["per_length"].items():
            r = entry["retrieval"]
            recall = v["recall"].get(length)
            row = [v["name"], length, f"{v['sparsity'][length]['overall']:.3f}"]
            row += [f"{r['variant_successes']}/{r['n']}", str(r["lost"]), str(r["gained"])]
            low, high = 100 * r["difference_low"], 100 * r["difference_high"]
            row.append(f"{100 * r['difference']:+.1f} [{low:+.1f}, {high:+.1f}]")
            row.append(f"{r['mcnemar_p']:.3f}")
            row += [f"{v['against_dense']['nll_delta'].get(t, 0.0):+.4f}" for t in texts]
            row.append(f"{recall['overall']:.4f} / {recall['min_layer']:.4f}" if recall else "—")
            row += [f"{entry['seconds_per_sample']:.3f}", f"{entry['attention_seconds_median']:.4f}"]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def meets_quality_bound(variant: dict, length: str) -> bool:
    """The targets' quality bound at one length (MAX_LOST_SHARE, MAX_EM_DROP, MAX_DELTA_NLL)."""
    r = variant["against_dense"]["per_length"][length]["retrieval"]
    deltas = variant["against_dense"]["nll_delta"].values()
    return (
        r["lost"] <= MAX_LOST_SHARE * r["reference_successes"]
        and r["difference"] >= -MAX_EM_DROP
        and all(d <= MAX_DELTA_NLL for d in deltas)
    )


def targets_table(report: dict) -> str:
    """Markdown: per (variant, length), the quality bound against dense and the prefill speed-up.

    ΔNLL is per text, measured once per variant (at --nll-length), so it repeats across lengths."""
    head = ["variant", "length", "sparsity", "lost / dense's successes", "Δ EM, points", "worst ΔNLL"]
    head += ["meets the bound", "prefill s, median [range]", "speed-up vs dense"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in report["variants"]:
        deltas = v["against_dense"]["nll_delta"].values()
        for length, entry in v["against_dense"]["per_length"].items():
            r = entry["retrieval"]
            timed = entry.get("prefill_seconds")
            row = [v["name"], length, f"{v['sparsity'][length]['overall']:.3f}"]
            if v is report["variants"][0]:
                row += ["—", "—", "—", "—"]
            else:
                row += [f"{r['lost']} / {r['reference_successes']}", f"{100 * r['difference']:+.1f}"]
                row += [f"{max(deltas):+.4f}" if deltas else "—"]
                row += ["yes" if meets_quality_bound(v, length) else "**no**"]
            row.append(f"{timed['median']:.3f} [{timed['min']:.3f}, {timed['max']:.3f}]" if timed else "—")
            row.append(f"{entry['prefill_speedup']:.2f}x" if timed else "—")
            lines.append("| " + " | ".join(row) + " |")
    bound = (
        f"bound: lost <= {MAX_LOST_SHARE:.0%} of dense's successes, EM >= dense - {100 * MAX_EM_DROP:g} "
        f"points, ΔNLL <= +{MAX_DELTA_NLL} on every text"
    )
    return "\n".join([bound, "", *lines])


def describe_profile(profile: profiles.Profile, path: Path) -> dict:
    """What the report keeps of the --profile file: its settings, choice and every candidate."""
    from proxyprefill.workers import calibration

    chosen = profile.chosen
    return {
        "path": str(path),
        "name": profile.name,
        "settings": dataclasses.asdict(profile.settings),
        "proxy_met_target": profile.proxy_met_target,
        "calibration": dataclasses.asdict(profile.calibration),
        "chosen": None if chosen is None else dataclasses.asdict(chosen),
        "candidates": [
            {"name": m.name, "sparsity": m.sparsity, "worst_delta_nll": m.worst_delta_nll}
            for m in profile.candidates
        ],
        "environment": dataclasses.asdict(profile.environment),
        "description": calibration.describe(profile),
    }


def print_tables(report: dict) -> None:
    """The profile's description (when one was given), the full table and the targets table."""
    if report.get("profile"):
        print(report["profile"]["description"] + "\n")
    if not report["variants"]:
        print("no variant finished")
        return
    print(table(report) + "\n")
    print(targets_table(report))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument(
        "--lengths", type=int, nargs="+", default=[4096, 8192], help="prompt tokens (default 4096 8192)"
    )
    p.add_argument("--samples", type=int, default=50, help="single-needle prompts per length (default 50)")
    p.add_argument("--nll-length", type=int, default=8192, help="tokens of each NLL text (default 8192)")
    p.add_argument("--chunk-size", type=int, default=8192, help="prefill chunk tokens (default 8192)")
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        help=f"name:field=value,... on the library defaults (default {' '.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument(
        "--base",
        default="",
        help="field=value,... applied to the library defaults under every variant, dense included "
        "(default none; e.g. dense_below_tokens=0 to force sparse attention)",
    )
    p.add_argument(
        "--recall-samples", type=int, default=10, help="prompts per length with recall (default 10)"
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="calibrated profile (proxyprefill calibrate --out) whose settings variants starting with "
        "'profile' run (default none)",
    )
    p.add_argument(
        "--timing-repeats",
        type=int,
        default=3,
        help="hook-free prefills of each length's first prompt, timed per variant (default 3; 0 = none)",
    )
    p.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    p.add_argument(
        "--out", type=Path, required=False, default=None, help="JSON path (required unless --summarize)"
    )
    p.add_argument(
        "--summarize",
        type=Path,
        default=None,
        help="print the tables of a results JSON and exit (default none)",
    )
    args = p.parse_args(argv)
    if args.timing_repeats < 0:
        p.error(f"--timing-repeats must be >= 0, got {args.timing_repeats}")
    return args


def main(argv=None, engine=None, encode=None) -> dict:
    """Run the paired bench; `engine` and `encode` may be passed in (tests use a tiny model)."""
    args = parse_args(argv)
    if args.summarize:  # comparisons recomputed from the samples, so older files get newer figures
        report = json.loads(args.summarize.read_text())
        for variant in report["variants"]:
            variant["against_dense"] = compare_with_dense(variant, report["variants"][0])
        print_tables(report)
        return report
    if args.out is None:
        raise SystemExit("--out is required")
    profile = None
    if args.profile is not None:
        try:
            profile = profiles.Profile.load(args.profile)
        except profiles.ProfileError as error:
            raise SystemExit(f"--profile: {error}") from None
    if engine is None:
        from proxyprefill.workers.engine import PrefillEngine

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        engine = PrefillEngine.from_pretrained(  # every variant passes its settings: no profile here
            args.model, attention="proxy", device=device, dtype=dtype, profile=profiles.NONE
        )
    if encode is None:
        tokenizer = engine.tokenizer
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    info = engine.model_info
    try:
        if profile is not None:
            profile.check_model(info)
        base = parse_variant(f"base:{args.base}", info.num_kv_heads, ProxyAttnConfig()).config
        variants = [
            parse_variant(spec, info.num_kv_heads, base, profile) for spec in ["dense", *args.variants]
        ]
    except profiles.ProfileError as error:
        raise SystemExit(f"--profile: {error}") from None
    except ValueError as error:
        raise SystemExit(f"--variants/--base: {error}") from None

    started = time.perf_counter()
    needles = build_needles(encode, args.lengths, args.samples)
    nll_items, sources = nll_workload(encode, args.nll_length)
    report = {
        "benchmark": "quality",
        "environment": accuracy.environment(),
        "model": info.to_dict() if hasattr(info, "to_dict") else str(info),
        "settings": {
            "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "lengths": args.lengths,
            "timing_repeats": args.timing_repeats,
            "samples_per_length": args.samples,
            "chunk_size": args.chunk_size,
            "base_config": base.to_dict(),
            "interval": "95% Newcombe hybrid score interval (method 10) on the paired difference",
            "scoring": "prefill the prompt with the variant, decode the answer teacher-forced with dense "
            "attention over that KV; exact match: argmax at every answer position equals the answer token",
            "workload_seconds": time.perf_counter() - started,
        },
        "sources": {"nll_texts": sources},
        "profile": None if profile is None else describe_profile(profile, args.profile),
        "variants": [],
        "complete": False,
    }
    print(
        f"{len(variants)} variants; {len(needles)} prompts; NLL tokens {[len(t['ids']) for t in nll_items]}"
    )
    dense = None
    for variant in variants:
        result = run_variant(
            engine, variant, needles, nll_items, args.chunk_size, args.recall_samples, args.timing_repeats
        )
        dense = dense or result
        result["against_dense"] = compare_with_dense(result, dense)
        report["variants"].append(result)
        accuracy.write_json(args.out, report)
        print(f"{variant.name:>16}: {json.dumps(_brief(result))}", flush=True)
    report["complete"] = True
    accuracy.write_json(args.out, report)
    print_tables(report)
    return report


def _brief(result: dict) -> dict:
    per_length = result["against_dense"]["per_length"]
    return {
        n: [
            round(result["sparsity"][n]["overall"], 3),
            e["retrieval"]["variant_successes"],
            e["retrieval"]["lost"],
        ]
        for n, e in per_length.items()
    }


if __name__ == "__main__":
    main()
