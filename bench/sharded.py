"""Sharded (chunked pipeline) prefill benchmark: time to first token, per-stage utilisation,
pipeline bubble and overlap, bytes moved between stages, peak memory per worker.

Scenarios (each writes its rows into one JSON as soon as it finishes):

  engine-1m    one GPU, the engine alone: a Llama-3.2-1B-shaped model (16 layers, hidden 2048,
               32/8 heads, d=64, MLP 8192, vocab 128256, tied embeddings; random bf16) over
               1,048,576 tokens with ProxyAttn at a fixed causal density (its KV, 32 GiB, fits one
               H200): proves the long-prompt path without a second GPU.
  pipeline     ShardedPrefill over `--stages` Ray workers (one GPU each) of a Llama-3.1-8B-shaped
               model at `--pipeline-tokens`; with --stages 1 it is the scaling baseline, and the
               engine on the same GPU, in the same run, gives the pipeline's own overhead.
  cpu          a small model on the CPU over 1, 2 and 3 stages: bubble, overlap and bytes moved
               (absolute times on a shared CPU mean little; ratios do).

Random weights give near-uniform attention, so ProxyAttn runs at a fixed density (every row keeps
ceil(density x causal blocks), plus sink and diagonal); the estimation still runs in full.
Time to first token: prompt submitted -> last position's logits on the driver.

    python bench/sharded.py --scenario cpu                           # here, writes bench/results/
    source .device/env.sh && python bench/sharded.py --scenario engine-1m pipeline --out-dir $OUT
    # two GPUs (not yet run): scaling at 128k and the long rows
    python bench/sharded.py --scenario pipeline --stages 1 2 --transport collective \
        --pipeline-tokens 131072 524288 1048576 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill import LLAMA_8B, build_model, git_commit, versions  # noqa: E402

from proxyprefill.kernels.config import ProxyAttnConfig  # noqa: E402
from proxyprefill.workers.engine import PrefillCancelled, PrefillEngine  # noqa: E402

LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=1 << 20,
    rope_theta=500000.0,
    tie_word_embeddings=True,
)
SMALL = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1 << 16,
    rope_theta=500000.0,
)
GIB = 1024**3


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class Report:
    def __init__(self, path: Path, args):
        self.path = path
        self.data = {
            "benchmark": "sharded",
            "device": device_name(),
            "gpus": torch.cuda.device_count(),
            "versions": versions(),
            "git_commit": args.commit or git_commit(),
            "density": args.density,
            "timing": "perf_counter on the driver around synchronised calls; stage timestamps time.time()",
            "rows": [],
        }
        try:
            import ray

            self.data["versions"]["ray"] = ray.__version__
        except ImportError:
            self.data["versions"]["ray"] = None

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()
        print(json.dumps(row, indent=None, default=str)[:2000], flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))


def proxy_config(block: int) -> ProxyAttnConfig:
    return ProxyAttnConfig(block_size=block, min_budget_tokens=0, dense_below_tokens=0)


# --------------------------------------------------------------------------------------------
# engine-1m
# --------------------------------------------------------------------------------------------
def run_engine_long(report: Report, args, deadline: float) -> None:
    device = torch.device("cuda")
    started = time.perf_counter()
    model = build_model(LLAMA_1B, device, torch.bfloat16)
    config = proxy_config(128)
    engine = PrefillEngine.from_model(model, model_id="llama-3.2-1b-shape-random", config=config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    build_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    warm = torch.randint(0, LLAMA_1B["vocab_size"], (2 * args.long_chunk,), generator=generator)
    first = engine.prefill(warm, chunk_size=args.long_chunk, fixed_density=args.density, logits="last")
    # the first request in the process (compilation included), apart from the timed rows
    first_request = {
        "tokens": warm.numel(),
        "seconds": first.total_seconds,
        "estimate_seconds": first.estimate_seconds,
        "attention_seconds": first.attention_seconds,
        "rest_seconds": first.total_seconds - first.estimate_seconds - first.attention_seconds,
    }
    del first
    for tokens in args.long_tokens:
        ids = torch.randint(0, LLAMA_1B["vocab_size"], (tokens,), generator=generator)
        done = [0]

        def progress(tokens_done: int, _total: int, done=done) -> None:
            done[0] = tokens_done

        row = {
            "scenario": "engine-1m",
            "model": "llama-3.2-1b-shape",
            "shape": LLAMA_1B,
            "tokens": tokens,
            "chunk_size": args.long_chunk,
            "gpus": 1,
            "weights_bytes": weights,
            "build_seconds": build_s,
            "first_request": first_request,
        }
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        try:
            result = engine.prefill(
                ids,
                chunk_size=args.long_chunk,
                fixed_density=args.density,
                logits="last",
                progress=progress,
                should_stop=lambda: time.monotonic() > deadline,
            )
            torch.cuda.synchronize()
            row.update(
                ttft_seconds=time.perf_counter() - start,
                estimate_seconds=result.estimate_seconds,
                attention_seconds=result.attention_seconds,
                rest_seconds=result.total_seconds - result.estimate_seconds - result.attention_seconds,
                peak_memory_bytes=base + (result.peak_memory_bytes or 0),
                kv_bytes=result.kv_bytes,
                mean_causal_sparsity=float(result.sparsity.mean()),
                tokens_per_second=tokens / (time.perf_counter() - start),
                last_logits_finite=bool(torch.isfinite(result.logits).all()),
            )
            del result
        except PrefillCancelled:
            seconds = time.perf_counter() - start
            row.update(
                error=f"stopped by the time budget after {done[0]} tokens in {seconds:.1f} s",
                tokens_done=done[0],
                seconds=seconds,
            )
        except Exception as exc:  # recorded; the next scenario still runs
            row.update(error=f"{type(exc).__name__}: {str(exc)[:500]}", tokens_done=done[0])
        torch.cuda.empty_cache()
        report.add(row)
    del engine, model
    torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# pipeline (GPU) and cpu
# --------------------------------------------------------------------------------------------
def pipeline_row(pipe, result, tokens: int, chunk: int, scenario: str, model: str, baseline=None) -> dict:
    timeline = result.extra["timeline"]
    summary = timeline.summary()
    row = {
        "scenario": scenario,
        "model": model,
        "tokens": tokens,
        "chunk_size": chunk,
        "stages": pipe.num_stages,
        "layer_ranges": pipe.layer_ranges,
        "ttft_seconds": result.extra["ttft_s"],
        "mean_causal_sparsity": float(result.sparsity.mean()),
        "kv_bytes": result.extra["kv_bytes"],
        "memory_per_stage": pipe.memory(),
        **{f"pipeline_{k}": v for k, v in summary.items()},
    }
    if baseline is not None:
        row["baseline_ttft_seconds"] = baseline
        row["speedup_vs_baseline"] = baseline / row["ttft_seconds"]
    return row


def run_pipeline_gpu(report: Report, args, deadline: float) -> None:
    import ray

    from proxyprefill.workers.pipeline import ShardedPrefill
    from proxyprefill.workers.planner import InsufficientResources, ModelShape, WorkerState, plan_prefill

    gpus = torch.cuda.device_count()
    ray.init(num_gpus=gpus, num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=True)
    source = dict(LLAMA_8B, model_type="llama")
    shape = ModelShape.from_config(argparse.Namespace(**LLAMA_8B, tie_word_embeddings=False))
    chunk = args.pipeline_chunk
    warm = torch.randint(0, LLAMA_8B["vocab_size"], (2 * chunk,), generator=torch.Generator().manual_seed(0))
    baselines: dict[int, float] = {}
    for stages in sorted(set(min(s, gpus) for s in args.stages)):
        workers = [WorkerState(i, torch.cuda.mem_get_info(i)[0]) for i in range(gpus)]
        started = time.perf_counter()
        pipe = ShardedPrefill(
            source,
            num_stages=stages,
            config=proxy_config(128),
            device="cuda",
            dtype="bfloat16",
            threads=4,
            actor_options={"num_gpus": 1, "num_cpus": 1},
            model_id="llama-3.1-8b-shape-random",
            transport=args.transport,
        )
        pipe.wait_ready()
        build_s = time.perf_counter() - started
        pipe.release(pipe.prefill(warm, chunk, fixed_density=args.density, gather=False).extra["request_id"])
        for tokens in args.pipeline_tokens:
            row = {"scenario": "pipeline", "model": "llama-3.1-8b-shape", "tokens": tokens, "stages": stages}
            if time.monotonic() > deadline:
                report.add({**row, "error": "skipped: time budget spent"})
                continue
            try:  # what the service would do: refuse up front what cannot fit
                plan_prefill(tokens, shape, workers, chunk_tokens=chunk, force_stages=stages)
            except InsufficientResources as refused:
                report.add({**row, "refused": str(refused), "needed_bytes": refused.needed_bytes})
                continue
            ids = torch.randint(
                0, LLAMA_8B["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(tokens)
            )
            try:
                result = pipe.prefill(
                    ids,
                    chunk,
                    fixed_density=args.density,
                    logits="last",
                    gather=False,
                    timeout_s=max(30.0, deadline - time.monotonic()),
                )
                pipe.release(result.extra["request_id"])
                if stages == 1:
                    baselines[tokens] = result.extra["ttft_s"]
                row = pipeline_row(
                    pipe, result, tokens, chunk, "pipeline", "llama-3.1-8b-shape", baselines.get(tokens)
                )
                row.update(build_seconds=build_s, transport=pipe.transport)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            report.add(row)
        pipe.shutdown()
    ray.shutdown()
    if args.engine_baseline and time.monotonic() < deadline:
        engine_baseline_gpu(report, args, warm)


def engine_baseline_gpu(report: Report, args, warm: torch.Tensor) -> None:
    """The same model and prompts through the engine in this process: the pipeline's own overhead."""
    chunk = args.pipeline_chunk
    model = build_model(LLAMA_8B, torch.device("cuda"), torch.bfloat16)
    engine = PrefillEngine.from_model(model, model_id="llama-3.1-8b-shape-random", config=proxy_config(128))
    engine.prefill(warm, chunk_size=chunk, fixed_density=args.density, logits="last")
    for tokens in args.pipeline_tokens:
        generator = torch.Generator().manual_seed(tokens)  # the pipeline's prompt of this length
        ids = torch.randint(0, LLAMA_8B["vocab_size"], (tokens,), generator=generator)
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            result = engine.prefill(ids, chunk_size=chunk, fixed_density=args.density, logits="last")
            torch.cuda.synchronize()
            row = {
                "scenario": "engine-baseline",
                "model": "llama-3.1-8b-shape",
                "tokens": tokens,
                "chunk_size": chunk,
                "ttft_seconds": time.perf_counter() - start,
                "peak_memory_bytes": result.peak_memory_bytes,
                "mean_causal_sparsity": float(result.sparsity.mean()),
            }
            del result
        except Exception as exc:
            row = {"scenario": "engine-baseline", "tokens": tokens, "error": f"{type(exc).__name__}: {exc}"}
        report.add(row)
    del engine, model
    torch.cuda.empty_cache()


