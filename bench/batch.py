"""Batch benchmark: documents/s and tokens/s of `run_batch` on a mixed-length corpus, against a
naive loop through the engine that produces the same outputs, and how busy the device is.

The corpus is random token ids of mixed lengths in a shuffled order. For each model, after a
warm-up prefill per distinct chunk shape (Triton compiles, cuDNN plans):

  naive  for each document in input order: engine.prefill (last logits and token NLL), then write
         the same files the batch job writes
  batch  run_batch(workers=0) with the same engine: longest first, manifest, atomic files

The busy fraction is the sum of the engine's per-document prefill times over the wall time of the
pass: the rest is the time the device waits on writes, tokenising and bookkeeping. The timeline
lists, per document, when it finished (seconds from the pass start) and its engine time.

Models: `random` is a Llama-3.1-8B-shaped model with random bf16 weights on the GPU (a 2-layer
small shape on the CPU); its KV (128 KiB per token at 8B) is not written (`--emit` of the random
model leaves kv out: 40 GiB per pass would make this a disk benchmark). `smollm2` is the embedded
real model, all outputs written, documents clipped to its position limit.

    python bench/batch.py                                  # GPU: 8k-128k corpus, writes bench/results/
    python bench/batch.py --device cpu                     # CPU: small lengths
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings: provenance, prefill
import prefill as prefill_bench  # noqa: E402
import provenance  # noqa: E402

from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.workers.batch import BatchOptions, DocumentProcessor, WorkItem, run_batch
from proxyprefill.workers.batch_io import Manifest
from proxyprefill.workers.engine import PrefillEngine

GPU_LENGTHS = [8192] * 4 + [16384] * 3 + [32768] * 2 + [65536, 131072]
CPU_LENGTHS = [128] * 4 + [256] * 3 + [512] * 2 + [1024]
CPU_RANDOM_SHAPE = dict(prefill_bench.TINY, num_hidden_layers=2)


def build_engine(name: str, device: torch.device, proxy: ProxyAttnConfig) -> PrefillEngine:
    if name == "smollm2":
        return PrefillEngine.from_pretrained(None, attention="proxy", config=proxy, device=device)
    shape = prefill_bench.LLAMA_8B if device.type == "cuda" else CPU_RANDOM_SHAPE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = prefill_bench.build_model(shape, device, dtype)
    model_id = "llama-3.1-8b-shape-random" if device.type == "cuda" else "tiny-llama-random"
    return PrefillEngine.from_model(model, model_id=model_id, attention="proxy", config=proxy)


def write_corpus(folder: Path, lengths: list[int], vocab: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    path = folder / "corpus.jsonl"
    with path.open("w") as handle:
        for i in order:
            ids = torch.randint(0, vocab, (lengths[i],), generator=generator).tolist()
            handle.write(json.dumps({"id": f"doc-{i:03d}-{lengths[i]}", "token_ids": ids}) + "\n")
    return path


def naive_pass(engine: PrefillEngine, options: BatchOptions) -> dict:
    """Every document in input order through the engine, the same files written, no manifest."""
    from proxyprefill.workers.batch_io import read_documents

    processor = DocumentProcessor(engine, options)
    timeline, started = [], time.perf_counter()
    for doc in read_documents(options.input):
        record = processor.process(WorkItem(doc.doc_id, torch.tensor(doc.token_ids).numpy()))
        timeline.append(_point(record, time.perf_counter() - started))
    return _summary(timeline, time.perf_counter() - started)


def batch_pass(engine: PrefillEngine, options: BatchOptions) -> dict:
    finished: list[float] = []
    started = time.perf_counter()
    run_batch(options, on_progress=lambda _: finished.append(time.perf_counter() - started), engine=engine)
    wall = time.perf_counter() - started
    records = list(Manifest.open(Path(options.output)).records.values())
    return _summary([_point(r, t) for r, t in zip(records, finished, strict=True)], wall)


def _point(record, finished_at: float) -> dict:
    return {
        "doc": record.doc_id,
        "tokens": record.num_tokens,
        "status": record.status,
        "finished_at_seconds": round(finished_at, 4),
        "engine_seconds": round(record.stats.seconds, 4) if record.stats else None,
    }


def _summary(timeline: list[dict], wall: float) -> dict:
    written = [p for p in timeline if p["status"] == "written"]
    tokens = sum(p["tokens"] for p in written)
    busy = sum(p["engine_seconds"] for p in written)
    return {
        "wall_seconds": wall,
        "documents": len(written),
        "failed": len(timeline) - len(written),
        "tokens": tokens,
        "documents_per_second": len(written) / wall,
        "tokens_per_second": tokens / wall,
        "engine_seconds": busy,
        "busy_fraction": busy / wall,
        "timeline": timeline,
    }


def measure_model(name: str, device: torch.device, lengths: list[int], args, workdir: Path) -> dict:
    proxy = ProxyAttnConfig(
        block_size=args.block_size, min_budget_tokens=args.min_budget_tokens, dense_below_tokens=0
    )
    started = time.perf_counter()
    engine = build_engine(name, device, proxy)
    build_seconds = time.perf_counter() - started
    limit = engine.model_info.max_position_embeddings or max(lengths)
    lengths = [min(n, limit) for n in lengths]
    source = write_corpus(workdir, lengths, engine.model_info.vocab_size, seed=0)
    emit = ("kv", "nll", "logits", "stats") if name == "smollm2" else ("nll", "logits", "stats")
    row = {"model": engine.model_info.model_id, "lengths": lengths, "emit": list(emit)}
    row["build_seconds"] = build_seconds
    for chunk_tokens in sorted({min(n, args.chunk_size) for n in lengths}):  # warm-up every chunk shape
        warm = torch.randint(0, engine.model_info.vocab_size, (min(2 * chunk_tokens, limit),))
        engine.prefill(warm, chunk_size=args.chunk_size, logits="last", token_nll=True)
    for mode, run in (("naive", naive_pass), ("batch", batch_pass)):
        output = workdir / f"{name}-{mode}"
        options = BatchOptions(
            input=str(source), output=str(output), emit=emit, proxy=proxy, chunk_size=args.chunk_size
        )
        row[mode] = run(engine, options)
        shutil.rmtree(output)
        print(
            f"{name:>8} {mode:>5}: {row[mode]['documents_per_second']:.3f} docs/s, "
            f"{row[mode]['tokens_per_second']:.0f} tokens/s, busy {row[mode]['busy_fraction']:.3f}",
            flush=True,
        )
    row["batch_over_naive_tokens_per_second"] = (
        row["batch"]["tokens_per_second"] / row["naive"]["tokens_per_second"]
    )
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    models = ["random", "smollm2"]
    parser.add_argument("--models", nargs="+", choices=models, default=models, help="default: %(default)s")
    lengths_help = "document lengths of the corpus (default: 8k-128k on GPU, 128-1024 on CPU)"
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help=lengths_help)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: 8192 on GPU, 128 on CPU")
    parser.add_argument("--block-size", type=int, default=None, help="default: 128 on GPU, 64 on CPU")
    parser.add_argument(
        "--min-budget-tokens", type=int, default=None, help="default: 2048 on GPU, 256 on CPU"
    )
    parser.add_argument("--out", default=None, help="default: bench/results/batch-<device>.json")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    lengths = args.lengths or (GPU_LENGTHS if gpu else CPU_LENGTHS)
    args.chunk_size = args.chunk_size or (8192 if gpu else 128)
    args.block_size = args.block_size or (128 if gpu else 64)
    args.min_budget_tokens = (
        args.min_budget_tokens if args.min_budget_tokens is not None else (2048 if gpu else 256)
    )
    device_name = torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu"
    out_path = Path(
        args.out or f"bench/results/batch-{device_name.split()[1].lower() if gpu else 'cpu'}.json"
    )
    report = {
        "benchmark": "batch",
        "device": device_name,
        "cpu_threads": torch.get_num_threads(),
        "versions": prefill_bench.versions(),
        "git_commit": provenance.git_commit(),
        "chunk_size": args.chunk_size,
        "proxy": {"block_size": args.block_size, "min_budget_tokens": args.min_budget_tokens, "gamma": 0.95},
        "timing": "perf_counter wall per pass after a warm-up; busy = sum of engine prefill seconds / wall",
        "models": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as workdir:
        for name in args.models:
            report["models"].append(measure_model(name, device, list(lengths), args, Path(workdir)))
            report["wall_seconds"] = time.perf_counter() - started
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=1))
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], out_path.name).write_text(json.dumps(report, indent=1))
    print(f"wrote {out_path} in {report['wall_seconds']:.1f} s")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
