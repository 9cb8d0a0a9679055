"""Offline batch prefill: every document of a corpus through the engine, outputs to a folder.

    from proxyprefill.workers.batch import BatchOptions, run_batch

    summary = run_batch(BatchOptions(input="docs.jsonl", output="out/", workers=2))

The job reads the documents (workers/batch_io.py), tokenises them, orders them longest first (so
the long ones start early and the short ones fill the tail instead of one long document running
alone at the end), then runs each through a `PrefillEngine`:

- `workers=0`: in this process, one document after another, its files written on a thread while
  the engine runs the next;
- `workers=N`: a Ray Data pipeline, the documents as a dataset of one block each, mapped by a pool
  of N actors that each hold an engine (one GPU each when the cluster has GPUs, else CPU) and write
  their document's files; the driver appends each finished document's manifest line.

Per document it writes, as asked by `emit`: `kv/<stem>.safetensors` (the KV with its
compatibility header, workers/kv_files.py), `nll/<stem>.safetensors` (`token_nll` float32 [N-1]:
-log p(token i+1 | tokens <= i)), `logits/<stem>.safetensors` (`last_logits` float32 [vocab]), and
`stats` (timings and sparsity) in its manifest line. Documents already in the manifest are
skipped, so a rerun after an interruption does only what is missing.

Text documents are tokenised as a decode side would (workers/prompts.py): plain text with the
tokenizer's special tokens unless `add_special_tokens=False`, or, with `chat_template=True`, each
document as one user message formatted by the model's chat template (which writes the special
tokens itself). Documents given as token ids are taken as they are.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from proxyprefill.kernels.config import ProxyAttnConfig

from .batch_io import (
    INPUT_SUFFIXES,
    DocumentStats,
    Manifest,
    ManifestRecord,
    file_stem,
    read_documents,
    remove_partial_files,
    save_tensors,
    write_atomically,
)
from .engine import PrefillEngine, PrefillError, PrefillResult
from .kv_files import HEADER_KEY, save_kv
from .prompts import ChatMessage, PromptEncoder, PromptError

EMIT_KINDS = ("kv", "nll", "logits", "stats")
ORDERS = ("longest-first", "input")
DEVICES = ("auto", "cpu", "cuda")


class BatchOptionError(ValueError):
    """An option of the batch job is invalid; `flag` names it as the command line spells it."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


