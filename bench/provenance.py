"""Which commit a benchmark measured, for the results JSON.

On the device machines the repository arrives as a copied working tree whose `.git` can be older
than the files beside it, so GIT_COMMIT (set by whoever starts the run, e.g.
`GIT_COMMIT=$(git rev-parse HEAD)`) wins over what git reports there.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """GIT_COMMIT when set, else the HEAD of the repository holding bench/, else None."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
