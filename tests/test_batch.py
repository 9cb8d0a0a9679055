"""The batch job in this process (`workers=0`) on a tiny random Llama (CPU, float32): outputs
against a per-document engine run and a plain transformers forward, broken documents in the
manifest, option errors naming their flag, the readers, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import save_tiny_llama, tiny_chat_tokenizer, wait_for

from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.workers.batch import BatchOptionError, BatchOptions, BatchProgress, run_batch
from proxyprefill.workers.batch_io import MANIFEST_NAME, ManifestRecord, read_documents
from proxyprefill.workers.engine import PrefillEngine
from proxyprefill.workers.kv_files import load_kv

PROXY = ProxyAttnConfig(block_size=16, min_budget_tokens=0, dense_below_tokens=0)
CHUNK = 64
MAX_POSITIONS = 1024


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(path, num_layers=2, max_position_embeddings=MAX_POSITIONS)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w") as handle:
        for row in rows:
            handle.write(row if isinstance(row, str) else json.dumps(row))
            handle.write("\n")
    return path


def random_docs(lengths, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"doc-{i}", "token_ids": rng.integers(0, 256, n).tolist()} for i, n in enumerate(lengths)]


def options(tmp_path, model_dir, source, **changes) -> BatchOptions:
    fields = dict(
        input=str(source), output=str(tmp_path / "out"), model=str(model_dir), proxy=PROXY, chunk_size=CHUNK
    )
    fields.update(changes)
    return BatchOptions(**fields)


def manifest_records(output: Path) -> dict[str, ManifestRecord]:
    lines = (output / MANIFEST_NAME).read_text().splitlines()
    records = [ManifestRecord.from_json(line) for line in lines]
    return {r.doc_id: r for r in records}


def test_outputs_equal_a_per_document_engine_run(tmp_path, tiny_model_dir):
    docs = random_docs([70, 150, 33])
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    seen: list[BatchProgress] = []
    summary = run_batch(options(tmp_path, tiny_model_dir, source), on_progress=seen.append)
    assert (summary.documents_found, summary.documents_written, summary.documents_failed) == (3, 3, 0)
    assert summary.tokens == 70 + 150 + 33
    # progress after every document, ending complete; longest first
    assert [p.documents_done for p in seen] == [1, 2, 3]
    assert [p.tokens_done for p in seen] == [150, 220, 253]
    assert seen[-1].tokens_total == 253 and seen[-1].eta_seconds == 0

    engine = PrefillEngine.from_pretrained(tiny_model_dir, attention="proxy", config=PROXY, device="cpu")
    stock = engine.model  # the same weights, run whole-prompt by transformers below
    records = manifest_records(tmp_path / "out")
    for doc in docs:
        record = records[doc["id"]]
        assert record.status == "written" and record.num_tokens == len(doc["token_ids"])
        expected = engine.prefill(doc["token_ids"], chunk_size=CHUNK, logits="last", token_nll=True)
        kv = load_kv(tmp_path / "out" / record.kv_file, expect=engine)
        assert kv.header == expected.header
        for got, want in zip(kv.keys + kv.values, expected.keys + expected.values, strict=True):
            assert torch.equal(got, want)
        from safetensors.torch import load_file

        nll = load_file(tmp_path / "out" / record.nll_file)["token_nll"]
        assert torch.equal(nll, expected.token_nll)
        logits = load_file(tmp_path / "out" / record.logits_file)["last_logits"]
        assert torch.equal(logits, expected.logits[-1])
        assert record.stats.num_tokens == len(doc["token_ids"])
        assert len(record.stats.layer_sparsity) == 2 and 0.0 <= record.stats.mean_sparsity <= 1.0

    # the NLL is the log-softmax of the full logits of a plain forward (eager attention, whole prompt)
    ids = torch.tensor(docs[2]["token_ids"])
    stock.set_attn_implementation("eager")
    with torch.no_grad():
        full = torch.log_softmax(stock(ids[None]).logits[0].double(), dim=-1)
    reference = -full[:-1].gather(1, ids[1:, None])[:, 0]
    nll = load_file(tmp_path / "out" / records["doc-2"].nll_file)["token_nll"]
    torch.testing.assert_close(nll.double(), reference, rtol=1e-4, atol=1e-4)


def test_broken_documents_are_reported_and_the_rest_complete(tmp_path, tiny_model_dir):
    good = random_docs([40, 90], seed=1)
    rows = [
        good[0],
        "{not json",
        {"id": "out-of-vocab", "token_ids": [1, 2, 999]},
        {"id": "too-long", "token_ids": [1] * 300},
        {"id": "empty", "token_ids": []},
        {"id": "text-without-tokenizer", "text": "hello"},
        {"id": "no-text"},
        {"id": "doc-0", "token_ids": [1, 2, 3]},  # a duplicate id
        "",  # a blank line is not a document
        good[1],
    ]
    source = write_jsonl(tmp_path / "docs.jsonl", rows)
    summary = run_batch(options(tmp_path, tiny_model_dir, source, max_tokens=200), on_progress=None)
    assert (summary.documents_found, summary.documents_written, summary.documents_failed) == (9, 2, 7)
    records = manifest_records(tmp_path / "out")
    errors = {doc_id: r.error for doc_id, r in records.items() if r.status == "failed"}
    assert "bad JSON on line 2" in errors["line-2"]
    assert "outside the vocabulary" in errors["out-of-vocab"]
    assert "too long: 300 tokens" in errors["too-long"]
    assert "empty document" in errors["empty"]
    assert "no tokenizer" in errors["text-without-tokenizer"]
    assert "no 'text' string" in errors["no-text"]
    lines = (tmp_path / "out" / MANIFEST_NAME).read_text().splitlines()
    assert any("duplicate id" in line for line in lines)
    assert records["doc-0"].status == "written" and records["doc-1"].status == "written"
    assert len(lines) == 9  # every document has its line, the duplicate too


def test_readers_report_unreadable_documents(tmp_path):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document")
    (folder / "sub" / "b.txt").write_bytes(b"caf\xe9 latin-1")
    (folder / ".hidden").write_text("skipped")
    docs = list(read_documents(folder))
    assert [d.doc_id for d in docs] == ["a.txt", "sub/b.txt"]
    assert docs[0].text == "first document" and docs[0].error is None
    assert docs[1].text is None and docs[1].error.startswith("bad encoding")

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"name": ["x", "y", None], "body": ["one", None, "three"]})
    pq.write_table(table, tmp_path / "docs.parquet")
    docs = list(read_documents(tmp_path / "docs.parquet", text_field="body", id_field="name"))
    assert [(d.doc_id, d.text) for d in docs] == [("x", "one"), ("y", None), ("row-3", "three")]
    assert "no 'body' string" in docs[1].error

    raw = tmp_path / "docs.jsonl"
    raw.write_bytes(b'{"id": "ok", "text": "fine"}\n\xff\xfe\n[1, 2]\n{"token_ids": [1, "x"]}\n')
    docs = list(read_documents(raw))
    assert docs[0].text == "fine"
    assert docs[1].error.startswith("bad encoding: line 2")
    assert "not an object" in docs[2].error
    assert docs[3].doc_id == "line-4" and "list of integers" in docs[3].error


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"input": "/nonexistent/docs.jsonl"}, "--input"),
        ({"emit": ("kv", "attention-maps")}, "--emit"),
        ({"emit": ()}, "--emit"),
        ({"chunk_size": 40}, "--chunk-size"),
        ({"chunk_size": 0}, "--chunk-size"),
        ({"workers": -1}, "--workers"),
        ({"device": "tpu"}, "--device"),
        ({"order": "random"}, "--order"),
        ({"max_tokens": 0}, "--max-tokens"),
        ({"attention": "sliding"}, "--attention"),
        ({"model": "/nonexistent/model"}, "--model"),
        ({"ray_address": "auto"}, "--ray-address"),
    ],
)
def test_invalid_options_name_their_flag(tmp_path, tiny_model_dir, changes, flag):
    source = write_jsonl(tmp_path / "docs.jsonl", random_docs([10]))
    with pytest.raises(BatchOptionError) as error:
        run_batch(options(tmp_path, tiny_model_dir, source, **changes))
    assert error.value.flag == flag and str(error.value).startswith(flag)
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.fixture(scope="module")
def tiny_chat_model_dir(tmp_path_factory):
    """The tiny Llama with a Llama-shaped tokenizer: BOS on plain text, a chat template."""
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    save_tiny_llama(path, num_layers=1, max_position_embeddings=MAX_POSITIONS)
    tiny_chat_tokenizer(path)
    return path


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"add_special_tokens": False},
        {"chat_template": True},
        {"chat_template": True, "add_generation_prompt": False},
    ],
)
def test_text_documents_are_tokenised_as_asked(tmp_path, tiny_chat_model_dir, changes):
    texts = {"short": "w1 w2", "long": "w3 w4 w5 w6 w7 w8", "middle": "w9 w10 w11"}
    source = write_jsonl(tmp_path / "docs.jsonl", [{"id": i, "text": t} for i, t in texts.items()])
    job = options(tmp_path, tiny_chat_model_dir, source, emit=("kv",), **changes)
    summary = run_batch(job, on_progress=None)
    assert summary.documents_written == len(texts)

    tokenizer = tiny_chat_tokenizer()
    for doc_id, text in texts.items():
        if job.chat_template:
            expected = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}],
                tokenize=True,
                add_generation_prompt=job.add_generation_prompt,
                return_dict=False,
            )
        else:
            expected = tokenizer(text, add_special_tokens=job.special_tokens)["input_ids"]
        record = manifest_records(tmp_path / "out")[doc_id]
        kv = load_kv(tmp_path / "out" / record.kv_file)
        assert kv.token_ids.tolist() == list(expected), doc_id
        bos_count = 0 if changes == {"add_special_tokens": False} else 1  # from the tokenizer or the template
        assert kv.token_ids.tolist().count(1) == bos_count


def test_chat_template_options_are_checked_before_any_document(tmp_path, tiny_model_dir, capsys):
    from proxyprefill.cli import main

    source = write_jsonl(tmp_path / "docs.jsonl", [{"id": "a", "text": "w1"}])
    with pytest.raises(BatchOptionError) as error:  # this model has no tokenizer, so no template
        run_batch(options(tmp_path, tiny_model_dir, source, chat_template=True), on_progress=None)
    assert error.value.flag == "--chat-template"
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    for flags, flag in [
        (["--chat-template", "--add-special-tokens", "true"], "--add-special-tokens"),
        (["--no-generation-prompt"], "--no-generation-prompt"),
    ]:
        assert main(["batch", "--input", str(source), "--output", str(tmp_path / "o"), *flags]) == 2
        assert flag in capsys.readouterr().err


def test_cli_rejects_a_bad_flag_by_name(tmp_path, capsys):
    from proxyprefill.cli import main

    source = write_jsonl(tmp_path / "docs.jsonl", random_docs([10]))
    code = main(["batch", "--input", str(source), "--output", str(tmp_path / "o"), "--gamma", "1.5"])
    assert code == 2
    assert "--gamma" in capsys.readouterr().err


def run_cli_batch(source: Path, output: Path, model_dir: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "proxyprefill.cli", "batch", "--input", str(source), "--output", str(output),
        "--model", str(model_dir), "--chunk-size", str(CHUNK), "--block-size", "16",
        "--min-budget-tokens", "0", "--dense-below-tokens", "0", "--device", "cpu",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def written_lines(output: Path) -> int:
    path = output / MANIFEST_NAME
    return path.read_text().count('"written"') if path.exists() else 0


@pytest.mark.slow  # a subprocess that loads torch and the model, killed, then a rerun
def test_a_killed_job_resumes_with_only_the_missing_documents(tmp_path, tiny_model_dir):
    docs = random_docs([200 - 10 * i for i in range(10)], seed=2)
    source = write_jsonl(tmp_path / "docs.jsonl", docs)
    output = tmp_path / "out"
    job = run_cli_batch(source, output, tiny_model_dir)
    try:
        assert wait_for(lambda: written_lines(output) >= 2 or job.poll() is not None, seconds=180)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    done_before = set(manifest_records(output))
    assert 2 <= len(done_before) < len(docs), "the kill should land mid-run"

    summary = run_batch(options(tmp_path, tiny_model_dir, source, device="cpu"), on_progress=None)
    # only the missing documents ran: the one in flight at the kill and those never started
    assert summary.documents_skipped == len(done_before)
    assert summary.documents_written == len(docs) - len(done_before)
    lines = (output / MANIFEST_NAME).read_text().splitlines()
    ids = [ManifestRecord.from_json(line).doc_id for line in lines]
    assert sorted(ids) == sorted(d["id"] for d in docs)  # each exactly once
    assert not list(output.glob("*/.partial-*"))
    records = manifest_records(output)
    for doc in docs:
        kv = load_kv(output / records[doc["id"]].kv_file)
        assert kv.token_ids.tolist() == doc["token_ids"]
