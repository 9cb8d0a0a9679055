"""Prefill speed of the engine on one GPU: where the time goes (estimation / sparse attention /
the rest of the model), the first request after start against steady state, a million tokens,
and the 8B shape against the dense engine. Random bf16 weights, ProxyAttn at a fixed causal
density (the estimation still runs in full).

Suites (one process each, so that "first request" means the first in a fresh process):

  1b     Llama-3.2-1B shape (16 layers, 32/8 heads, d=64): 128k tokens three times (the first
         reported apart), 1M tokens twice, then the estimation steps alone (scores, budgets,
         index) and the sparse attention of one layer's chunk at three offsets, CUDA-event
         medians.
  8b     Llama-3.1-8B shape (32 layers, 32/8 heads, d=128): 128k tokens three times with
         ProxyAttn (the first apart), and with --dense the dense engine twice.

The package under test is whatever `proxyprefill` imports (bench/speed_gpu.sh points it at one
tree or another); only interfaces that older trees share are used, and `--warm-up` calls the
engine's warm-up where the tree has one.

    python bench/speed.py --suite 1b --warm-up --out /tmp/speed-1b.json
    python bench/speed.py --suite tiny --warm-up --out /tmp/speed-tiny.json    # CPU smoke run
    python bench/speed.py --table /tmp/speed-*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill import LLAMA_8B, TINY, build_model, git_commit, run_engine, versions  # noqa: E402
from sharded import LLAMA_1B  # noqa: E402

import proxyprefill.kernels as kernels_package  # noqa: E402
from proxyprefill.kernels.config import ProxyAttnConfig  # noqa: E402
from proxyprefill.workers.engine import PrefillEngine  # noqa: E402

CHUNK = 32768
DENSITY = 0.05
SUITES = {
    # shape, tokens and runs per length, estimation-step offsets, block size, chunk
    "1b": dict(shape=LLAMA_1B, lengths=[(131072, 3), (1 << 20, 2)], steps=[98304, 491520, 1015808]),
    "8b": dict(shape=LLAMA_8B, lengths=[(131072, 3)], steps=[]),
    "tiny": dict(shape=TINY, lengths=[(1024, 3)], steps=[512], block=64, chunk=256),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int) -> float:
    """Median time of fn() in ms (CUDA events on the GPU), after two untimed calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def estimation_steps(info, config, q_offset: int, chunk: int, device, dtype, backend: str) -> dict:
    """One layer's chunk at q_offset: the estimation steps and the sparse attention, each alone."""
    from proxyprefill.kernels.registry import select_backend
    from proxyprefill.workers.attention import fixed_density_budgets

    gen = torch.Generator(device=device).manual_seed(q_offset)
    nk = q_offset + chunk
    q = torch.randn(1, info.num_heads, chunk, info.head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(1, info.num_kv_heads, nk, info.head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn_like(k)
    impl = select_backend(backend, q)
    scores = impl.estimate_block_scores(q, k, config, q_offset, None)
    fixed = fixed_density_budgets(info.num_heads, chunk, q_offset, DENSITY, config, device)
    index = impl.build_block_mask(scores, fixed, config, q_offset)
    repeats = 5
    row = {
        "q_offset": q_offset,
        "chunk": chunk,
        "keys": nk,
        "scores_ms": median_ms(
            lambda: impl.estimate_block_scores(q, k, config, q_offset, None), device, repeats
        ),
        "budgets_ms": median_ms(lambda: impl.head_budgets(q, k, config, q_offset, None), device, repeats),
        "index_ms": median_ms(
            lambda: impl.build_block_mask(scores, fixed, config, q_offset), device, repeats
        ),
        "attention_ms": median_ms(
            lambda: impl.block_sparse_attention(q, k, v, index, q_offset, None), device, repeats
        ),
        "density": float(index.density()),
    }
    row["estimation_ms"] = row["scores_ms"] + row["budgets_ms"] + row["index_ms"]
    row["estimation_over_attention"] = row["estimation_ms"] / row["attention_ms"]
    return row


def engine_row(engine, ids, chunk, mode, config, run: int) -> dict:
    row = run_engine(engine, ids, chunk, mode, DENSITY if mode == "proxy" else None, config)
    row.update(tokens=int(ids.numel()), chunk_size=chunk, mode=mode, run=run)
    row["rest_seconds"] = row["seconds"] - row["estimate_seconds"] - row["attention_seconds"]
    return row


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=sorted(SUITES), help="what to measure (see above; default: none)")
    parser.add_argument(
        "--label", default="tree", help="name of the tree under test in the table (default: tree)"
    )
    parser.add_argument("--tree", default="", help="path of the tree under test, recorded (default: none)")
    parser.add_argument(
        "--warm-up", action="store_true", help="call engine.warm_up first where it exists (default: off)"
    )
    parser.add_argument("--dense", action="store_true", help="8b: also time the dense engine (default: off)")
    parser.add_argument(
        "--budget-s", type=float, default=1e9, help="skip what starts after this many seconds (default: none)"
    )
    parser.add_argument("--out", help="JSON file written after every measurement (default: none)")
    parser.add_argument(
        "--table", nargs="+", metavar="JSON", help="print the table of these results and exit (default: none)"
    )
    args = parser.parse_args(argv)
    if not args.table and not args.suite:
        parser.error("--suite or --table is required")
    return args


class SpeedRun:
    """One suite's measurements: the report, written after each, and the run's time budget."""

    def __init__(self, args, report: dict):
        self.args = args
        self.report = report
        self.started = time.perf_counter()

    def save(self) -> None:
        self.report["wall_seconds"] = time.perf_counter() - self.started
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.report, indent=1))

    def within_budget(self, what: str) -> bool:
        if time.perf_counter() - self.started < self.args.budget_s:
            return True
        self.report["skipped"].append(what)
        print(f"skipped (time budget): {what}", flush=True)
        self.save()
        return False

    def add_row(self, row: dict, key: str = "rows") -> None:
        self.report[key].append(row)
        self.save()

    def proxy_rows(self, engine, suite, chunk, config, generator) -> None:
        label = self.args.label
        for tokens, runs in suite["lengths"]:
            ids = torch.randint(0, suite["shape"]["vocab_size"], (tokens,), generator=generator)
            for run in range(runs):
                if not self.within_budget(f"proxy {tokens} run {run}"):
                    break
                row = engine_row(engine, ids, chunk, "proxy", config, run)
                self.add_row(row)
                print(
                    f"{label} {tokens:>8} proxy run {run}: {row['seconds']:.2f}s (estimation "
                    f"{row['estimate_seconds']:.2f}, attention {row['attention_seconds']:.2f}, rest "
                    f"{row['rest_seconds']:.2f}) sparsity {row['mean_causal_sparsity']:.3f}",
                    flush=True,
                )

    def dense_rows(self, engine, suite, chunk, config, generator) -> None:
        tokens = suite["lengths"][0][0]
        ids = torch.randint(0, suite["shape"]["vocab_size"], (tokens,), generator=generator)
        run_engine(engine, ids[: 2 * chunk], chunk, "dense", None, config)  # cuDNN plans
        for run in range(2):
            if not self.within_budget(f"dense {tokens} run {run}"):
                break
            row = engine_row(engine, ids, chunk, "dense", config, run)
            self.add_row(row)
            print(f"{self.args.label} {tokens:>8} dense run {run}: {row['seconds']:.2f}s", flush=True)

    def step_rows(self, suite, chunk, config, device, dtype, backend) -> None:
        from transformers import LlamaConfig

        from proxyprefill.workers.model import model_info_from_config

        info = model_info_from_config(LlamaConfig(**suite["shape"]), self.args.suite, dtype)
        for q_offset in suite["steps"]:
            if not self.within_budget(f"steps at {q_offset}"):
                break
            row = estimation_steps(info, config, q_offset, min(chunk, q_offset), device, dtype, backend)
            self.add_row(row, "steps")
            print(
                f"{self.args.label} steps at {q_offset}: scores {row['scores_ms']:.2f} "
                f"budgets {row['budgets_ms']:.2f} index {row['index_ms']:.2f} "
                f"attention {row['attention_ms']:.2f} ms",
                flush=True,
            )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.table:
        print(table([json.loads(Path(p).read_text()) for p in args.table]))
        return {}
    suite = SUITES[args.suite]
    device = torch.device("cuda" if torch.cuda.is_available() and args.suite != "tiny" else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    chunk = suite.get("chunk", CHUNK)
    config = ProxyAttnConfig(block_size=suite.get("block", 128), min_budget_tokens=0)
    if device.type == "cpu":
        config = config.replace(dense_below_tokens=0)
    backend = "auto" if device.type == "cuda" else "torch"
    run = SpeedRun(
        args,
        {
            "benchmark": "speed",
            "suite": args.suite,
            "label": args.label,
            "tree": args.tree,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "versions": versions(),
            "git_commit": git_commit(),
            "package": str(Path(kernels_package.__file__).resolve().parent),
            "shape": suite["shape"],
            "chunk_size": chunk,
            "fixed_density": DENSITY,
            "proxy_config": config.to_dict(),
            "rows": [],
            "steps": [],
            "skipped": [],
        },
    )
    torch.manual_seed(0)  # the same random weights in every tree's run
    model = build_model(suite["shape"], device, dtype)
    engine = PrefillEngine.from_model(model, model_id=f"random-{args.suite}", config=config, backend=backend)
    sync(device)
    run.report["build_seconds"] = time.perf_counter() - run.started
    longest = max(n for n, _ in suite["lengths"])
    if args.warm_up and hasattr(engine, "warm_up"):
        warm = engine.warm_up(chunk, longest, progress=lambda message: print(message, flush=True))
        run.report["warm_up"] = {"seconds": warm.seconds, "key_lengths": list(warm.key_lengths)}
    run.save()
    generator = torch.Generator().manual_seed(0)
    run.proxy_rows(engine, suite, chunk, config, generator)
    if args.dense:
        run.dense_rows(engine, suite, chunk, config, generator)
    del engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run.step_rows(suite, chunk, config, device, dtype, backend)
    run.save()
    return run.report


def table(reports: list[dict]) -> str:
    """The engine rows, the 8B ratio against the dense engine, and the step times, as text."""
    lines = ["engine prefill (s): total = estimation + attention + rest"]
    lines.append(f"{'tree':<10} {'suite':<5} {'tokens':>8} {'mode':<6} {'run':>3} {'total':>7} {'est':>6} "
                 f"{'attn':>6} {'rest':>6} {'est/attn':>8} {'sparsity':>8}")  # fmt: skip
    for report in reports:
        for row in report["rows"]:
            ratio = row["estimate_seconds"] / row["attention_seconds"] if row["mode"] == "proxy" else 0
            lines.append(
                f"{report['label']:<10} {report['suite']:<5} {row['tokens']:>8} {row['mode']:<6} "
                f"{row['run']:>3} {row['seconds']:>7.2f} {row['estimate_seconds']:>6.2f} "
                f"{row['attention_seconds']:>6.2f} "
                f"{row['rest_seconds']:>6.2f} {ratio:>8.2f} {row['mean_causal_sparsity']:>8.3f}"
            )
        if "warm_up" in report:
            lines.append(
                f"{report['label']:<10} {report['suite']:<5} warm-up {report['warm_up']['seconds']:.1f}s"
            )
        if report["skipped"]:
            lines.append(
                f"{report['label']:<10} {report['suite']:<5} skipped: {', '.join(report['skipped'])}"
            )
    dense = [r for rep in reports for r in rep["rows"] if r["mode"] == "dense"]
    for report in reports:
        proxy = [r for r in report["rows"] if r["mode"] == "proxy" and r["run"] > 0 and r["tokens"] == 131072]
        if report["suite"] == "8b" and proxy and dense:
            steady = statistics.median(r["seconds"] for r in proxy)
            lines.append(
                f"{report['label']:<10} 8b 128k: proxy steady {steady:.2f}s, dense "
                f"{statistics.median(r['seconds'] for r in dense):.2f}s, "
                f"x{statistics.median(r['seconds'] for r in dense) / steady:.2f}"
            )
    lines.append("one layer's chunk, alone (ms): scores + budgets + index = estimation; sparse attention")
    for report in reports:
        for row in report["steps"]:
            lines.append(
                f"{report['label']:<10} q_offset {row['q_offset']:>8}: scores {row['scores_ms']:7.2f} "
                f"budgets {row['budgets_ms']:7.2f} index {row['index_ms']:6.2f} "
                f"est {row['estimation_ms']:7.2f} "
                f"attention {row['attention_ms']:7.2f} est/attn {row['estimation_over_attention']:.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
