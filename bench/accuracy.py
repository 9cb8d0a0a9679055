"""Accuracy of ProxyAttn prefill against dense attention on a real model (SmolLM2-135M by default).

For every attention variant of a one-factor-at-a-time sweep around a base configuration it
measures, in one run, beside dense attention:

- NLL / perplexity on long natural texts (bench/corpus.py), the change against dense, and how
  often the sparse model's top-1 next token equals the dense model's;
- RULER-style retrieval (bench/ruler.py: single needle, multi-key, multi-value, variable
  tracking), scored as serving would answer: the prompt is prefilled with the variant (its last
  logits give the first answer token), then the answer is decoded teacher-forced with dense
  attention over the prefilled KV cache (`answer_predictions`); a sample is an exact match when
  the argmax at every answer position is the answer's next token (the condition for greedy
  decoding to emit the answer); first-token and per-token accuracy are reported too;
- attention-mass recall per layer: for sampled query blocks of every chunk (the chunk's last
  block and a few seeded random ones), the dense softmax probability mass of each query row that
  falls inside the key blocks the variant kept, averaged over rows and heads;
- achieved causal sparsity: skipped causal blocks over all causal blocks, summed over chunks,
  per layer and overall.

Results go to a JSON file (rewritten after every variant, so a cut-off run leaves its partial
results) and a table on stdout. `python bench/accuracy.py --help` lists the knobs; the command
behind the committed results is in bench/ACCURACY.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # corpus, provenance, ruler: siblings

import corpus  # noqa: E402
import provenance  # noqa: E402
import ruler  # noqa: E402

from proxyprefill.kernels import ProxyAttnConfig, reference  # noqa: E402
from proxyprefill.workers.attention_probe import AttentionProbe, block_recall  # noqa: E402, F401

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One attention setting to measure: dense, or ProxyAttn with a config."""

    name: str
    attention: str  # "dense" or "proxy"
    config: ProxyAttnConfig
    factor: str  # which knob this variant moves away from the base ("" for the base and dense)
    layer_gammas: tuple[float, ...] = ()  # one gamma per layer (a calibrated profile's); () = config.gamma

    @property
    def prefill_config(self) -> ProxyAttnConfig | tuple[ProxyAttnConfig, ...]:
        """What the engine's prefill takes: the config, or one per layer when gammas differ by layer."""
        if not self.layer_gammas:
            return self.config
        return tuple(self.config.replace(gamma=gamma) for gamma in self.layer_gammas)


def sweep_variants(base: ProxyAttnConfig, num_kv_heads: int, gammas=(0.8, 0.9, 0.95, 0.99)) -> list[Variant]:
    """Dense, the base, the mean-pooled estimator (same budgets as the base, so it lands at the
    base's sparsity up to the forced-block overlap, which the results record), then one knob at
    a time: gamma, proxy groups, budget policy, row rule. Most telling first, so a run cut short
    still holds them."""
    variants = [
        Variant("dense", "dense", base, ""),
        Variant("proxy", "proxy", base, ""),
        Variant("estimator=meanpool", "proxy", base.replace(estimator="meanpool"), "estimator"),
    ]
    for gamma in gammas:
        if gamma != base.gamma:
            variants.append(Variant(f"gamma={gamma}", "proxy", base.replace(gamma=gamma), "gamma"))
    other_groups = num_kv_heads if base.proxy_groups == 1 else 1
    variants.append(
        Variant(f"groups={other_groups}", "proxy", base.replace(proxy_groups=other_groups), "proxy_groups")
    )
    for policy in ("gamma", "power", "gamma+power"):
        if policy != base.budget:
            variants.append(Variant(f"budget={policy}", "proxy", base.replace(budget=policy), "budget"))
    other_rule = "scaled" if base.row_rule == "fixed" else "fixed"
    variants.append(Variant(f"row_rule={other_rule}", "proxy", base.replace(row_rule=other_rule), "row_rule"))
    return variants


# --------------------------------------------------------------------------------------------
# A faster CPU attention for the sweep (same function as the reference)
# --------------------------------------------------------------------------------------------
def masked_sdpa_block_sparse_attention(q, k, v, index, q_offset: int = 0, scale: float | None = None):
    """reference.block_sparse_attention's output through one masked SDPA call per chunk.

    The token mask is (key block kept for the row's query block) AND (key <= query), the same
    mask the reference applies tile by tile; SDPA's fused CPU kernel evaluates it ~3x faster
    on SmolLM2-sized chunks. The log-sum-exp is not computed (returned as None): the engine
    discards it, and the harness only installs this for its own runs (`fast_cpu_attention`).
    """
    bs = index.block_size
    nq, nk = q.shape[2], k.shape[2]
    rep = q.shape[1] // k.shape[1]
    block_mask = index.to_dense()  # [B, Hq, Mq, Nk_blocks]
    token_mask = block_mask.repeat_interleave(bs, dim=2)[:, :, :nq].repeat_interleave(bs, dim=3)[..., :nk]
    positions = q_offset + torch.arange(nq, device=q.device)
    token_mask = token_mask & (torch.arange(nk, device=q.device)[None, :] <= positions[:, None])
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float(),
        k.float().repeat_interleave(rep, dim=1),
        v.float().repeat_interleave(rep, dim=1),
        attn_mask=token_mask,
        scale=1.0 / math.sqrt(q.shape[3]) if scale is None else scale,
    )
    return out.to(q.dtype), None