def run_cpu(report: Report, args) -> None:
    import tempfile

    import ray
    from transformers import LlamaConfig, LlamaForCausalLM

    from proxyprefill.workers.pipeline import ShardedPrefill

    tokens, chunk = args.cpu_tokens, args.cpu_chunk
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(tmp)
        ids = torch.randint(0, SMALL["vocab_size"], (tokens,), generator=torch.Generator().manual_seed(0))
        config = proxy_config(64)
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
        baseline = None
        for stages in args.cpu_stages:
            pipe = ShardedPrefill(tmp, num_stages=stages, config=config, actor_options={"num_cpus": 1})
            pipe.wait_ready()
            pipe.prefill(ids[: 2 * chunk], chunk, fixed_density=args.density)  # warm-up
            runs = []
            for _ in range(args.repeats):
                runs.append(pipe.prefill(ids, chunk, fixed_density=args.density, gather=False))
                pipe.release(runs[-1].extra["request_id"])
            runs.sort(key=lambda r: r.extra["ttft_s"])
            median = runs[len(runs) // 2]
            if stages == 1:
                baseline = median.extra["ttft_s"]
            row = pipeline_row(pipe, median, tokens, chunk, "cpu", "small-llama-6-layers", baseline)
            row["all_ttft_seconds"] = sorted(r.extra["ttft_s"] for r in runs)
            row["shape"] = SMALL
            report.add(row)
            pipe.shutdown()
        ray.shutdown()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", nargs="+", default=["cpu"], choices=["engine-1m", "pipeline", "cpu"])
    parser.add_argument(
        "--density", type=float, default=0.05, help="fixed causal density (0.05 = 95%% sparse)"
    )
    parser.add_argument("--long-tokens", type=int, nargs="+", default=[1 << 20])
    parser.add_argument("--long-chunk", type=int, default=32768)
    parser.add_argument("--stages", type=int, nargs="+", default=[1], help="stage counts to run, e.g. 1 2")
    parser.add_argument("--transport", default="object_store", choices=["object_store", "collective"])
    parser.add_argument("--pipeline-tokens", type=int, nargs="+", default=[131072])
    parser.add_argument("--pipeline-chunk", type=int, default=16384)
    parser.add_argument("--engine-baseline", action="store_true")
    parser.add_argument("--cpu-tokens", type=int, default=4096)
    parser.add_argument("--cpu-chunk", type=int, default=256)
    parser.add_argument("--cpu-stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=3000.0, help="stop starting work after this")
    parser.add_argument("--long-budget-s", type=float, default=None, help="stop the engine-1m run after this")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    out_dir = Path(args.out_dir)
    results = {}
    if "cpu" in args.scenario:
        report = Report(out_dir / "sharded-cpu.json", args)
        run_cpu(report, args)
        results["cpu"] = report.data
    gpu_scenarios = [s for s in args.scenario if s != "cpu"]
    if gpu_scenarios:
        if not torch.cuda.is_available():
            raise SystemExit(f"scenarios {gpu_scenarios} need a CUDA device")
        tag = device_name().split()[1].lower() if len(device_name().split()) > 1 else "gpu"
        report = Report(out_dir / f"sharded-{tag}.json", args)
        if "engine-1m" in gpu_scenarios:
            long_deadline = deadline
            if args.long_budget_s is not None:
                long_deadline = min(deadline, time.monotonic() + args.long_budget_s)
            run_engine_long(report, args, long_deadline)
        if "pipeline" in gpu_scenarios:
            run_pipeline_gpu(report, args, deadline)
        results["gpu"] = report.data
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
