"""The offline commands of `proxyprefill`: `batch` (prefill a corpus to files) and `calibrate`
(measure ProxyAttn settings against dense and write the model's profile). proxyprefill/cli.py
registers them beside the service's commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# batch ---------------------------------------------------------------------------------------
def add_batch_flags(parser: argparse.ArgumentParser) -> None:
    from proxyprefill.kernels.config import ProxyAttnConfig
    from proxyprefill.workers import batch

    proxy = ProxyAttnConfig()
    add = parser.add_argument
    add("--input", required=True, help="a .jsonl file, a .parquet file, or a folder of UTF-8 text files")
    add("--output", required=True, help="output folder: kv/, nll/, logits/ and manifest.jsonl")
    add(
        "--emit",
        default=",".join(batch.EMIT_KINDS),
        help="comma list of kv,nll,logits,stats (default: %(default)s)",
    )
    add("--model", default=None, help="HF model folder or .gguf file (default: the embedded SmolLM2)")
    add("--attention", default="proxy", help="proxy or dense (default: %(default)s)")
    add("--chunk-size", type=int, default=8192, help="prefill chunk in tokens (default: %(default)s)")
    add(
        "--max-tokens",
        type=int,
        default=None,
        help="longer documents fail as too long (default: the model's limit)",
    )
    add(
        "--workers",
        type=int,
        default=0,
        help="0: in this process; N: Ray Data pool of N engines (default: 0)",
    )
    add(
        "--ray-address",
        default=None,
        help="Ray cluster to join with --workers N (default: a running one, else a new one)",
    )
    add("--device", default="auto", help="auto (cuda when present), cpu or cuda (default: %(default)s)")
    add("--order", default="longest-first", help="longest-first or input (default: %(default)s)")
    add("--text-field", default="text", help="JSONL/Parquet field holding the text (default: %(default)s)")
    add("--id-field", default="id", help="JSONL/Parquet field holding the document id (default: %(default)s)")
    add(
        "--chat-template",
        action="store_true",
        help="format each text document as one user message with the model's chat template, as a chat "
        "decode side would (default: off, plain text)",
    )
    add(
        "--no-generation-prompt",
        action="store_true",
        help="with --chat-template: do not end with the assistant header (default: end with it)",
    )
    add(
        "--add-special-tokens",
        choices=["true", "false"],
        default=None,
        help="add the tokenizer's special tokens around a text document, as tokenizer(text) does: BOS "
        "for Llama and Mistral tokenizers, nothing for SmolLM2 or Qwen (default: true for plain "
        "text; false with --chat-template, whose template writes them)",
    )
    add(
        "--gamma",
        type=float,
        default=proxy.gamma,
        help="ProxyAttn attention mass to keep (default: %(default)s)",
    )
    add(
        "--block-size",
        type=int,
        default=proxy.block_size,
        help="ProxyAttn block in tokens (default: %(default)s)",
    )
    add(
        "--min-budget-tokens",
        type=int,
        default=proxy.min_budget_tokens,
        help="ProxyAttn floor per row (default: %(default)s)",
    )
    add(
        "--dense-below-tokens",
        type=int,
        default=proxy.dense_below_tokens,
        help="dense attention below this context (default: %(default)s)",
    )
    add("--quiet", action="store_true", help="no progress lines on stderr (default: off)")


def batch_options(args):
    """BatchOptions from parsed flags; raises BatchOptionError naming the bad flag."""
    from proxyprefill.kernels.config import ProxyAttnConfig
    from proxyprefill.workers.batch import BatchOptionError, BatchOptions

    proxy_flags = {"gamma": args.gamma, "block_size": args.block_size}
    proxy_flags.update(min_budget_tokens=args.min_budget_tokens, dense_below_tokens=args.dense_below_tokens)
    try:
        proxy = ProxyAttnConfig(**proxy_flags)
    except (ValueError, TypeError) as exc:
        named = next((name for name in proxy_flags if str(exc).startswith(name)), "gamma")
        raise BatchOptionError("--" + named.replace("_", "-"), str(exc)) from None
    emit = tuple(kind.strip() for kind in args.emit.split(",") if kind.strip())
    return BatchOptions(
        input=args.input,
        output=args.output,
        emit=emit,
        model=args.model,
        attention=args.attention,
        proxy=proxy,
        chunk_size=args.chunk_size,
        max_tokens=args.max_tokens,
        workers=args.workers,
        device=args.device,
        order=args.order,
        text_field=args.text_field,
        id_field=args.id_field,
        ray_address=args.ray_address,
        chat_template=args.chat_template,
        add_generation_prompt=not args.no_generation_prompt,
        add_special_tokens=None if args.add_special_tokens is None else args.add_special_tokens == "true",
    ).validate()


def cmd_batch(args) -> int:
    from proxyprefill.workers.batch import BatchOptionError, print_progress, run_batch

    try:
        options = batch_options(args)
    except BatchOptionError as exc:
        print(f"proxyprefill batch: error: {exc}", file=sys.stderr)
        return 2
    summary = run_batch(options, on_progress=None if args.quiet else print_progress)
    print(
        f"batch: {summary.documents_found} documents in the input, {summary.documents_skipped} already done, "
        f"{summary.documents_written} written, {summary.documents_failed} failed; "
        f"{summary.tokens} tokens in {summary.seconds:.1f} s; manifest {summary.manifest}"
    )
    return 0


# calibrate -----------------------------------------------------------------------------------
def cmd_calibrate(args) -> int:
    import torch

    from proxyprefill.workers import calibration, profiles
    from proxyprefill.workers.engine import PrefillEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        params = profiles.CalibrationParameters(
            target_delta_nll=args.target_delta_nll,
            tokens=args.tokens,
            chunk_size=args.chunk_size,
            block_size=args.block_size,
            gammas=tuple(args.gammas),
            proxy_groups=tuple(args.proxy_groups),
            min_budget_tokens=tuple(args.min_budget_tokens),
            per_layer_gamma=args.per_layer_gamma,
            dense_below_tokens=args.dense_below_tokens,
            seed=args.seed,
        )
    except ValueError as error:
        print(f"calibrate: {error}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = PrefillEngine.from_pretrained(
        args.model, device=args.device, dtype=dtype, backend=args.backend, profile=profiles.NONE
    )
    if engine.tokenizer is None:
        print(
            f"calibrate: {engine.model_info.model_id} has no tokenizer to read the texts with",
            file=sys.stderr,
        )
        return 2
    encode = lambda text: engine.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    try:
        texts = calibration.calibration_texts(encode, params.tokens)
    except ValueError as error:  # a text shorter than --tokens: say so and which, no traceback
        print(f"calibrate: --tokens {params.tokens}: {error}", file=sys.stderr)
        return 2
    info = engine.model_info
    print(
        f"calibrating {info.model_id} on {engine.device}: {len(texts)} texts of {params.tokens} tokens, "
        f"target ΔNLL <= {params.target_delta_nll} on every text",
        file=sys.stderr,
    )
    profile = calibration.calibrate(engine, texts, params, progress=lambda line: print(line, file=sys.stderr))
    out = Path(args.out) if args.out else profiles.default_profile_path(info)
    profile.save(out)
    print(calibration.describe(profile))
    if args.out:
        print(f"wrote {out}; serve it with `proxyprefill serve --profile {out}`")
    else:
        print(f"wrote {out}; the engine and `proxyprefill serve` load it by default for this model")
    return 0


def add_calibrate_flags(parser: argparse.ArgumentParser) -> None:
    from proxyprefill.workers.profiles import CalibrationParameters

    defaults = CalibrationParameters()
    add = parser.add_argument
    add("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    add(
        "--out",
        default=None,
        help="profile file to write (default: the model's profile under $PROXYPREFILL_CACHE/profiles, "
        "which the engine and the service load by default)",
    )
    add(
        "--target-delta-nll",
        type=float,
        default=defaults.target_delta_nll,
        help="largest NLL increase per token against dense, on every text (default %(default)s)",
    )
    add("--tokens", type=int, default=defaults.tokens, help="tokens of each text (default %(default)s)")
    add("--chunk-size", type=int, default=defaults.chunk_size, help="prefill chunk (default %(default)s)")
    add("--block-size", type=int, default=defaults.block_size, help="mask block (default %(default)s)")
    add(
        "--gammas",
        type=float,
        nargs="+",
        default=list(defaults.gammas),
        help="gamma values tried (default %(default)s)",
    )
    add(
        "--proxy-groups",
        type=int,
        nargs="+",
        default=list(defaults.proxy_groups),
        help="proxy-head counts tried (default: 1 and the model's KV-head count)",
    )
    add(
        "--min-budget-tokens",
        type=int,
        nargs="+",
        default=list(defaults.min_budget_tokens),
        help="minimum budgets tried, in tokens (default %(default)s)",
    )
    add(
        "--no-per-layer-gamma",
        dest="per_layer_gamma",
        action="store_false",
        help="try only one gamma for all layers (default: also per-layer gammas)",
    )
    add(
        "--dense-below-tokens",
        type=int,
        default=defaults.dense_below_tokens,
        help="dense_below_tokens written into the profile; calibration itself runs every text sparse "
        "(default %(default)s, the H100 crossover)",
    )
    add(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the sampled recall rows (default %(default)s)",
    )
    add("--device", default=None, help="cpu or cuda (default: cuda when available)")
    add(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="model dtype (default: bfloat16 on cuda, float32 on cpu)",
    )
    add(
        "--backend", choices=["auto", "torch", "triton"], default="auto", help="kernels (default %(default)s)"
    )
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
