"""SIGTERM while `proxyprefill serve` is still starting (Ray up, workers loading the model): the
process shuts its workers and Ray down and exits 0, leaving no Ray process behind (defect 11: it
died of the signal and its Ray processes ran on for about a minute)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def processes_with_environment(marker: str, exclude: int) -> list[int]:
    """Ids of this user's processes whose environment holds `marker` (Ray's processes inherit the
    environment of the server that started them)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def wait_until(predicate, seconds: float) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_sigterm_during_startup_stops_ray_and_exits_cleanly(tmp_path):
    if not Path("/proc/self/environ").exists():
        pytest.skip("needs Linux /proc")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="/tmp/pps")  # short: Ray's socket paths must stay < 108 bytes
    marker = f"RAY_TMPDIR={ray_tmp}"
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "proxyprefill.cli", "serve", "--listen", f"127.0.0.1:{port}",
             "--num-workers", "1", "--ray-num-cpus", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, RAY_TMPDIR=ray_tmp),
        )  # fmt: skip
    try:
        # start-up: Ray's own processes are running; the server is not yet serving
        assert wait_until(lambda: processes_with_environment(marker, process.pid), 120), log_path.read_text()
        assert "serving" not in log_path.read_text()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=240) == 0, log_path.read_text()[-3000:]
        left = lambda: processes_with_environment(marker, process.pid)  # noqa: E731
        assert wait_until(lambda: not left(), 15), (left(), log_path.read_text()[-2000:])
        assert "during start-up" in log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in processes_with_environment(marker, process.pid):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
