"""The `proxyprefill` command.

    proxyprefill serve [--listen HOST:PORT] [--ray-address ADDR] [--model PATH] ...  # any ServerConfig field
    proxyprefill prefill --server HOST:PORT --file doc.txt [--return kv|logits|none] [--out kv.safetensors]
    proxyprefill prefill --server HOST:PORT --text "..." --chat      # one user turn, chat template
    proxyprefill prefill --server HOST:PORT --messages chat.json     # a whole conversation
    proxyprefill decode --server HOST:PORT --handle HEX [--max-new-tokens 32]
    proxyprefill info --server HOST:PORT
    proxyprefill demo        # the service in-process on the default model: prefill a document, fetch, decode
    proxyprefill batch --input docs.jsonl|docs.parquet|FOLDER --output DIR [--emit kv,nll,logits,stats] ...
    proxyprefill calibrate [--model PATH] [--out FILE] [--target-delta-nll 0.02] ...  # a per-model profile

Client commands read a bearer token from --token or PROXYPREFILL_TOKEN, and a CA certificate for
TLS from --tls-ca.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from .offline_commands import add_batch_flags, add_calibrate_flags, cmd_batch, cmd_calibrate


def _client(args):
    from proxyprefill.service.client import PrefillClient

    token = args.token or os.environ.get("PROXYPREFILL_TOKEN")
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return PrefillClient(args.server, token=token, root_certificates=ca)


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server", default="127.0.0.1:50051", help="HOST:PORT of the prefill service (default: %(default)s)"
    )
    parser.add_argument("--token", help="bearer token (default: $PROXYPREFILL_TOKEN)")
    parser.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS (default: plaintext)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline in seconds (default: none)")


# serve ---------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from proxyprefill.service import config as config_mod
    from proxyprefill.service.server import serve

    try:
        config = config_mod.load(args)
    except config_mod.ConfigError as error:  # a bad value stops the start, naming its field
        print(f"proxyprefill serve: configuration error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(config))
    return 0


# prefill -------------------------------------------------------------------------------------
def _progress_printer(total_hint: int | None = None):
    """An on_event callback drawing a tqdm progress bar from Progress events."""
    from tqdm import tqdm

    state = {"bar": None, "done": 0}

    def on_event(event) -> None:
        which = event.WhichOneof("event")
        if which == "accepted":
            a = event.accepted
            print(f"accepted: {a.request_id}, {a.num_tokens} tokens, {a.worker}, position {a.queue_position}")
            state["bar"] = tqdm(total=a.num_tokens, unit="tok", desc="prefill", file=sys.stderr)
        elif which == "progress" and state["bar"] is not None:
            state["bar"].update(event.progress.tokens_done - state["done"])
            state["done"] = event.progress.tokens_done
        elif which == "summary" and state["bar"] is not None:
            state["bar"].close()

    return on_event


def print_summary(summary) -> None:
    t = summary.timings
    print(
        f"summary: {summary.num_tokens} tokens, {summary.attention_mode} attention, "
        f"sparsity {summary.sparsity:.3f} of causal blocks skipped, "
        f"{summary.tokens_per_second:.0f} tokens/s on the worker"
    )
    print(
        f"timings: queue {t.queue_seconds:.3f} s, prefill {t.prefill_seconds:.3f} s "
        f"(estimate {t.estimate_seconds:.3f} s, attention {t.attention_seconds:.3f} s), "
        f"total {t.total_seconds:.3f} s"
    )
    if summary.layer_sparsity:
        layers = " ".join(f"{s:.2f}" for s in summary.layer_sparsity)
        print(f"sparsity per layer: {layers}")


class PromptArgumentError(ValueError):
    """A prompt flag of `prefill` that cannot be used; the message names the flag."""


def prompt_from_args(args) -> dict:
    """The prompt keywords of PrefillClient.prefill from the prompt flags: `text` with
    `add_special_tokens`, or `messages` with `add_generation_prompt`."""
    chat_flags = args.chat or args.messages
    if args.add_special_tokens and chat_flags:
        raise PromptArgumentError(
            "--add-special-tokens: not with --chat or --messages "
            "(the chat template writes the special tokens)"
        )
    if args.no_generation_prompt and not chat_flags:
        raise PromptArgumentError("--no-generation-prompt: only with --chat or --messages")
    if args.messages:
        if args.file or args.text:
            raise PromptArgumentError("--messages: give it instead of --file or --text, not with them")
        return {
            "messages": read_messages(args.messages),
            "add_generation_prompt": not args.no_generation_prompt,
        }
    text = Path(args.file).read_text() if args.file else args.text
    if not text:
        raise PromptArgumentError("give --file, --text or --messages")
    if args.chat:
        from proxyprefill.workers.prompts import ChatMessage

        return {
            "messages": [ChatMessage("user", text)],
            "add_generation_prompt": not args.no_generation_prompt,
        }
    return {"text": text, "add_special_tokens": args.add_special_tokens}


def read_messages(path: str) -> list:
    """The conversation of a JSON file: a list of {"role": ..., "content": ...} objects."""
    from proxyprefill.workers.prompts import ChatMessage

    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise PromptArgumentError(f"--messages: cannot read {path}: {error}") from None
    if not isinstance(rows, list):
        raise PromptArgumentError(f"--messages: {path} must hold a JSON list of messages")
    messages = []
    for i, row in enumerate(rows):
        if not (
            isinstance(row, dict) and isinstance(row.get("role"), str) and isinstance(row.get("content"), str)
        ):
            raise PromptArgumentError(
                f"--messages: entry {i} of {path} must be an object with string 'role' and 'content'"
            )
        messages.append(ChatMessage(row["role"], row["content"]))
    return messages


def cmd_prefill(args) -> int:
    try:
        prompt = prompt_from_args(args)
    except PromptArgumentError as error:
        print(f"proxyprefill prefill: error: {error}", file=sys.stderr)
        return 2
    kv = "handle" if args.return_ == "kv" else "none"
    logits = "last" if args.return_ == "logits" else "none"
    with _client(args) as client:
        outcome = client.prefill(
            **prompt,
            kv=kv,
            logits=logits,
            chunk_size=args.chunk_size,
            attention=args.attention,
            lease_seconds=args.lease_seconds,
            timeout=args.timeout,
            on_event=_progress_printer(),
        )
        print_summary(outcome.summary)
        if outcome.logits is not None:
            top = outcome.logits[0].topk(5)
            values = [round(v, 3) for v in top.values.tolist()]
            print(f"last-position logits: top ids {top.indices.tolist()} values {values}")
        if outcome.handle is not None:
            h = outcome.handle
            expires = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h.expires_at_unix_ms / 1000))
            print(
                f"kv handle: {h.handle} ({h.kv_bytes / 2**20:.1f} MiB on {h.worker}, lease until {expires})"
            )
            if args.out:
                started = time.perf_counter()
                transfer = client.fetch_kv(h.handle, include_token_ids=True, timeout=args.timeout)
                seconds = time.perf_counter() - started
                transfer.save(args.out)
                client.release(h.handle)
                print(
                    f"wrote {args.out}: {len(transfer.keys)} layers, "
                    f"{transfer.bytes_received / 2**20:.1f} MiB "
                    f"fetched in {seconds:.2f} s; handle released"
                )
    return 0


# decode / info -------------------------------------------------------------------------------
def cmd_decode(args) -> int:
    from proxyprefill.service.decode import decode_handle, load_decoder

    model, tokenizer = load_decoder(args.model)
    with _client(args) as client:
        tokens, text = decode_handle(
            client,
            args.handle,
            model,
            tokenizer,
            max_new_tokens=args.max_new_tokens,
            layout=args.layout,
            page_size=args.page_size,
        )
    print(f"{len(tokens)} new tokens: {tokens}")
    print(text)
    return 0


def cmd_info(args) -> int:
    from google.protobuf.json_format import MessageToDict

    with _client(args) as client:
        info = client.model_info(timeout=args.timeout)
        print(json.dumps(MessageToDict(info), indent=2))
        print(f"health: {client.health()}")
    return 0


# demo ----------------------------------------------------------------------------------------
def demo_document() -> tuple[str, str]:
    """(text, where it came from): Python's own LICENSE.txt (~3.8k SmolLM2 tokens), which every
    CPython installation ships; the source of the argparse module where it is missing."""
    license_path = Path(os.__file__).parent / "LICENSE.txt"
    if license_path.is_file():
        return license_path.read_text(), str(license_path)
    import argparse as module

    return Path(module.__file__).read_text()[:16000], f"{module.__file__} (first 16000 characters)"


def cmd_demo(args) -> int:
    from proxyprefill.service import config as config_mod
    from proxyprefill.service.client import PrefillClient
    from proxyprefill.service.decode import greedy_continue, load_decoder
    from proxyprefill.service.local import LocalService

    logging.basicConfig(level=logging.WARNING)
    # SmolLM2 is a fair judge up to ~4k tokens; a 256-token minimum budget lets ProxyAttn skip blocks
    # at that length (the 2048-token default would keep most rows dense), and the dense fallback is
    # off (its default, the H100 crossover at 8k tokens, would keep this whole prompt dense).
    config = config_mod.load(
        environ={},
        listen="127.0.0.1:0",
        min_budget_tokens=args.min_budget_tokens,
        min_budget_tokens_floor=min(128, args.min_budget_tokens),
        dense_below_tokens=0,
    )
    text, source = demo_document()
    print(f"document: {source} ({len(text)} characters)")
    started = time.perf_counter()
    with LocalService(config) as service:
        print(f"service: {service.target}, Ray in-process, started in {time.perf_counter() - started:.1f} s")
        with PrefillClient(service.target) as client:
            info = client.model_info()
            print(
                f"model: {info.model_id} ({info.architecture}, {info.num_layers} layers, "
                f"{info.num_heads}/{info.num_kv_heads} heads, {info.dtype}), {info.num_workers} worker(s)"
            )
            events = {"progress": 0}
            bar = _progress_printer()

            def on_event(event) -> None:
                which = event.WhichOneof("event")
                events[which] = events.get(which, 0) + 1
                bar(event)

            outcome = client.prefill(
                text=text, kv="handle", logits="last", chunk_size=args.chunk_size, on_event=on_event
            )
            print(f"events: {events}")
            print_summary(outcome.summary)
            h = outcome.handle
            print(f"kv handle: {h.handle[:8]}... ({h.kv_bytes / 2**20:.1f} MiB, header {h.header.model_id})")
            fetch_started = time.perf_counter()
            transfer = client.fetch_kv(h.handle, include_token_ids=True)
            seconds = time.perf_counter() - fetch_started
            print(
                f"FetchKV: {transfer.bytes_received / 2**20:.1f} MiB in {seconds:.2f} s "
                f"({transfer.bytes_received / seconds / 1e9:.2f} GB/s on loopback)"
            )
            model, tokenizer = load_decoder(None)
            new_tokens = greedy_continue(model, transfer, max_new_tokens=args.max_new_tokens)
            print(f"decoded continuation ({len(new_tokens)} tokens): {tokenizer.decode(new_tokens)!r}")
            client.release(h.handle)
    print(f"shut down cleanly after {time.perf_counter() - started:.1f} s")
    return 0


def _add_prefill_flags(parser: argparse.ArgumentParser) -> None:
    _add_client_flags(parser)
    parser.add_argument("--file", help="text file to prefill (default: none)")
    parser.add_argument("--text", help="text to prefill, instead of --file (default: none)")
    parser.add_argument(
        "--add-special-tokens",
        action="store_true",
        help="add the tokenizer's special tokens around the text, as tokenizer(text) does by default: "
        "BOS for Llama and Mistral tokenizers, nothing for SmolLM2 or Qwen; tokenise as the decode "
        "side will (default: off)",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send the text as one user message, formatted by the model's chat template "
        "(default: plain text)",
    )
    parser.add_argument(
        "--messages",
        metavar="FILE",
        help='JSON file of a conversation, [{"role": "system|user|assistant|tool", "content": "..."}, ...], '
        "formatted by the model's chat template (instead of --file or --text; default: none)",
    )
    parser.add_argument(
        "--no-generation-prompt",
        action="store_true",
        help="with --chat or --messages: do not end with the assistant header (default: end with it, so "
        "that decoding continues as the assistant's reply)",
    )
    parser.add_argument(
        "--return",
        dest="return_",
        choices=["kv", "logits", "none"],
        default="kv",
        help="what comes back: a KV handle, the last position's logits, or only the summary "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out", help="with --return kv: fetch the KV and write it as safetensors (default: keep the handle)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=0, help="prefill chunk in tokens (default: 0, the server's)"
    )
    parser.add_argument(
        "--attention",
        choices=["proxy", "dense"],
        default=None,
        help="attention mode (default: the server's, or the model's calibrated profile)",
    )
    parser.add_argument(
        "--lease-seconds", type=int, default=0, help="how long the KV handle lives (default: 0, the server's)"
    )


def _add_decode_flags(parser: argparse.ArgumentParser) -> None:
    _add_client_flags(parser)
    parser.add_argument("--handle", required=True, help="the KV handle a prefill returned (required)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens to decode greedily (default: %(default)s)"
    )
    parser.add_argument("--model", default=None, help="the model (default: the embedded SmolLM2)")
    parser.add_argument(
        "--layout",
        choices=["contiguous", "paged"],
        default="contiguous",
        help="decode from the KV as fetched, or from a paged copy of it (default: contiguous)",
    )
    parser.add_argument(
        "--page-size", type=int, default=16, help="tokens per block of the paged layout (default: 16)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="proxyprefill", description="Long-context prefill service (ProxyAttn)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC service (local Ray unless --ray-address)",
        description="Run the gRPC prefill service. Every option also comes from a --config file or the "
        "environment; flags win over the environment, which wins over the file.",
    )
    from proxyprefill.service.config import add_flags

    add_flags(serve)
    serve.set_defaults(run=cmd_serve)

    prefill = commands.add_parser("prefill", help="send a document to a running service")
    _add_prefill_flags(prefill)
    prefill.set_defaults(run=cmd_prefill)

    decode = commands.add_parser("decode", help="pull a handle's KV and continue the text greedily")
    _add_decode_flags(decode)
    decode.set_defaults(run=cmd_decode)

    info = commands.add_parser("info", help="model, limits and health of a running service")
    _add_client_flags(info)
    info.set_defaults(run=cmd_info)

    demo = commands.add_parser("demo", help="start the service in-process and prefill a long document")
    demo.add_argument(
        "--chunk-size", type=int, default=1024, help="prefill chunk in tokens (default: %(default)s)"
    )
    demo.add_argument(
        "--min-budget-tokens",
        type=int,
        default=256,
        help="ProxyAttn's per-row budget floor, in tokens (default: %(default)s)",
    )
    demo.add_argument(
        "--max-new-tokens",
        type=int,
        default=24,
        help="tokens decoded after the prefill (default: %(default)s)",
    )
    demo.set_defaults(run=cmd_demo)

    batch = commands.add_parser(
        "batch", help="prefill every document of a corpus offline, outputs to a folder"
    )
    add_batch_flags(batch)
    batch.set_defaults(run=cmd_batch)

    calibrate = commands.add_parser(
        "calibrate",
        help="measure ProxyAttn settings against dense on offline texts; write the model's profile",
        description="Pick the ProxyAttn settings with the highest sparsity whose NLL stays within "
        "--target-delta-nll of dense on every calibration text, and write them with the measured "
        "figures as a profile; when none qualifies the profile keeps dense attention and says so.",
    )
    add_calibrate_flags(calibrate)
    calibrate.set_defaults(run=cmd_calibrate)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
