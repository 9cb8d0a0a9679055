"""BENCHMARKS.md tables from a bench/kernel_speed.py result JSON:

python bench/kernel_speed.py --markdown bench/results/kernels-h200.json
"""

from __future__ import annotations


def markdown_tables(result: dict) -> str:
    """BENCHMARKS.md tables from a result JSON (python bench/kernel_speed.py --markdown FILE)."""
    rows = result["rows"]
    lines = [
        f"Device: {result['device']}; torch {result['torch']}, triton {result['triton']}, "
        f"commit {result['commit'][:10]}, {result['date_utc']}. Times are medians in ms.",
    ]
    lines += forced_mask_table(rows) + estimation_table(rows) + whole_table(rows) + crossover_table(rows)
    if result.get("kernel_resources"):
        lines += [
            "",
            "Kernel resources (last compiled launch): "
            + ", ".join(
                f"{name}: {res['registers']} registers, {res['spills']} spills, "
                f"{res['shared_bytes']} B shared"
                for name, res in result["kernel_resources"].items()
            ),
        ]
    return "\n".join(lines)


def forced_mask_table(rows: list[dict]) -> list[str]:
    dense = {r["n"]: r for r in rows if r["kind"] == "dense"}
    lines = [
        "",
        "Block-sparse attention on forced masks (random ranking; sink + diagonal forced). "
        "eff = density x T_cuDNN / T_ours (target >= 0.85).",
        "",
        "| N | cuDNN | FA2 | sparsity | density | ours | TFLOP/s kept | eff | Flex (same mask) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "forced":
            continue
        base = dense[r["n"]]
        fa2 = f"{base['fa2']['median_ms']:.2f}" if "fa2" in base else "-"
        flex = f"{r['flex']['median_ms']:.2f}" if "flex" in r else "-"
        lines.append(
            f"| {r['n'] // 1024}k | {base['cudnn']['median_ms']:.2f} | {fa2} | {r['target_sparsity']:.2f} | "
            f"{r['density']:.3f} | {r['ours']['median_ms']:.2f} | {r['ours_tflops_kept']:.0f} | "
            f"{r['efficiency_vs_cudnn']:.2f} | {flex} |"
        )
    return lines


def estimation_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "Estimation (proxy scores + budgets + index, proxy_groups 1, stride 4), against dense cuDNN "
        "(targets: <= 5% at 32k, <= 3% at 128k).",
        "",
        "| N | scores | budgets | index | total | % of cuDNN |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "estimation":
            index = f"{r['index']['median_ms']:.2f}" if "index" in r else "-"
            lines.append(
                f"| {r['n'] // 1024}k | {r['scores']['median_ms']:.2f} | {r['budgets']['median_ms']:.2f} | "
                f"{index} | {r['total']['median_ms']:.2f} | {100 * r['fraction_of_cudnn']:.2f}% |"
            )
    return lines


def whole_table(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "Whole proxy_attention (estimation + index + attention), speedup over dense SDPA.",
        "",
        "| N | inputs | budgets | causal sparsity | time | x cuDNN | x FA2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] == "proxy_attention":
            fa2 = f"{r['speedup_vs_fa2']:.1f}" if "speedup_vs_fa2" in r else "-"
            lines.append(
                f"| {r['n'] // 1024}k | {r['inputs']} | {r['config']} | {r['causal_sparsity']:.3f} | "
                f"{r['whole']['median_ms']:.2f} | {r['speedup_vs_cudnn']:.1f} | {fa2} |"
            )
    return lines


def crossover_table(rows: list[dict]) -> list[str]:
    cross = [r for r in rows if r["kind"] == "crossover"]
    if not cross:
        return []
    labels = list(cross[0]["sparse"])
    lines = [
        "",
        "Crossover (structured inputs): our dense path against the whole sparse path.",
        "",
        "| N | ours dense | cuDNN | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for r in cross:
        cells = [
            f"{r['sparse'][lab]['proxy_attention']['median_ms']:.2f} "
            f"(sparsity {r['sparse'][lab]['causal_sparsity']:.2f})"
            for lab in labels
        ]
        lines.append(
            f"| {r['n'] // 1024}k | {r['ours_dense']['median_ms']:.2f} | {r['cudnn']['median_ms']:.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines
