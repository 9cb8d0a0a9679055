"""Draw retrieval and ΔNLL against causal sparsity from bench/quality.py result files.

One PNG per result file (a model): the top row has one panel per prompt length with each
variant's single-needle exact-match rate (95% Wilson interval) against its sparsity at that
length, dense as a dashed line; the bottom row has ΔNLL (variant - dense, nats/token) per NLL
text against the sparsity of that text's own prefill and, where the file has hook-free prefill
times, each variant's prefill speed-up over dense per length (median, bars the range of the
timed runs). Needs matplotlib (`pip install matplotlib`).

    python bench/plot_quality.py bench/results/quality-*.json      # writes <file>.png beside each
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # paired: a sibling

import paired  # noqa: E402


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    dense = variants[0]
    lengths = list(dense["against_dense"]["per_length"])
    texts = list(dense["nll"])
    timed = any("prefill_seconds" in e for v in variants for e in v["against_dense"]["per_length"].values())
    columns = max(len(lengths), len(texts) + timed, 2)
    fig, axes = plt.subplots(2, columns, figsize=(4.2 * columns, 7.5), squeeze=False)
    markers = "osD^v<>phX*"
    for col, length in enumerate(lengths):
        ax = axes[0][col]
        for i, v in enumerate(variants):
            r = v["against_dense"]["per_length"][length]["retrieval"]
            rate = r["variant_successes"] / r["n"]
            low, high = paired.wilson_interval(r["variant_successes"], r["n"])
            x = v["sparsity"][length]["overall"]
            if v["attention"] == "dense":
                ax.axhline(
                    rate, color="grey", linestyle="--", label=f"dense {r['variant_successes']}/{r['n']}"
                )
                continue
            ax.errorbar(
                x,
                rate,
                yerr=[[rate - low], [high - rate]],
                fmt=markers[i % len(markers)],
                capsize=3,
                label=f"{v['name']} {r['variant_successes']}/{r['n']} (-{r['lost']} +{r['gained']})",
            )
        ax.set_title(f"single needle, {int(length) // 1024}k tokens")
        ax.set_xlabel("causal sparsity")
        ax.set_ylabel("exact match")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7, loc="lower left")
    for col, text in enumerate(texts):
        ax = axes[1][col]
        for i, v in enumerate(variants[1:], start=1):
            entry = v["nll"][text]
            ax.plot(
                entry["sparsity"],
                v["against_dense"]["nll_delta"][text],
                markers[i % len(markers)],
                label=v["name"],
            )
        ax.axhline(0.02, color="red", linestyle=":", label="+0.02 target")
        ax.axhline(0.0, color="grey", linestyle="--")
        ax.set_title(f"ΔNLL, {text.split(':')[0]} ({dense['nll'][text]['tokens']} tokens)")
        ax.set_xlabel("causal sparsity of this text's prefill")
        ax.set_ylabel("ΔNLL vs dense (nats/token)")
        ax.legend(fontsize=7)
    if timed:
        _plot_speedup(axes[1][len(texts)], variants, lengths, markers)
    for col in range(len(lengths), columns):
        axes[0][col].axis("off")
    for col in range(len(texts) + timed, columns):
        axes[1][col].axis("off")
    model = report["model"].get("model_id", "model") if isinstance(report["model"], dict) else report["model"]
    title = f"{model}: ProxyAttn variants against dense, paired ({report['environment']['device']})"
    if report.get("profile"):  # the variants starting with 'profile' ran this calibrated profile
        title += f"\nprofile {report['profile']['name']}"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_speedup(ax, variants: list[dict], lengths: list[str], markers: str) -> None:
    """Prefill speed-up over dense per length: dense's median time over the variant's, the bars
    spanning dense's slowest over the variant's fastest run and the other way round."""
    dense_runs = variants[0]["prefill_seconds"]
    for i, v in enumerate(variants[1:], start=1):
        xs, ys, lows, highs = [], [], [], []
        for length in lengths:
            entry = v["against_dense"]["per_length"][length]
            if "prefill_seconds" not in entry:
                continue
            speedup, timed = entry["prefill_speedup"], entry["prefill_seconds"]
            xs.append(int(length) // 1024)
            ys.append(speedup)
            lows.append(speedup - min(dense_runs[length]) / timed["max"])
            highs.append(max(dense_runs[length]) / timed["min"] - speedup)
        if xs:
            ax.errorbar(
                xs, ys, yerr=[lows, highs], fmt=markers[i % len(markers)] + "-", capsize=3, label=v["name"]
            )
    ax.axhline(1.0, color="grey", linestyle="--", label="dense")
    ax.set_title("prefill speed-up over dense (hook-free runs)")
    ax.set_xlabel("prompt length (k tokens)")
    ax.set_ylabel("dense time / variant time")
    ax.legend(fontsize=7)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, nargs="+", help="bench/quality.py JSON files")
    args = p.parse_args(argv)
    for path in args.results:
        out = path.with_suffix(".png")
        plot(json.loads(path.read_text()), out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