@contextlib.contextmanager
def fast_cpu_attention(enabled: bool = True):
    """Route the reference backend's block-sparse attention through the masked SDPA above."""
    if not enabled:
        yield
        return
    original = reference.block_sparse_attention
    reference.block_sparse_attention = masked_sdpa_block_sparse_attention
    try:
        yield
    finally:
        reference.block_sparse_attention = original


# --------------------------------------------------------------------------------------------
# Measurements of one variant
# --------------------------------------------------------------------------------------------
@dataclass
class Workload:
    """Token ids the sweep runs on: NLL texts and retrieval samples."""

    nll: list[dict]  # {"name", "ids"}
    retrieval: list[dict]  # {"task", "length", "seed", "prompt_ids", "answer_ids", "meta"}


def build_workload(
    encode: Callable[[str], list[int]],
    lengths: list[int],
    samples: list[int],
    nll_length: int,
    tasks=ruler.TASKS,
) -> tuple[Workload, dict]:
    """Tokenise the NLL texts (first `nll_length` tokens) and generate the retrieval prompts
    (`samples[i]` per task at `lengths[i]`)."""
    nll, sources = [], []
    for text in corpus.nll_texts():
        ids = encode(text.text)[:nll_length]
        nll.append({"name": text.name, "ids": ids})
        sources.append({**text.describe(), "tokens_used": len(ids)})
    paragraphs, haystack_sources = corpus.haystack_paragraphs()
    retrieval = []
    for length, count in zip(lengths, samples, strict=True):
        for task in tasks:
            for seed in range(count):
                sample = ruler.make_sample(task, length, seed, paragraphs, lambda s: len(encode(s)))
                retrieval.append(
                    {
                        "task": task,
                        "length": length,
                        "seed": seed,
                        "prompt_ids": encode(sample.prompt),
                        "answer_ids": encode(sample.answer),
                        "meta": sample.describe(),
                    }
                )
    return Workload(nll, retrieval), {"nll_texts": sources, "haystack": haystack_sources}


def run_variant(engine, variant: Variant, workload: Workload, chunk_size: int, dense_top1: dict) -> dict:
    """All measurements of one variant; `dense_top1` maps NLL text name -> dense argmax ids
    (filled in by the dense variant, read by the others)."""
    info = engine.model_info
    probe = AttentionProbe(info.num_layers, 1.0 / math.sqrt(info.head_dim), variant.config.block_size)
    started = time.perf_counter()
    nll_results = {}
    for text in workload.nll:
        entry, top1 = measure_nll(engine, variant, text["ids"], chunk_size, probe)
        if variant.attention == "dense":
            dense_top1[text["name"]] = top1
        elif text["name"] in dense_top1:
            entry["top1_agreement"] = float((top1 == dense_top1[text["name"]]).double().mean())
        nll_results[text["name"]] = entry

    samples = []
    for item in workload.retrieval:
        prompt, answer = item["prompt_ids"], item["answer_ids"]
        predicted = answer_predictions(engine, prompt, answer, variant, chunk_size, probe)
        correct = [p == a for p, a in zip(predicted, answer)]
        samples.append(
            {
                "task": item["task"],
                "length": item["length"],
                "seed": item["seed"],
                "tokens": len(prompt) + len(answer),
                "exact": all(correct),
                "first_token": correct[0],
                "token_accuracy": sum(correct) / len(correct),
            }
        )
    return {
        "name": variant.name,
        "attention": variant.attention,
        "factor": variant.factor,
        "config": variant.config.to_dict(),
        "sparsity": probe.sparsity(),
        "recall": probe.recall(),
        "nll": nll_results,
        "retrieval": summarise_retrieval(samples),
        "retrieval_samples": samples,
        "seconds": time.perf_counter() - started,
    }


@torch.no_grad()
def measure_nll(
    engine, variant: Variant, ids: list[int], chunk_size: int, observer
) -> tuple[dict, torch.Tensor]:
    """Mean next-token NLL of `ids` under the variant's prefill (all, and its second half), and
    the argmax next token at every position (for top-1 agreement with dense)."""
    result = engine.prefill(
        ids,
        chunk_size=chunk_size,
        logits=range(len(ids) - 1),
        config=variant.prefill_config,
        attention=variant.attention,
        attention_observer=observer,
    )
    targets = torch.tensor(ids[1:], device=result.logits.device)
    token_nll = torch.nn.functional.cross_entropy(result.logits, targets, reduction="none").double()
    half = len(token_nll) // 2
    entry = {
        "tokens": len(ids),
        "nll": float(token_nll.mean()),
        "nll_second_half": float(token_nll[half:].mean()),
        "ppl": math.exp(float(token_nll.mean())),
    }
    return entry, result.logits.argmax(dim=-1).cpu()


def answer_predictions(engine, prompt: list[int], answer: list[int], variant: Variant, chunk_size, probe):
    """Greedy predictions at every answer position, as serving would produce them (see
    `prefill_and_decode`)."""
    return prefill_and_decode(engine, prompt, answer, variant, chunk_size, probe)[0]


@torch.no_grad()
def prefill_and_decode(engine, prompt: list[int], answer: list[int], variant: Variant, chunk_size, observer):
    """(greedy predictions at every answer position, the prompt's PrefillResult).

    The prompt alone goes through the variant's prefill; its last logits predict the first answer
    token. The answer (teacher-forced) is then decoded with dense attention over the prefilled KV
    cache, like the decode service, in one forward: position i predicts answer token i + 1. The
    answer is an exact match iff greedy decoding after this prefill would emit it.
    """
    result = engine.prefill(
        prompt,
        chunk_size=chunk_size,
        logits="last",
        config=variant.prefill_config,
        attention=variant.attention,
        attention_observer=observer,
    )
    predicted = [int(result.logits[-1].argmax())]
    if len(answer) > 1:
        positions = torch.arange(len(prompt), len(prompt) + len(answer) - 1)[None]
        decoded = engine.model(
            input_ids=torch.tensor([answer[:-1]], device=engine.device),
            position_ids=positions.to(engine.device),
            past_key_values=result.to_hf_cache(),
            use_cache=True,
        ).logits[0]
        predicted += decoded.argmax(dim=-1).tolist()
    return predicted, result


