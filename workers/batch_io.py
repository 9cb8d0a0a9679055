"""What a batch job reads and writes: input documents, per-document output files, the manifest.

Inputs (one document each):
- a JSON Lines file (`.jsonl`): one object per line with a text field (default "text") or a
  `token_ids` list of integers (pre-tokenised), and optionally an id field (default "id");
- a Parquet file (`.parquet`): the same fields as columns;
- a folder: every regular file below it (hidden ones excepted) is one UTF-8 text document whose
  id is its path relative to the folder.

A document that cannot be read (bad JSON, bad UTF-8, no text) still comes out as a `Document`
carrying its error, so that the manifest records it: nothing is dropped silently.

Outputs go to the output folder, one file per document and kind, each written to a temporary
name and renamed into place, so a file that exists is complete. The manifest (`manifest.jsonl`)
gets one line per document once its files are in place: a rerun skips the documents it lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

MANIFEST_NAME = "manifest.jsonl"
INPUT_SUFFIXES = (".jsonl", ".parquet")
TEMP_MARK = ".partial-"


@dataclass
class Document:
    """One input document: its text or its token ids, or the reason it could not be read."""

    doc_id: str
    text: str | None = None
    token_ids: list[int] | None = None
    error: str | None = None


@dataclass
class DocumentStats:
    """What one document's prefill cost and how sparse its attention was."""

    num_tokens: int
    seconds: float
    estimate_seconds: float
    attention_seconds: float
    tokens_per_second: float
    mean_sparsity: float
    layer_sparsity: list[float]
    attention: str
    worker: str


@dataclass
class ManifestRecord:
    """One manifest line: a document written (with its files, relative to the output folder) or
    failed (with its error)."""

    doc_id: str
    status: str  # "written" or "failed"
    num_tokens: int | None = None
    error: str | None = None
    kv_file: str | None = None
    nll_file: str | None = None
    logits_file: str | None = None
    stats: DocumentStats | None = None

    @classmethod
    def failed(cls, doc_id: str, error: str, num_tokens: int | None = None) -> ManifestRecord:
        return cls(doc_id=doc_id, status="failed", error=error, num_tokens=num_tokens)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, line: str) -> ManifestRecord:
        values = json.loads(line)
        stats = values.pop("stats", None)
        return cls(**values, stats=DocumentStats(**stats) if stats else None)


# reading -------------------------------------------------------------------------------------
def read_documents(
    path: str | os.PathLike, text_field: str = "text", id_field: str = "id"
) -> Iterator[Document]:
    """The documents of a .jsonl file, a .parquet file or a folder, in input order."""
    path = Path(path)
    if path.is_dir():
        yield from _read_folder(path)
    elif path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_field, id_field)
    elif path.suffix == ".parquet":
        yield from _read_parquet(path, text_field, id_field)
    else:
        raise ValueError(f"input {path} is neither a folder nor a {' or '.join(INPUT_SUFFIXES)} file")


def _read_folder(folder: Path) -> Iterator[Document]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts)
    )
    for file in files:
        doc_id = file.relative_to(folder).as_posix()
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Document(doc_id, error=f"bad encoding: not UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        except OSError as exc:
            yield Document(doc_id, error=f"unreadable: {exc}")
            continue
        yield Document(doc_id, text=text)


def _read_jsonl(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            fallback_id = f"line-{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Document(fallback_id, error=f"bad encoding: line {number} is not UTF-8 ({exc.reason})")
                continue
            if not line.strip():
                continue  # a blank line holds no document
            try:
                row = json.loads(line)
            except ValueError as exc:
                yield Document(fallback_id, error=f"bad JSON on line {number}: {exc}")
                continue
            if not isinstance(row, dict):
                yield Document(fallback_id, error=f"line {number} is {type(row).__name__}, not an object")
                continue
            yield _document_from_row(row, fallback_id, text_field, id_field)


def _read_parquet(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    wanted = [c for c in (id_field, text_field, "token_ids") if c in table.schema_arrow.names]
    number = 0
    for batch in table.iter_batches(columns=wanted, batch_size=256):
        for row in batch.to_pylist():
            number += 1
            text = row.get(text_field)
            if isinstance(text, bytes):
                try:
                    row[text_field] = text.decode("utf-8")
                except UnicodeDecodeError as exc:
                    doc_id = str(row.get(id_field) or f"row-{number}")
                    yield Document(doc_id, error=f"bad encoding: not UTF-8 ({exc.reason})")
                    continue
            yield _document_from_row(row, f"row-{number}", text_field, id_field)


def _document_from_row(row: dict, fallback_id: str, text_field: str, id_field: str) -> Document:
    """A Document from one JSON object or Parquet row: text or token_ids, id or the fallback."""
    raw_id = row.get(id_field)
    doc_id = fallback_id if raw_id is None else str(raw_id)
    token_ids = row.get("token_ids")
    if token_ids is not None:
        if not isinstance(token_ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in token_ids
        ):
            return Document(doc_id, error="token_ids must be a list of integers")
        return Document(doc_id, token_ids=token_ids)
    text = row.get(text_field)
    if not isinstance(text, str):
        found = "missing" if text is None else type(text).__name__
        return Document(doc_id, error=f"no {text_field!r} string ({found}) and no token_ids")
    return Document(doc_id, text=text)


# writing -------------------------------------------------------------------------------------
def file_stem(doc_id: str) -> str:
    """A file name for a document id: its safe characters (at most 60) and a hash of the whole id,
    so ids differing only in unsafe characters still get distinct files."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", doc_id).strip("._")[:60] or "doc"
    return f"{safe}-{hashlib.sha256(doc_id.encode()).hexdigest()[:12]}"


def write_atomically(path: Path, write) -> None:
    """`write(temp_path)` then rename to `path`: a file at `path` is always complete."""
    temp = path.with_name(f"{TEMP_MARK}{os.getpid()}-{path.name}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    write_atomically(path, lambda temp: save_file(cpu, os.fspath(temp), metadata=metadata))


def remove_partial_files(output: Path) -> int:
    """Delete temporary files an interrupted run left behind; returns how many."""
    leftovers = list(output.glob(f"*/{TEMP_MARK}*"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return len(leftovers)


@dataclass
class Manifest:
    """The output folder's manifest.jsonl: read once at the start, appended to (by one process,
    the driver) as documents finish. Each line is flushed and fsynced; a line cut short by a kill
    is ignored when reading, so its document is done again."""

    path: Path
    records: dict[str, ManifestRecord] = field(default_factory=dict)

    @classmethod
    def open(cls, output: Path) -> Manifest:
        manifest = cls(output / MANIFEST_NAME)
        if manifest.path.exists():
            for line in manifest.path.read_text(errors="replace").splitlines():
                try:
                    record = ManifestRecord.from_json(line)
                except (ValueError, TypeError):
                    continue
                manifest.records[record.doc_id] = record
            manifest._end_with_newline()
        return manifest

    def _end_with_newline(self) -> None:
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with self.path.open("ab") as handle:
                handle.write(b"\n")  # after a cut line, so the next record starts on its own

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.records

    def append(self, record: ManifestRecord) -> None:
        with self.path.open("a") as handle:
            handle.write(record.to_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.records[record.doc_id] = record
