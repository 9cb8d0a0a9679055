"""ProxyAttn kernels against dense and block-sparse peers, on one CUDA device.

    python bench/kernel_speed.py                      # the full table (H100: about 5 minutes)
    python bench/kernel_speed.py --lengths 32768 131072 --densities 1.0 0.05 --no-flex   # a quick look

Problem: bf16, causal prefill (q_offset 0), batch 1, 32 query / 8 KV heads, head dim 128,
block 128. For every length it measures, in the same process:

- dense baselines: PyTorch SDPA with the cuDNN backend and with the FlashAttention-2 backend
  (K/V repeated to 32 heads beforehand, outside the timing);
- our block-sparse attention on forced masks (the dense mask, then 50/80/90/95/98% causal
  sparsity: random scores, budgets = (1 - sparsity) x the row's causal blocks) and FlexAttention
  on the very same block mask (diagonal blocks causal-masked, the rest full);
- estimation alone (proxy scores + budgets + index build, proxy_groups 1, stride 4);
- the whole proxy_attention with natural budgets (gamma 0.9 / 0.95) on random and on structured
  inputs (sink + local + a few retrieval columns), and at ~95% sparsity (gamma+power budget).

Each sparse output is checked against SDPA-math on the same mask at the smallest length, and
against the dense baseline for the dense mask. "TFLOP/s on kept blocks" counts 4*d FLOPs per
kept (query, key) pair, causal pairs only. Prints a table, writes bench/results/kernels-<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # provenance: a sibling
import provenance  # noqa: E402

from proxyprefill.kernels import (
    BlockSparseIndex,
    ProxyAttnConfig,
    proxy_attention,
    triton_attention,
    triton_budgets,
    triton_common,
    triton_index,
    triton_scores,
)

HQ, HKV, D, BS = 32, 8, 128, 128
DTYPE = torch.bfloat16


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_ms(fn, repeats: int, warmup: int = 1) -> dict:
    """Median (and spread) of CUDA-event timings of fn(), after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": repeats}


