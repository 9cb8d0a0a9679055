"""The batch job on real weights (SmolLM2, text documents from a folder) and on a two-node local
Ray cluster (`ray start --head` plus a second `ray start --address` node on this machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_batch import CHUNK, PROXY, manifest_records, random_docs, write_jsonl

from proxyprefill.kernels.config import ProxyAttnConfig
from proxyprefill.workers.batch import BatchOptions, run_batch
from proxyprefill.workers.engine import PrefillEngine
from proxyprefill.workers.kv_files import load_kv

pytestmark = pytest.mark.slow

SHORT = "The river rose in the night, and by morning the lower fields were a single sheet of grey water."


def test_smollm2_folder_outputs_match_the_engine_and_a_plain_forward(tmp_path):
    from transformers import AutoModelForCausalLM

    from proxyprefill.workers.model import default_model_dir

    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "short.txt").write_text(SHORT)
    (folder / "long.txt").write_text(" ".join([SHORT] * 20))
    (folder / "broken.txt").write_bytes(b"na\xefve latin-1 text")
    config = ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0)
    options = BatchOptions(input=str(folder), output=str(tmp_path / "out"), proxy=config, chunk_size=128)
    summary = run_batch(options, on_progress=None)
    assert (summary.documents_written, summary.documents_failed) == (2, 1)
    records = manifest_records(tmp_path / "out")
    assert records["broken.txt"].error.startswith("bad encoding")

    engine = PrefillEngine.from_pretrained(None, attention="proxy", config=config, device="cpu")
    for name in ("short.txt", "long.txt"):
        ids = engine.tokenizer.encode((folder / name).read_text())
        expected = engine.prefill(ids, chunk_size=128, logits="last", token_nll=True)
        kv = load_kv(tmp_path / "out" / records[name].kv_file, expect=engine)
        assert kv.token_ids.tolist() == ids
        for got, want in zip(kv.keys + kv.values, expected.keys + expected.values, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nll = load_file(tmp_path / "out" / records[name].nll_file)["token_nll"]
        torch.testing.assert_close(nll, expected.token_nll, rtol=1e-5, atol=1e-5)
    assert records["long.txt"].stats.mean_sparsity > 0  # ProxyAttn skipped blocks on the long one

    stock = AutoModelForCausalLM.from_pretrained(default_model_dir(), attn_implementation="eager").eval()
    ids = torch.tensor(engine.tokenizer.encode(SHORT))
    with torch.no_grad():
        full = torch.log_softmax(stock(ids[None]).logits[0].double(), dim=-1)
    reference = -full[:-1].gather(1, ids[1:, None])[:, 0]
    nll = load_file(tmp_path / "out" / records["short.txt"].nll_file)["token_nll"]
    torch.testing.assert_close(nll.double(), reference, rtol=1e-4, atol=1e-4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ray_node(args: list[str], log: Path) -> subprocess.Popen:
    """`ray start --block ...` in its own process group (so teardown ends exactly its processes)."""
    ray = Path(sys.executable).with_name("ray")
    command = [str(ray), "start", "--block", "--num-cpus=1", *args]
    return subprocess.Popen(
        command,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=ray_env(),
    )


def ray_env() -> dict:
    """The environment of the nodes and the job: Ray's token authentication off (a head started
    with it on refuses a node or job that lacks the token), usage stats off, and a patient agent
    start on a loaded machine."""
    return dict(
        os.environ,
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_agent_register_timeout_ms="300000",
    )


def wait_started(node: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    from _support import wait_for

    assert wait_for(lambda: "Ray runtime started" in log.read_text() or node.poll() is not None, seconds)
    assert node.poll() is None, log.read_text()[-2000:]


def stop_ray_node(node: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture
def two_node_cluster(tmp_path):
    """A head and a worker node, one CPU each, on this machine; yields the head's address."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp_dir = Path("/tmp") / f"pp-ray-{os.getpid()}-{port}"  # short: Ray's socket paths have a limit
    head_log, worker_log = tmp_path / "head.log", tmp_path / "worker.log"
    head = start_ray_node(
        ["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false"], head_log
    )
    nodes = [head]
    try:
        wait_started(head, head_log)
        nodes.append(start_ray_node([f"--address={address}"], worker_log))
        wait_started(nodes[1], worker_log)
        yield address
    finally:
        for node in reversed(nodes):
            stop_ray_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_two_node_ray_cluster_runs_the_same_job(tmp_path, two_node_cluster):
    from _support import save_tiny_llama

    model_dir = tmp_path / "model"
    save_tiny_llama(model_dir, num_layers=2, max_position_embeddings=1024)
    docs = random_docs([260, 230, 200, 170, 140, 110, 80, 50], seed=3)
    source = write_jsonl(tmp_path / "docs.jsonl", [*docs, {"id": "bad", "token_ids": [1, 999]}])
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "proxyprefill.cli", "batch", "--input", str(source), "--output", str(output),
        "--model", str(model_dir), "--chunk-size", str(CHUNK), "--block-size", "16",
        "--min-budget-tokens", "0", "--dense-below-tokens", "0", "--device", "cpu",
        "--workers", "2", "--ray-address", two_node_cluster,
    ]  # fmt: skip
    job = subprocess.run(command, capture_output=True, text=True, timeout=420, env=ray_env())
    assert job.returncode == 0, job.stderr[-3000:]
    assert "8 written, 1 failed" in job.stdout

    records = manifest_records(output)
    assert "outside the vocabulary" in records["bad"].error
    nodes = {records[d["id"]].stats.worker.split("/")[0] for d in docs}
    # Ray places the two actors where it likes, and one may take every (small) document
    # before the other has started, so only the count is bounded here
    assert 1 <= len(nodes) <= 2, f"documents ran on {nodes}"
    engine = PrefillEngine.from_pretrained(model_dir, attention="proxy", config=PROXY, device="cpu")
    for doc in docs:
        expected = engine.prefill(doc["token_ids"], chunk_size=CHUNK, logits="last", token_nll=True)
        kv = load_kv(output / records[doc["id"]].kv_file, expect=engine)
        for got, want in zip(kv.keys + kv.values, expected.keys + expected.values, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        nll = load_file(output / records[doc["id"]].nll_file)["token_nll"]
        torch.testing.assert_close(nll, expected.token_nll, rtol=1e-5, atol=1e-5)
    lines = (output / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 9 and all(json.loads(line)["status"] in ("written", "failed") for line in lines)