@dataclass(frozen=True)
class BatchOptions:
    """Everything a batch job needs; `validate()` checks it all before any work starts."""

    input: str
    output: str
    emit: tuple[str, ...] = EMIT_KINDS
    model: str | None = None  # HF directory or .gguf; None: the embedded SmolLM2
    attention: str = "proxy"
    proxy: ProxyAttnConfig = field(default_factory=ProxyAttnConfig)
    chunk_size: int = 8192
    max_tokens: int | None = None  # longer documents fail as "too long"; None: the model's limit
    workers: int = 0  # 0: in this process; N: a Ray Data pool of N engine actors
    device: str = "auto"
    order: str = "longest-first"
    text_field: str = "text"
    id_field: str = "id"
    ray_address: str | None = None  # None: join a running cluster if there is one, else start one
    # how text documents become token ids (workers/prompts.py)
    chat_template: bool = False  # each text document as one user message, in the model's chat template
    add_generation_prompt: bool = True  # with chat_template: end with the assistant header
    add_special_tokens: bool | None = None  # None: True for plain text, False with chat_template

    @property
    def special_tokens(self) -> bool:
        """add_special_tokens as it applies: the tokenizer's default (True) for plain text unless
        told otherwise; never with the chat template, which writes them itself."""
        return not self.chat_template if self.add_special_tokens is None else self.add_special_tokens

    def validate(self) -> BatchOptions:
        """Raise BatchOptionError naming the first bad option; return self."""
        source = Path(self.input)
        if not source.exists():
            raise BatchOptionError("--input", f"{source} does not exist")
        if not source.is_dir() and source.suffix not in INPUT_SUFFIXES:
            raise BatchOptionError(
                "--input", f"{source} must be a folder or a {'/'.join(INPUT_SUFFIXES)} file"
            )
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise BatchOptionError("--output", f"{self.output} exists and is not a folder")
        if not self.emit or any(kind not in EMIT_KINDS for kind in self.emit):
            raise BatchOptionError(
                "--emit", f"must be a comma list of {','.join(EMIT_KINDS)}, got {self.emit!r}"
            )
        if self.model is not None and not Path(self.model).exists():
            raise BatchOptionError("--model", f"{self.model} does not exist")
        if self.attention not in ("proxy", "dense"):
            raise BatchOptionError("--attention", f"must be proxy or dense, got {self.attention!r}")
        if not isinstance(self.proxy, ProxyAttnConfig):
            raise BatchOptionError("proxy", f"must be a ProxyAttnConfig, got {type(self.proxy).__name__}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise BatchOptionError("--chunk-size", f"must be a positive integer, got {self.chunk_size!r}")
        if self.attention == "proxy" and self.chunk_size % self.proxy.block_size:
            raise BatchOptionError(
                "--chunk-size",
                f"{self.chunk_size} must be a multiple of --block-size ({self.proxy.block_size})",
            )
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise BatchOptionError("--max-tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise BatchOptionError(
                "--workers", f"must be 0 (in-process) or a positive count, got {self.workers!r}"
            )
        if self.device not in DEVICES:
            raise BatchOptionError("--device", f"must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and self.workers == 0 and not torch.cuda.is_available():
            raise BatchOptionError("--device", "cuda asked for, but this process sees no CUDA device")
        if self.order not in ORDERS:
            raise BatchOptionError("--order", f"must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.ray_address is not None and self.workers == 0:
            raise BatchOptionError("--ray-address", "needs --workers >= 1 (workers 0 runs in this process)")
        if self.chat_template and self.add_special_tokens:
            raise BatchOptionError(
                "--add-special-tokens",
                "must be false with --chat-template: the chat template writes the special tokens itself",
            )
        if not self.chat_template and not self.add_generation_prompt:
            raise BatchOptionError("--no-generation-prompt", "applies only with --chat-template")
        return self


# progress ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProgress:
    """Where this run stands (documents skipped as already done are not counted)."""

    documents_done: int
    documents_total: int
    documents_failed: int
    tokens_done: int
    tokens_total: int
    elapsed_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_done / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Remaining tokens at this run's rate so far; None before the first document ends."""
        if not self.tokens_done:
            return None
        return (self.tokens_total - self.tokens_done) / self.tokens_per_second

    def describe(self) -> str:
        eta = "?" if self.eta_seconds is None else f"{self.eta_seconds:.0f} s"
        return (
            f"{self.documents_done}/{self.documents_total} documents ({self.documents_failed} failed), "
            f"{self.tokens_done}/{self.tokens_total} tokens, {self.tokens_per_second:.0f} tokens/s, ETA {eta}"
        )


def print_progress(progress: BatchProgress) -> None:
    """The default progress callback: one line on stderr per finished document."""
    print(f"batch: {progress.describe()}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BatchSummary:
    """What a run did: documents found in the input, skipped (already in the manifest), written
    and failed by this run; the tokens of the documents it wrote, and its wall time."""

    documents_found: int
    documents_skipped: int
    documents_written: int
    documents_failed: int
    tokens: int
    seconds: float
    manifest: str


# the work ------------------------------------------------------------------------------------
@dataclass
class WorkItem:
    """One tokenised document waiting for its prefill."""

    doc_id: str
    token_ids: np.ndarray  # int64 [N]


class DocumentProcessor:
    """Runs one work item through an engine and writes its files; never raises for a document's
    own problem (too long, out of memory...): that becomes a failed ManifestRecord."""

    def __init__(self, engine: PrefillEngine, options: BatchOptions, worker: str = "local"):
        self.engine = engine
        self.options = options
        self.worker = worker
        self.output = Path(options.output)

    def process(self, item: WorkItem) -> ManifestRecord:
        """prefill, then write."""
        outcome = self.prefill(item)
        return outcome if isinstance(outcome, ManifestRecord) else self.write(item, outcome)

    def prefill(self, item: WorkItem) -> PrefillResult | ManifestRecord:
        """The engine's result, or the failed record of a document that cannot run."""
        emit = self.options.emit
        try:
            return self.engine.prefill(
                item.token_ids,
                chunk_size=self.options.chunk_size,
                logits="last" if "logits" in emit else "none",
                config=self.options.proxy,
                attention=self.options.attention,
                token_nll="nll" in emit,
            )
        except PrefillError as exc:
            return ManifestRecord.failed(item.doc_id, str(exc), num_tokens=len(item.token_ids))
        except torch.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            return ManifestRecord.failed(item.doc_id, f"out of memory: {exc}", num_tokens=len(item.token_ids))

    def write(self, item: WorkItem, result: PrefillResult) -> ManifestRecord:
        """Write the files `emit` asks for (each atomically); the document's written record."""
        emit = self.options.emit
        stem = file_stem(item.doc_id)
        record = ManifestRecord(doc_id=item.doc_id, status="written", num_tokens=result.num_tokens)
        header = {HEADER_KEY: result.header.to_json()}
        if "kv" in emit:
            record.kv_file = self._path("kv", stem)
            write_atomically(self.output / record.kv_file, lambda temp: save_kv(temp, result))
        if "nll" in emit:
            record.nll_file = self._path("nll", stem)
            save_tensors(self.output / record.nll_file, {"token_nll": result.token_nll}, header)
        if "logits" in emit:
            record.logits_file = self._path("logits", stem)
            save_tensors(self.output / record.logits_file, {"last_logits": result.logits[-1]}, header)
        if "stats" in emit:
            record.stats = self._stats(result)
        return record

    def _path(self, kind: str, stem: str) -> str:
        (self.output / kind).mkdir(parents=True, exist_ok=True)
        return f"{kind}/{stem}.safetensors"

    def _stats(self, result) -> DocumentStats:
        return DocumentStats(
            num_tokens=result.num_tokens,
            seconds=result.total_seconds,
            estimate_seconds=result.estimate_seconds,
            attention_seconds=result.attention_seconds,
            tokens_per_second=result.num_tokens / result.total_seconds if result.total_seconds else 0.0,
            mean_sparsity=float(result.sparsity.mean()),
            layer_sparsity=[round(float(s), 6) for s in result.sparsity.mean(dim=1)],
            attention=result.attention,
            worker=self.worker,
        )


def load_engine(options: BatchOptions) -> PrefillEngine:
    device = None if options.device == "auto" else options.device
    return PrefillEngine.from_pretrained(
        options.model, attention=options.attention, config=options.proxy, device=device
    )


@dataclass
class Plan:
    """The work of a run, in the order to run it, and what the input held besides."""

    items: list[WorkItem]
    documents_found: int
    documents_skipped: int  # already in the manifest
    documents_failed: int  # failed before any prefill (unreadable, empty, too long, duplicate id)


def plan_work(options: BatchOptions, manifest: Manifest, tokenizer) -> Plan:
    """Read and tokenise the input; documents that cannot run get their failed manifest line here.
    A chat template asked for on a model without one is refused before any document is read."""
    prompts = None if tokenizer is None else PromptEncoder(tokenizer)
    if options.chat_template and (prompts is None or not prompts.has_chat_template):
        raise BatchOptionError("--chat-template", "the model's tokenizer has no chat template")
    plan, seen = Plan([], 0, 0, 0), set()
    for doc in read_documents(options.input, options.text_field, options.id_field):
        plan.documents_found += 1
        if doc.doc_id in manifest:
            plan.documents_skipped += 1
            seen.add(doc.doc_id)
            continue
        if doc.doc_id in seen:
            error, ids = "duplicate id: an earlier document has it", None
        else:
            seen.add(doc.doc_id)
            ids, error = _token_ids(doc, prompts, options)
        if error:
            plan.documents_failed += 1
            manifest.append(
                ManifestRecord.failed(doc.doc_id, error, num_tokens=None if ids is None else len(ids))
            )
        else:
            plan.items.append(WorkItem(doc.doc_id, ids))
    if options.order == "longest-first":
        plan.items.sort(key=lambda item: -len(item.token_ids))  # stable: ties keep input order
    return plan


def _token_ids(
    doc, prompts: PromptEncoder | None, options: BatchOptions
) -> tuple[np.ndarray | None, str | None]:
    if doc.error:
        return None, doc.error
    if doc.token_ids is not None:
        ids = doc.token_ids
    elif prompts is None:
        return None, "the model has no tokenizer: give this document as token_ids"
    elif not doc.text.strip():
        return None, "empty document: no text"
    elif options.chat_template:
        try:
            ids = prompts.encode_chat([ChatMessage("user", doc.text)], options.add_generation_prompt)
        except PromptError as exc:  # the template refused it
            return None, f"chat template: {exc}"
    else:
        ids = prompts.encode_text(doc.text, options.special_tokens)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size == 0:
        return ids, "empty document: no tokens"
    if options.max_tokens is not None and ids.size > options.max_tokens:
        return ids, f"too long: {ids.size} tokens, --max-tokens is {options.max_tokens}"
    return ids, None


def _overlap_writes(processor: DocumentProcessor, items: list[WorkItem]) -> Iterator[ManifestRecord]:
    """Records in item order; each document's files are written on a thread while the engine
    runs the next one, so the device does not wait on the disk. At most one write is pending
    (its result, KV included, stays in memory until written)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-writer") as writer:
        pending: Future | None = None
        for item in items:
            outcome = processor.prefill(item)
            if pending is not None:
                yield pending.result()
                pending = None
            if isinstance(outcome, ManifestRecord):
                yield outcome
            else:
                pending = writer.submit(processor.write, item, outcome)
            del outcome
        if pending is not None:
            yield pending.result()


def run_batch(
    options: BatchOptions,
    on_progress: Callable[[BatchProgress], None] | None = print_progress,
    engine: PrefillEngine | None = None,
) -> BatchSummary:
    """Run the job described by `options` (validated first); see the module docstring.
    on_progress gets a BatchProgress after every finished document (None: silent). `engine`, with
    workers=0, is an engine already loaded in this process (then options.model is not loaded)."""
    options.validate()
    started = time.perf_counter()
    output = Path(options.output)
    output.mkdir(parents=True, exist_ok=True)
    remove_partial_files(output)
    manifest = Manifest.open(output)
    if engine is not None and options.workers:
        raise BatchOptionError("--workers", "an engine given in-process needs workers=0")
    if options.workers == 0:
        engine = engine or load_engine(options)
        plan = plan_work(options, manifest, engine.tokenizer)
        records = _overlap_writes(DocumentProcessor(engine, options), plan.items)
    else:
        from . import batch_ray

        plan = plan_work(options, manifest, batch_ray.load_tokenizer(options.model))
        records = batch_ray.process_with_ray_data(options, plan.items)
    done = failed = tokens_done = tokens_written = 0
    tokens_total = sum(len(item.token_ids) for item in plan.items)
    run_started = time.perf_counter()
    for record in records:  # one process appends to the manifest, as documents finish
        manifest.append(record)
        done += 1
        failed += record.status == "failed"
        tokens_done += record.num_tokens or 0
        tokens_written += (record.num_tokens or 0) if record.status == "written" else 0
        if on_progress is not None:
            elapsed = time.perf_counter() - run_started
            on_progress(BatchProgress(done, len(plan.items), failed, tokens_done, tokens_total, elapsed))
    return BatchSummary(
        documents_found=plan.documents_found,
        documents_skipped=plan.documents_skipped,
        documents_written=done - failed,
        documents_failed=plan.documents_failed + failed,
        tokens=tokens_written,
        seconds=time.perf_counter() - started,
        manifest=os.fspath(manifest.path),
    )