def repeats_for(n: int, base: int) -> int:
    return max(3, base * 32768 // max(n, 32768))


# --------------------------------------------------------------------------------------------
# Inputs and masks
# --------------------------------------------------------------------------------------------
def random_inputs(n: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HQ, n, D, generator=gen, device="cuda", dtype=DTYPE)
    k = torch.randn(1, HKV, n, D, generator=gen, device="cuda", dtype=DTYPE)
    v = torch.randn(1, HKV, n, D, generator=gen, device="cuda", dtype=DTYPE)
    return q, k, v


def structured_inputs(n: int, seed: int, retrieval: int = 8):
    """Attention with a sink, a local band and a few retrieval columns.

    Half the head dims carry rotary-style features cos/sin(w_i * position) in q and k, so
    q_t . k_s contains sum_i cos(w_i (t - s)): a peak around the diagonal. A shared direction u
    is added to every query, to the first 64 keys (the sink) and to `retrieval` random keys."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, HQ, n, D, generator=gen, device="cuda") * 0.5
    k = torch.randn(1, HKV, n, D, generator=gen, device="cuda") * 0.5
    v = torch.randn(1, HKV, n, D, generator=gen, device="cuda")
    pos = torch.arange(n, device="cuda", dtype=torch.float32)
    freqs = torch.logspace(math.log10(1 / 8), math.log10(1 / 4096), D // 4, device="cuda")
    angle = pos[:, None] * freqs[None, :]
    rot = torch.cat([angle.cos(), angle.sin()], dim=-1) * 1.6  # [n, D/2]
    q[..., : D // 2] += rot
    k[..., : D // 2] += rot
    u = torch.zeros(D, device="cuda")
    u[D // 2 :] = 1.0 / math.sqrt(D // 2)
    q += 3.0 * u
    k[:, :, :64] += 4.0 * u
    cols = torch.randint(64, n, (retrieval,), generator=gen, device="cuda")
    k[:, :, cols] += 4.0 * u
    return q.to(DTYPE), k.to(DTYPE), v.to(DTYPE)


def forced_index(n: int, sparsity: float, seed: int) -> BlockSparseIndex:
    """Random ranking; each head keeps (1 - sparsity) of each row's causal blocks (sink and
    diagonal forced)."""
    if sparsity <= 0.0:
        return BlockSparseIndex.dense(1, HQ, 1, n, n, BS, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mq = math.ceil(n / BS)
    causal = torch.arange(mq, device="cuda") + 1
    scores = torch.rand(1, 1, mq, mq, generator=gen, device="cuda")
    scores = scores.masked_fill(torch.arange(mq, device="cuda")[None, :] >= causal[:, None], float("-inf"))
    budgets = torch.ceil((1.0 - sparsity) * causal.double()).long().expand(1, HQ, mq)
    cfg = ProxyAttnConfig(block_size=BS, min_budget_tokens=0)
    return triton_index.build_block_mask(scores, budgets.contiguous(), cfg, 0)


def kept_pairs(index: BlockSparseIndex, n: int) -> float:
    """Causal (query, key) pairs inside the kept blocks, summed over heads (diagonal blocks half)."""
    counts = index.block_counts.double()
    full = (counts - 1).clamp(min=0).sum().item() * BS * BS
    diag = counts.shape[1] * counts.shape[2] * BS * (BS + 1) / 2
    return full + diag


def causal_pairs(n: int) -> float:
    return HQ * n * (n + 1) / 2


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------
def sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def flex_block_mask(index: BlockSparseIndex, n: int):
    """FlexAttention BlockMask with exactly our kept blocks: diagonal blocks partial (causal
    mask_mod), every other kept block full."""
    from torch.nn.attention.flex_attention import BlockMask

    dense = index.to_dense()  # [1, H, Mq, Nkb]
    mq = dense.shape[2]
    diag = torch.arange(mq, device="cuda")
    col = torch.arange(dense.shape[3], device="cuda")
    full = dense & (col[None, :] != diag[:, None])
    full_num = full.sum(-1).to(torch.int32)
    full_idx = torch.argsort((~full).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    part_num = torch.ones_like(full_num)
    part_idx = torch.zeros_like(full_idx)
    part_idx[..., 0] = diag.to(torch.int32)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    return BlockMask.from_kv_blocks(
        part_num, part_idx, full_num, full_idx, BLOCK_SIZE=BS, mask_mod=causal, seq_lengths=(n, n)
    )


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages, tma, gqa_packed); bench/attention_variants.py
# holds the loop-structure experiments
TILE_VARIANTS = [
    (128, 64, 8, 3, False, False),
    (128, 128, 8, 2, False, False),
    (64, 64, 4, 3, False, False),
    (128, 128, 8, 3, True, False),
    (128, 64, 8, 3, True, False),
    (128, 128, 8, 2, True, False),
    (64, 64, 4, 3, True, False),
]
GQA_VARIANTS = [
    (128, 64, 8, 3, False, False),
    (128, 64, 8, 3, False, True),
    (128, 128, 8, 3, False, True),
    (128, 64, 4, 3, False, True),
]
# proxy scores: (query blocks per program, key blocks per tile, num_warps, num_stages)
SCORE_VARIANTS = [(2, 4, 8, 3), (1, 4, 4, 3), (2, 8, 8, 3), (4, 4, 8, 3), (2, 4, 4, 3), (1, 8, 4, 2)]


def tune(lengths: list[int], result: dict, gqa_only: bool = False) -> None:
    """Attention tile variants on the dense and a 90% mask; proxy-score tile variants."""
    for n in lengths:
        tune_length(n, result, gqa_only)


def tune_length(n: int, result: dict, gqa_only: bool = False) -> None:
    q, k, v = random_inputs(n, seed=n)
    reps = repeats_for(n, 10)
    for sparsity in (0.0, 0.9):
        index = forced_index(n, sparsity, seed=n + 1)
        pairs = kept_pairs(index, n)
        want, _ = triton_attention.block_sparse_attention(q, k, v, index)
        for *tiles, tma, packed in GQA_VARIANTS if gqa_only else TILE_VARIANTS:
            tiles = tuple(tiles)

            def attend(index=index, tiles=tiles, tma=tma, packed=packed):
                return triton_attention.block_sparse_attention(
                    q, k, v, index, tiles=tiles, tma=tma, gqa_packed=packed
                )

            try:
                err = rel_err(attend()[0], want)
                timing = time_ms(attend, reps)
            except Exception as exc:
                print(f"  N={n} sparsity {sparsity} tiles {tiles}: failed {exc!r}"[:300])
                continue
            tflops = 4 * D * pairs / timing["median_ms"] / 1e9
            kernel = "attention_gqa" if packed else "attention_tma" if tma else "attention"
            res = dict(triton_common.KERNEL_RESOURCES.get(kernel, {}))
            result["rows"].append(
                {
                    "kind": "tune",
                    "gqa_packed": packed,
                    "n": n,
                    "sparsity": sparsity,
                    "tiles": list(tiles),
                    "tma": tma,
                    "ours": timing,
                    "tflops_kept": tflops,
                    "rel_err": err,
                    **res,
                }
            )
            print(
                f"  N={n} sparsity {sparsity} tiles {tiles} tma={tma} gqa_packed={packed}: "
                f"{timing['median_ms']:.2f} ms {tflops:.0f} TFLOP/s err {err:.1e} {res}",
                flush=True,
            )
    if gqa_only:
        return
    cfg = ProxyAttnConfig()
    want = triton_scores.estimate_block_scores(q, k, cfg)
    finite = torch.isfinite(want)
    for tiles in SCORE_VARIANTS:

        def score(tiles=tiles):
            return triton_scores.estimate_block_scores(q, k, cfg, tiles=tiles)

        err = rel_err(score()[finite], want[finite])
        timing = time_ms(score, reps)
        res = dict(triton_common.KERNEL_RESOURCES.get("scores", {}))
        result["rows"].append({"kind": "tune_scores", "n": n, "tiles": list(tiles), "scores": timing, **res})
        print(f"  N={n} scores tiles {tiles}: {timing['median_ms']:.3f} ms err {err:.1e} {res}", flush=True)


def crossover(lengths: list[int], cudnn, result: dict) -> None:
    """Dense (our kernel, every causal block) against the whole sparse path, structured inputs,
    default config: the shortest length where sparse wins is the dense_below_tokens default."""
    for n in lengths:
        crossover_length(n, cudnn, result)


CROSSOVER_CONFIGS = {
    # natural budgets, default settings (min budget 2048 tokens), structured inputs
    "default gamma0.95": ProxyAttnConfig(),
    # budgets forced near a fixed causal sparsity (plus sink and diagonal), estimation included,
    # sparse path at every length (no dense fallback)
    "sparsity~0.7": ProxyAttnConfig(
        budget="gamma+power", gamma=0.01, alpha=0.3, exponent=1.0, min_budget_tokens=0, dense_below_tokens=0
    ),
    "sparsity~0.9": ProxyAttnConfig(
        budget="gamma+power", gamma=0.01, alpha=0.1, exponent=1.0, min_budget_tokens=0, dense_below_tokens=0
    ),
}


def crossover_length(n: int, cudnn, result: dict) -> None:
    q, k, v = structured_inputs(n, seed=n + 3)
    kr, vr = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    reps = repeats_for(n, 20)
    dense_index = BlockSparseIndex.dense(1, HQ, 1, n, n, BS, device="cuda")
    dense = time_ms(lambda: triton_attention.block_sparse_attention(q, k, v, dense_index), reps)
    base = time_ms(lambda: cudnn(q, kr, vr), reps)
    row = {"kind": "crossover", "n": n, "ours_dense": dense, "cudnn": base, "sparse": {}}
    text = []
    for label, cfg in CROSSOVER_CONFIGS.items():
        sparse = time_ms(lambda cfg=cfg: proxy_attention(q, k, v, cfg, backend="triton"), reps)
        _, stats = proxy_attention(q, k, v, cfg, backend="triton", return_stats=True)
        sparsity = stats.causal_sparsity().mean().item()
        row["sparse"][label] = {"proxy_attention": sparse, "causal_sparsity": sparsity}
        text.append(f"{label} {sparse['median_ms']:.3f} ms (sparsity {sparsity:.2f})")
    result["rows"].append(row)
    print(
        f"  crossover N={n}: ours dense {dense['median_ms']:.3f} ms, cuDNN {base['median_ms']:.3f} ms; "
        + "; ".join(text),
        flush=True,
    )


def run_length(n: int, args, cudnn, fa2, flex, rows: list) -> None:
    """Every measurement at one length (inputs freed on return)."""
    reps = repeats_for(n, args.repeats)
    q, k, v = random_inputs(n, seed=n)
    base, ref_dense = dense_baselines(n, q, k, v, args, cudnn, fa2, reps)
    rows.append({"kind": "dense", **base})
    for sparsity in args.sparsities:
        rows.append(forced_mask_row(n, sparsity, q, k, v, base, ref_dense, args, flex, reps))
    rows.append(estimation_row(n, q, k, base, reps))
    rows.extend(proxy_attention_rows(n, q, k, v, base, cudnn, reps))
    torch.cuda.empty_cache()


def dense_baselines(n: int, q, k, v, args, cudnn, fa2, reps: int) -> tuple[dict, torch.Tensor]:
    """cuDNN (and FlashAttention-2) on K/V repeated to the query heads; the timings and cuDNN's
    output, the reference of the dense mask."""
    kr, vr = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    base = {"n": n, "cudnn": time_ms(lambda: cudnn(q, kr, vr), reps)}
    if not args.no_fa2:
        base["fa2"] = time_ms(lambda: fa2(q, kr, vr), reps)
    t_cudnn = base["cudnn"]["median_ms"]
    base["cudnn_tflops"] = 4 * D * causal_pairs(n) / t_cudnn / 1e9
    print(
        f"\n== N={n}: cuDNN {t_cudnn:.2f} ms ({base['cudnn_tflops']:.0f} TFLOP/s)"
        + (f", FA2 {base['fa2']['median_ms']:.2f} ms" if "fa2" in base else ""),
        flush=True,
    )
    return base, cudnn(q, kr, vr)


def forced_mask_row(n: int, sparsity: float, q, k, v, base: dict, ref_dense, args, flex, reps: int) -> dict:
    """Our block-sparse attention on a forced mask of `sparsity`, and FlexAttention on the same."""
    t_cudnn = base["cudnn"]["median_ms"]
    index = forced_index(n, sparsity, seed=n + 1)
    density = kept_pairs(index, n) / causal_pairs(n)
    ours = time_ms(lambda index=index: triton_attention.block_sparse_attention(q, k, v, index), reps)
    out, _ = triton_attention.block_sparse_attention(q, k, v, index)
    row = {
        "kind": "forced",
        "n": n,
        "target_sparsity": sparsity,
        "density": density,
        "ours": ours,
        "ours_tflops_kept": 4 * D * kept_pairs(index, n) / ours["median_ms"] / 1e9,
        "efficiency_vs_cudnn": density * t_cudnn / ours["median_ms"],
    }
    if sparsity == 0.0:
        row["rel_err_vs_cudnn"] = rel_err(out, ref_dense)
    if flex is not None and n <= args.flex_max:
        try:
            mask = flex_block_mask(index, n)
            fout = flex(q, k, v, block_mask=mask, enable_gqa=True)
            row["flex"] = time_ms(lambda mask=mask: flex(q, k, v, block_mask=mask, enable_gqa=True), reps)
            row["rel_err_vs_flex"] = rel_err(out, fout)
            del mask, fout
        except Exception as exc:  # a peer failing must not lose the run
            row["flex_error"] = repr(exc)[:300]
    flex_txt = f" flex {row['flex']['median_ms']:.2f} ms" if "flex" in row else ""
    err_txt = "".join(
        f" {key}={row[key]:.1e}" for key in ("rel_err_vs_cudnn", "rel_err_vs_flex") if key in row
    )
    print(
        f"  sparsity {sparsity:4.2f} (density {density:.3f}): ours {ours['median_ms']:.2f} ms "
        f"{row['ours_tflops_kept']:.0f} TFLOP/s, eff {row['efficiency_vs_cudnn']:.2f}{flex_txt}{err_txt}",
        flush=True,
    )
    return row


def estimation_row(n: int, q, k, base: dict, reps: int) -> dict:
    """Estimation alone: proxy scores, budgets and the index, together and apart."""
    t_cudnn = base["cudnn"]["median_ms"]
    cfg = ProxyAttnConfig(proxy_groups=1, stride=4, gamma=0.95)

    def estimate(q=q, k=k, cfg=cfg):
        scores = triton_scores.estimate_block_scores(q, k, cfg)
        budgets = triton_budgets.head_budgets(q, k, cfg)
        return triton_index.build_block_mask(scores, budgets, cfg)

    est = time_ms(estimate, reps)
    parts = {
        "scores": time_ms(lambda: triton_scores.estimate_block_scores(q, k, cfg), reps),
        "budgets": time_ms(lambda: triton_budgets.head_budgets(q, k, cfg), reps),
    }
    scores, budgets = triton_scores.estimate_block_scores(q, k, cfg), triton_budgets.head_budgets(q, k, cfg)
    parts["index"] = time_ms(lambda: triton_index.build_block_mask(scores, budgets, cfg), reps)
    print(
        f"  estimation {est['median_ms']:.2f} ms = {100 * est['median_ms'] / t_cudnn:.2f}% of cuDNN "
        f"(scores {parts['scores']['median_ms']:.2f}, budgets {parts['budgets']['median_ms']:.2f}, "
        f"index {parts['index']['median_ms']:.2f})",
        flush=True,
    )
    return {
        "kind": "estimation",
        "n": n,
        "total": est,
        **parts,
        "fraction_of_cudnn": est["median_ms"] / t_cudnn,
    }


# the whole proxy_attention: natural budgets, and ~95% sparsity
WHOLE_CONFIGS = [
    ("random", "gamma0.90", ProxyAttnConfig(gamma=0.90)),
    ("random", "gamma0.95", ProxyAttnConfig(gamma=0.95)),
    ("structured", "gamma0.90", ProxyAttnConfig(gamma=0.90)),
    ("structured", "gamma0.95", ProxyAttnConfig(gamma=0.95)),
    (
        "random",
        "sparsity~0.95",
        ProxyAttnConfig(budget="gamma+power", gamma=0.01, alpha=0.05, exponent=1.0, min_budget_tokens=0),
    ),
]


def proxy_attention_rows(n: int, q, k, v, base: dict, cudnn, reps: int) -> list[dict]:
    """The whole proxy_attention (estimation, index, attention) per WHOLE_CONFIGS entry."""
    t_cudnn = base["cudnn"]["median_ms"]
    rows = []
    structured = None
    for inputs, label, cfg in WHOLE_CONFIGS:
        if inputs == "structured" and structured is None:
            structured = structured_inputs(n, seed=n + 2)
        qq, kk, vv = (q, k, v) if inputs == "random" else structured

        def whole(qq=qq, kk=kk, vv=vv, cfg=cfg):
            return proxy_attention(qq, kk, vv, cfg, backend="triton")

        timing = time_ms(whole, reps)
        out, stats = proxy_attention(qq, kk, vv, cfg, backend="triton", return_stats=True)
        sparsity = stats.causal_sparsity().mean().item()
        row = {
            "kind": "proxy_attention",
            "n": n,
            "inputs": inputs,
            "config": label,
            "causal_sparsity": sparsity,
            "whole": timing,
            "speedup_vs_cudnn": t_cudnn / timing["median_ms"],
        }
        if "fa2" in base:
            row["speedup_vs_fa2"] = base["fa2"]["median_ms"] / timing["median_ms"]
        if inputs == "structured" and label == "gamma0.95":
            kr2, vr2 = kk.repeat_interleave(4, 1), vv.repeat_interleave(4, 1)
            row["rel_err_vs_dense"] = rel_err(out, cudnn(qq, kr2, vr2))
            del kr2, vr2
        rows.append(row)
        print(
            f"  proxy_attention {inputs:10s} {label:14s} sparsity {sparsity:.3f}: "
            f"{timing['median_ms']:.2f} ms, {row['speedup_vs_cudnn']:.1f}x cuDNN"
            + (f", {row['speedup_vs_fa2']:.1f}x FA2" if "speedup_vs_fa2" in row else "")
            + (f", rel err vs dense {row['rel_err_vs_dense']:.3f}" if "rel_err_vs_dense" in row else ""),
            flush=True,
        )
        del out, stats
    return rows


def git_commit() -> str:
    return provenance.git_commit() or "unknown"


def rel_err(x, y) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--repeats", type=int, default=10, help="repeats at 32k; fewer when longer")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument(
        "--flex-max", type=int, default=131072, help="longest length timed with FlexAttention"
    )
    parser.add_argument("--no-fa2", action="store_true")
    parser.add_argument("--crossover", type=int, nargs="*", default=[4096, 8192, 12288, 16384, 24576, 32768])
    parser.add_argument("--crossover-only", action="store_true", help="only the crossover series")
    parser.add_argument("--tune", action="store_true", help="time attention tile variants, then stop")
    parser.add_argument("--tune-gqa", action="store_true", help="with --tune: only the GQA-packed comparison")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--markdown", type=Path, default=None, help="print tables from a result JSON and stop"
    )
    args = parser.parse_args()
    if args.markdown:
        from kernels_tables import markdown_tables

        print(markdown_tables(json.loads(args.markdown.read_text())))
        return

    from torch.nn.attention import SDPBackend

    name = torch.cuda.get_device_name()
    tag = name.replace("NVIDIA ", "").split()[0].lower()
    stem = f"kernels-tune-{tag}" if args.tune else f"kernels-{tag}"
    out_path = args.out or Path(__file__).parent / "results" / f"{stem}.json"
    import triton

    result = {
        "benchmark": "kernels",
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shape": {"batch": 1, "q_heads": HQ, "kv_heads": HKV, "head_dim": D, "block": BS, "dtype": "bf16"},
        "attention_tiles_d128": list(triton_attention.ATTENTION_TILES[D]),
        "tma_attention_tiles_d128": list(triton_attention.TMA_ATTENTION_TILES[D]),
        "rows": [],
    }
    if args.tune:
        tune(args.lengths, result, gqa_only=args.tune_gqa)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))
        return
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    cudnn, fa2 = sdpa(SDPBackend.CUDNN_ATTENTION), sdpa(SDPBackend.FLASH_ATTENTION)
    rows = result["rows"]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    for n in [] if args.crossover_only else args.lengths:
        run_length(n, args, cudnn, fa2, flex, rows)
        torch.cuda.empty_cache()
        out_path.write_text(json.dumps(result, indent=1))  # partial results survive a time limit

    crossover(args.crossover, cudnn, result)
    result["kernel_resources"] = triton_common.KERNEL_RESOURCES
    print("kernel resources:", json.dumps(triton_common.KERNEL_RESOURCES))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    sys.exit(main())