def summarise_retrieval(samples: list[dict]) -> dict:
    """Exact-match rate, first-token accuracy (the token the prefill itself predicts) and mean
    token accuracy per (task, length), per task, and overall."""
    groups: dict[str, list[dict]] = {}
    for s in samples:
        groups.setdefault(f"{s['task']}@{s['length']}", []).append(s)
        groups.setdefault(s["task"], []).append(s)
        groups.setdefault("all", []).append(s)
    return {
        key: {
            "n": len(items),
            "exact": sum(i["exact"] for i in items) / len(items),
            "first_token": sum(i["first_token"] for i in items) / len(items),
            "token_accuracy": sum(i["token_accuracy"] for i in items) / len(items),
        }
        for key, items in groups.items()
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def add_deltas(variants: list[dict]) -> None:
    """NLL change against the dense variant of the same run, per text."""
    dense = next((v for v in variants if v["attention"] == "dense"), None)
    if dense is None:
        return
    for variant in variants:
        for name, entry in variant["nll"].items():
            if name in dense["nll"]:
                entry["nll_delta"] = entry["nll"] - dense["nll"][name]["nll"]
                entry["nll_second_half_delta"] = (
                    entry["nll_second_half"] - dense["nll"][name]["nll_second_half"]
                )


def table(variants: list[dict]) -> str:
    """A Markdown table: one row per variant."""
    texts = sorted({name for v in variants for name in v["nll"]})
    tasks = [t for t in ruler.TASKS if any(t in v["retrieval"] for v in variants)]
    head = ["variant", "sparsity", "recall (mean / worst layer)"]
    head += [f"ΔNLL {t.split(':')[-1]}" for t in texts] + ["top-1 agree"]
    head += [f"{t} EM" for t in tasks] + ["EM all", "tok-acc all", "s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        row = [v["name"], f"{v['sparsity']['overall']:.3f}"]
        row.append(f"{v['recall']['overall']:.4f} / {v['recall']['min_layer']:.4f}")
        for t in texts:
            delta = v["nll"].get(t, {}).get("nll_delta")
            row.append("" if delta is None else f"{delta:+.4f}")
        agree = [e["top1_agreement"] for e in v["nll"].values() if "top1_agreement" in e]
        row.append(f"{sum(agree) / len(agree):.4f}" if agree else "—")
        for t in tasks:
            r = v["retrieval"][t]
            row.append(f"{r['exact'] * r['n']:.0f}/{r['n']}")
        r = v["retrieval"].get("all", {"exact": 0, "n": 0, "token_accuracy": 0})
        row += [f"{r['exact'] * r['n']:.0f}/{r['n']}", f"{r['token_accuracy']:.3f}", f"{v['seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def environment() -> dict:
    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    commit = provenance.git_commit()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu: {cpu}",
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "triton": version("triton"),
        "git_commit": commit,
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf; default: the embedded SmolLM2")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096], help="retrieval prompt tokens")
    p.add_argument(
        "--samples", type=int, nargs="+", default=[3, 1], help="retrieval samples per task, per length"
    )
    p.add_argument("--tasks", nargs="+", default=list(ruler.TASKS), choices=ruler.TASKS)
    p.add_argument("--nll-length", type=int, default=4096, help="tokens of each NLL text")
    p.add_argument("--chunk-size", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--min-budget-tokens", type=int, default=256)
    p.add_argument("--gamma", type=float, default=0.9, help="the base variant's gamma")
    p.add_argument("--variants", nargs="*", default=None, help="run only these variant names")
    p.add_argument(
        "--skip-dense",
        action="store_true",
        help="leave out the dense variant (a follow-up run; compare with a full run's dense numbers)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--reference-attention",
        action="store_true",
        help="use the reference tiled attention instead of the equivalent masked SDPA (slower)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/accuracy-<date>.json)"
    )
    p.add_argument("--summarize", type=Path, default=None, help="print the table of a results JSON and exit")
    return p.parse_args(argv)


def main(argv=None, engine=None, encode: Callable[[str], list[int]] | None = None) -> dict:
    """Run the sweep; `engine` and `encode` may be passed in (tests use a tiny random model)."""
    args = parse_args(argv)
    if args.summarize:
        report = json.loads(args.summarize.read_text())
        print(table(report["variants"]))
        return report
    if args.threads:
        torch.set_num_threads(args.threads)
    if engine is None:
        from proxyprefill.workers.engine import PrefillEngine

        engine = PrefillEngine.from_pretrained(
            args.model, attention="proxy", device="cpu", dtype=torch.float32
        )
    if encode is None:
        tokenizer = engine.tokenizer
        encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    info = engine.model_info
    base = ProxyAttnConfig(
        block_size=args.block_size,
        min_budget_tokens=args.min_budget_tokens,
        gamma=args.gamma,
        dense_below_tokens=0,  # the harness measures sparse attention at every length it runs
    )
    variants = sweep_variants(base, info.num_kv_heads)
    if args.variants:
        unknown = set(args.variants) - {v.name for v in variants}
        if unknown:
            raise SystemExit(
                f"unknown variant(s) {sorted(unknown)}; choose from {[v.name for v in variants]}"
            )
        variants = [v for v in variants if v.name in args.variants or v.attention == "dense"]
    if args.skip_dense:
        variants = [v for v in variants if v.attention != "dense"]

    samples = args.samples * len(args.lengths) if len(args.samples) == 1 else args.samples
    if len(samples) != len(args.lengths):
        raise SystemExit(f"--samples needs one count or one per length ({len(args.lengths)})")
    workload, sources = build_workload(encode, args.lengths, samples, args.nll_length, tuple(args.tasks))
    out = args.out or REPO / "bench" / "results" / f"accuracy-{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "accuracy",
        "environment": environment(),
        "model": info.to_dict() if hasattr(info, "to_dict") else str(info),
        "settings": {
            "command": "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "lengths": args.lengths,
            "samples_per_task": dict(zip(args.lengths, samples)),
            "tasks": args.tasks,
            "nll_length": args.nll_length,
            "chunk_size": args.chunk_size,
            "base_config": base.to_dict(),
            "scoring": "prefill the prompt with the variant, decode the answer teacher-forced with dense "
            "attention over that KV; exact match: argmax at every answer position equals the answer token",
            "recall_rows": "per chunk and layer: the last query block and 3 seeded random query blocks",
            "sparse_attention": "reference" if args.reference_attention else "masked SDPA (same function)",
        },
        "sources": sources,
        "variants": [],
        "complete": False,
    }
    print(
        f"{len(variants)} variants; {len(workload.nll)} NLL texts, "
        f"{len(workload.retrieval)} retrieval prompts"
    )
    dense_top1: dict = {}
    for variant in variants:
        with fast_cpu_attention(not args.reference_attention):
            result = run_variant(engine, variant, workload, args.chunk_size, dense_top1)
        report["variants"].append(result)
        add_deltas(report["variants"])
        write_json(out, report)
        retrieval = result["retrieval"].get("all", {})
        print(
            f"{variant.name:>20}: sparsity {result['sparsity']['overall']:.3f}  "
            f"recall {result['recall']['overall']:.4f}  EM {retrieval.get('exact', 0):.3f}  "
            f"{result['seconds']:.0f}s",
            flush=True,
        )
    report["complete"] = True
    write_json(out, report)
    print(table(report["variants"]))
    print(f"wrote {out}")
    return report


def write_json(path: Path, report: dict) -> None:
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(staging, path)


if __name__ == "__main__":
    main()
