"""Prefill benchmark: time to first token and peak memory of a long prompt.

A Llama-3.1-8B-shaped model (32 layers, hidden 4096, 32/8 heads, d=128, MLP 14336, vocab 128256,
RoPE theta 500000) with random bf16 weights, built directly on the GPU. Random weights give near
uniform attention, so ProxyAttn runs at fixed causal densities (`fixed_density`: every row keeps
ceil(density x causal blocks), plus sink and diagonal); the estimation still runs in full, so its
cost is real. Compared in the same run:

  (a) stock   transformers forward over the whole prompt, SDPA attention, logits_to_keep=1
  (b) dense   our engine, chunked, dense attention (cuDNN through SDPA's private LSE ops)
  (c) proxy   our engine, chunked, ProxyAttn at 90% and 95% target causal sparsity

Time to first token = prompt in, last-position logits out (synchronised). Peak memory is
torch.cuda.max_memory_allocated over the call, weights included.

    python bench/prefill.py --commit $(git rev-parse HEAD)                 # GPU, writes bench/results/
    python bench/prefill.py --tiny --out /tmp/prefill-tiny.json            # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance: a sibling
import provenance  # noqa: E402

from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.workers import attention as attention_mod
from proxyprefill.workers.engine import PrefillEngine

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_theta=500000.0,
)
TINY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=500000.0,
)


def git_commit() -> str | None:
    return provenance.git_commit()


def versions() -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight Llama built directly in `dtype` on `device` (never a float32 copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def check_dense_attention(device: torch.device, dtype: torch.dtype) -> dict:
    """Our offset-causal dense path against a float64 oracle on fresh random data."""
    torch.manual_seed(123)
    hq, hkv, d, nq, offset = 32, 8, 128, 1024, 3072
    q = torch.randn(1, hq, nq, d, device=device, dtype=dtype)
    k = torch.randn(1, hkv, offset + nq, d, device=device, dtype=dtype)
    v = torch.randn(1, hkv, offset + nq, d, device=device, dtype=dtype)
    out = attention_mod.dense_causal_attention(q, k, v, offset)
    kf = k.double().repeat_interleave(hq // hkv, dim=1)
    vf = v.double().repeat_interleave(hq // hkv, dim=1)
    logits = q.double() @ kf.transpose(-1, -2) / math.sqrt(d)
    visible = (
        torch.arange(offset + nq, device=device)[None, :]
        <= (offset + torch.arange(nq, device=device))[:, None]
    )
    ref = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ vf
    rel = float((out.double() - ref).norm() / ref.norm())
    return {"relative_error": rel, "kernel": attention_mod.dense_path_used.get("kernel", "sdpa")}


def run_stock(model, ids: torch.Tensor, device: torch.device) -> dict:
    """(a) The stock model over the whole prompt with SDPA attention."""
    model.set_attn_implementation("sdpa")
    try:
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model(ids[None].to(device), use_cache=True, logits_to_keep=1)
            _ = out.logits[0, -1].float().argmax().item()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        del out
    finally:
        model.set_attn_implementation(attention_mod.ATTENTION_NAME)
    return {"seconds": seconds, "peak_memory_bytes": peak}


def run_engine(engine, ids, chunk, mode, density, config) -> dict:
    device = engine.device
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    result = engine.prefill(
        ids, chunk_size=chunk, attention=mode, config=config, fixed_density=density, logits="last"
    )
    _ = int(result.logits[-1].argmax())
    row = {
        "seconds": result.total_seconds,
        "estimate_seconds": result.estimate_seconds,
        "attention_seconds": result.attention_seconds,
        # the model's layers outside attention, the LM head, and the engine's own work
        "rest_seconds": result.total_seconds - result.estimate_seconds - result.attention_seconds,
        "peak_memory_bytes": None if result.peak_memory_bytes is None else base + result.peak_memory_bytes,
        "kv_bytes": result.kv_bytes,
        "mean_causal_sparsity": float(result.sparsity.mean()),
    }
    del result
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure(fn, repeats: int) -> dict:
    """Run `fn` `repeats` times; medians of the timings, max of the peaks."""
    rows = [fn() for _ in range(repeats)]
    summary = dict(rows[-1])
    for key in ("seconds", "estimate_seconds", "attention_seconds", "rest_seconds"):
        if key in rows[0]:
            summary[key] = statistics.median(r[key] for r in rows)
    peaks = [r["peak_memory_bytes"] for r in rows if r.get("peak_memory_bytes") is not None]
    summary["peak_memory_bytes"] = max(peaks) if peaks else None
    summary["repeats"] = repeats
    summary["all_seconds"] = [r["seconds"] for r in rows]
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tiny", action="store_true", help="a 2-layer model on the CPU (smoke run; default: off)"
    )
    parser.add_argument(
        "--lengths",
        type=int,
        nargs="+",
        default=None,
        help="prompt lengths (default: 32768 131072; tiny 1024 2048)",
    )
    parser.add_argument(
        "--chunks",
        type=int,
        nargs="+",
        default=None,
        help="chunk sizes (default: 8192 16384 32768; tiny 256 512)",
    )
    parser.add_argument(
        "--densities",
        type=float,
        nargs="+",
        default=[0.10, 0.05],
        help="ProxyAttn causal densities (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats", type=int, nargs="+", default=None, help="repeats per length (default: 3 1; tiny 1 each)"
    )
    parser.add_argument("--backend", default="auto", help="attention backend (default: %(default)s)")
    parser.add_argument(
        "--skip-stock-above",
        type=int,
        default=1 << 30,
        help="no stock transformers row above this length (default: %(default)s)",
    )
    parser.add_argument(
        "--engine-warm-up",
        action="store_true",
        help="run PrefillEngine.warm_up (largest chunk, longest length) before anything else (default: off)",
    )
    parser.add_argument("--commit", default=None, help="commit recorded in the JSON (default: git's HEAD)")
    parser.add_argument(
        "--out",
        default=None,
        help="result JSON (default: bench/results/prefill-<device>.json; also into $OUT)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one proxy prefill per length (no timings saved; default: off)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    shape = TINY if args.tiny else LLAMA_8B
    lengths = args.lengths or ([1024, 2048] if args.tiny else [32768, 131072])
    chunks = args.chunks or ([256, 512] if args.tiny else [8192, 16384, 32768])
    repeats = args.repeats or ([1] * len(lengths) if args.tiny else [3, 1])
    block = 64 if args.tiny else 128
    config = ProxyAttnConfig(block_size=block, min_budget_tokens=0, dense_below_tokens=0)
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    )
    out_path = Path(
        args.out or f"bench/results/prefill-{'tiny' if args.tiny else device_name.split()[1].lower()}.json"
    )
    report = {
        "benchmark": "prefill",
        "device": device_name,
        "versions": versions(),
        "git_commit": args.commit or git_commit(),
        "model": {
            "shape": shape,
            "dtype": str(dtype).removeprefix("torch."),
            "weights": "random normal(0, 0.02)",
        },
        "proxy_config": config.to_dict(),
        "backend": args.backend,
        "timing": "perf_counter around a synchronised call; medians over repeats",
        "rows": [],
    }

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1))
        extra = os.environ.get("OUT")
        if extra:
            Path(extra, out_path.name).write_text(json.dumps(report, indent=1))

    if device.type == "cuda":
        report["dense_check"] = check_dense_attention(device, dtype)
        print("dense attention check:", report["dense_check"], flush=True)
    started = time.perf_counter()
    model = build_model(shape, device, dtype)
    engine = PrefillEngine.from_model(
        model, model_id="llama-3.1-8b-shape-random", config=config, backend=args.backend
    )
    sync(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    report["weights_bytes"] = weights
    report["build_seconds"] = time.perf_counter() - started
    from proxyprefill.kernels import api

    report["triton_available"] = api.triton_available()
    print(f"model built in {report['build_seconds']:.1f}s, weights {weights / 2**30:.2f} GiB", flush=True)

    generator = torch.Generator().manual_seed(0)
    if args.engine_warm_up:
        warmed = engine.warm_up(chunks[-1], max(lengths), progress=lambda message: print(message, flush=True))
        report["engine_warm_up_seconds"] = warmed.seconds
    warm = first_requests(engine, report, shape, lengths, chunks, args.densities, config, generator)
    run_stock(model, warm[: chunks[0]], device)

    if args.profile:
        for length in lengths:
            ids = torch.randint(0, shape["vocab_size"], (length,), generator=generator)
            profile_prefill(engine, ids, chunks[-1], args.densities[-1], config)
        return report

    for length, reps in zip(lengths, repeats):
        ids = torch.randint(0, shape["vocab_size"], (length,), generator=generator)
        for row in timed_rows(model, engine, ids, reps, chunks, args, config, report):
            report["rows"].append(row)
            save()
    report["speedups"] = speedups(report)
    report["wall_seconds"] = time.perf_counter() - started
    save()
    print(json.dumps(report["speedups"], indent=1))
    return report


def first_requests(engine, report, shape, lengths, chunks, densities, config, generator) -> torch.Tensor:
    """Warm-up at every chunk size (two chunks, so the offset paths run too): Triton compiles and
    autotunes per shape, cuDNN builds its plans; none of that belongs in the timings. These are
    the process's first requests: their times are kept apart (report["first_requests"]), as the
    cold start. A failing proxy path is recorded as report["proxy_error"]. Returns the last
    warm-up prompt."""
    report["first_requests"] = []
    for chunk in chunks:
        warm = torch.randint(0, shape["vocab_size"], (min(lengths[0], 2 * chunk),), generator=generator)
        first = run_engine(engine, warm, chunk, "dense", None, config)
        report["first_requests"].append(
            {"tokens": warm.numel(), "chunk_size": chunk, "mode": "dense", **first}
        )
        for density in densities if "proxy_error" not in report else []:
            try:
                first = run_engine(engine, warm, chunk, "proxy", density, config)
                report["first_requests"].append(
                    {
                        "tokens": warm.numel(),
                        "chunk_size": chunk,
                        "mode": "proxy",
                        "density": density,
                        **first,
                    }
                )
            except Exception as exc:  # recorded, and the proxy rows are skipped below
                report["proxy_error"] = f"{type(exc).__name__}: {exc}"
                print("proxy path failed:", report["proxy_error"], flush=True)
                break
    return warm


def timed_rows(model, engine, ids, reps, chunks, args, config, report):
    """The timed rows of one prompt: stock transformers (unless too long), then per chunk size the
    dense engine and ProxyAttn at each density; yields each row as it is measured."""
    length = ids.numel()
    device = engine.device
    plan = []
    if length <= args.skip_stock_above:
        plan.append(("stock", None, None))
    # the middle chunk size first: if the call runs out of time, the main rows exist
    ordered = sorted(chunks, key=lambda c: (c != chunks[len(chunks) // 2], c))
    for chunk in ordered:
        plan.append(("dense", chunk, None))
        if "proxy_error" not in report:
            plan.extend(("proxy", chunk, density) for density in args.densities)
    for mode, chunk, density in plan:
        try:
            if mode == "stock":
                row = measure(lambda ids=ids: run_stock(model, ids, device), reps)
            else:
                row = measure(
                    lambda ids=ids, c=chunk, m=mode, d=density: run_engine(engine, ids, c, m, d, config),
                    reps,
                )
        except torch.cuda.OutOfMemoryError as exc:
            row = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
            torch.cuda.empty_cache()
        except Exception as exc:
            row = {"error": f"{type(exc).__name__}: {exc}"}
        row.update({"tokens": length, "mode": mode, "chunk_size": chunk, "target_density": density})
        if mode != "stock":
            row["dense_kernel"] = attention_mod.dense_path_used.get("kernel")
        print(
            f"{length:>7} {mode:>5} chunk={chunk!s:>6} density={density!s:>5}: "
            + (
                row["error"]
                if "error" in row
                else f"{row['seconds']:.3f}s peak={(row['peak_memory_bytes'] or 0) / 2**30:.1f}GiB "
                f"sparsity={row.get('mean_causal_sparsity', 0):.3f} "
                f"est={row.get('estimate_seconds', 0):.3f}s "
                f"attn={row.get('attention_seconds', 0):.3f}s"
            ),
            flush=True,
        )
        yield row


def profile_prefill(engine, ids, chunk, density, config) -> None:
    """Where the time of one ProxyAttn prefill goes: the top operators by device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    run_engine(engine, ids, chunk, "proxy", density, config)
    with profile(activities=activities) as prof:
        row = run_engine(engine, ids, chunk, "proxy", density, config)
    sort = "cuda_time_total" if engine.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60)
    print(f"profile: {ids.numel()} tokens, chunk {chunk}, density {density}: {row['seconds']:.3f}s")
    print(table)
    extra = os.environ.get("OUT")
    if extra:
        Path(extra, f"profile-{ids.numel()}.txt").write_text(table)


def speedups(report: dict) -> list[dict]:
    """Per (length, chunk): proxy time against stock and against our dense engine, and the
    peak memory against weights + KV."""
    rows = [r for r in report["rows"] if "error" not in r]
    out = []
    for row in rows:
        if row["mode"] != "proxy":
            continue
        same = [r for r in rows if r["tokens"] == row["tokens"]]
        stock = next((r for r in same if r["mode"] == "stock"), None)
        dense = next((r for r in same if r["mode"] == "dense" and r["chunk_size"] == row["chunk_size"]), None)
        entry = {
            "tokens": row["tokens"],
            "chunk_size": row["chunk_size"],
            "target_density": row["target_density"],
            "mean_causal_sparsity": row["mean_causal_sparsity"],
            "proxy_seconds": row["seconds"],
            "vs_dense_engine": dense["seconds"] / row["seconds"] if dense else None,
            "vs_stock_sdpa": stock["seconds"] / row["seconds"] if stock else None,
        }
        if row.get("peak_memory_bytes") and report.get("weights_bytes"):
            budget = report["weights_bytes"] + row["kv_bytes"]
            entry["peak_over_weights_plus_kv"] = row["peak_memory_bytes"] / budget
        out.append(entry)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
