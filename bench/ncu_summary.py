"""Selected hardware counters from Nsight Compute raw CSV exports, side by side.

    ncu --clock-control none --launch-skip 1 --launch-count 1 --set full \\
        --kernel-name regex:_sparse_attention_fwd -o ours \\
        python bench/attention_variants.py --profile ours --lengths 32768 --sparsities 0.0
    ncu --import ours.ncu-rep --page raw --csv > ours-raw.csv
    python bench/ncu_summary.py label=ours-raw.csv label2=other-raw.csv.gz [--json out.json]

Prints a markdown table: duration, clock, tensor-pipe activity, instructions, occupancy,
DRAM bytes, L2 hit rate and the warp stall reasons (cycles per issued instruction).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from pathlib import Path

METRICS = {
    "duration (ms)": ("gpu__time_duration.sum", 1e-6),
    "SM frequency (GHz)": ("gpc__cycles_elapsed.avg.per_second", 1e-9),
    "tensor pipe active (% of SM active cycles)": (
        "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
        1,
    ),
    "instructions executed (G)": ("smsp__inst_executed.sum", 1e-9),
    "warps active per SM": ("sm__warps_active.avg.per_cycle_active", 1),
    "registers per thread": ("launch__registers_per_thread", 1),
    "DRAM bytes read (GB)": ("dram__bytes_read.sum", None),
    "L2 hit rate (%)": ("lts__t_sector_hit_rate.pct", 1),
}
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"
STALLS = [
    "barrier",
    "wait",
    "long_scoreboard",
    "short_scoreboard",
    "mio_throttle",
    "math_pipe_throttle",
    "dispatch_stall",
    "not_selected",
    "gmma",
    "selected",
]
UNIT_TO_GB = {"byte": 1e-9, "Kbyte": 1e-6, "Mbyte": 1e-3, "Gbyte": 1.0}


def read_raw(path: Path) -> tuple[dict, dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    header = next(i for i, row in enumerate(rows) if row and row[0] == "ID")
    names, units, values = rows[header], rows[header + 1], rows[header + 2]
    return dict(zip(names, values)), dict(zip(names, units))


def number(text: str) -> float:
    return float(text.replace(",", ""))


def summarise(path: Path) -> dict:
    values, units = read_raw(path)
    out = {}
    for label, (name, factor) in METRICS.items():
        if name not in values:
            continue
        if factor is None:  # bytes: scale by the unit ncu chose
            out[label] = number(values[name]) * UNIT_TO_GB[units[name]]
        else:
            scale = factor
            if name == "gpu__time_duration.sum":
                scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[units[name]]
            if name == "gpc__cycles_elapsed.avg.per_second":
                scale = {"Ghz": 1.0, "Mhz": 1e-3}.get(units[name], factor)
            out[label] = number(values[name]) * scale
    for stall in STALLS:
        name = STALL_PREFIX + stall + STALL_SUFFIX
        if name in values:
            out[f"stall: {stall} (cycles/issue)"] = number(values[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", help="label=path/to/raw.csv")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    table = {}
    for item in args.reports:
        label, path = item.split("=", 1)
        table[label] = summarise(Path(path))
    labels = list(table)
    rows = sorted({key for column in table.values() for key in column}, key=list(table[labels[0]]).index)
    print("| metric | " + " | ".join(labels) + " |")
    print("|---" * (len(labels) + 1) + "|")
    for key in rows:
        cells = [f"{table[label][key]:.3g}" if key in table[label] else "-" for label in labels]
        print(f"| {key} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
