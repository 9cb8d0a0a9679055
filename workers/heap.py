"""glibc's malloc, set for a process that allocates the same large buffers on every request.

By default glibc serves an allocation above its mmap threshold (128 KiB at start, raised as large
blocks are freed, to at most 32 MiB) with a fresh mmap, and hands the top of its heap back to the
kernel once more than twice that threshold lies free there. A request's token ids (128-256 KB at
32k tokens), its logits row (256-513 KB at a 128k vocabulary) and their pickles and protobuf
copies sit right at that edge: what one request freed was handed back, and the next one faulted
every page of it in again. On an H200 host that was 1-1.5 ms of the server's work on a 32k request
with a logits row (bench/fixed_cost_timeline.py; BENCHMARKS.md, "The fixed cost, seam by seam").

`keep_freed_memory()` fixes both thresholds for the process: blocks up to 32 MiB come from the
heap, and up to 256 MiB free at its top stays mapped for the next request. The price is a resident
size that stays near its peak rather than shrinking after it (what it keeps is reused, not
leaked). The server and every worker call it at start. A process started with
MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ in its environment keeps what those say, and
anything but glibc is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("proxyprefill")

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its moving threshold
TRIM_THRESHOLD_BYTES = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Sets this process's malloc thresholds (see the module docstring); True when it did."""
    if any(name in os.environ for name in _ENVIRONMENT):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): their allocators differ
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and done
    if not done:
        log.warning("malloc thresholds not set: mallopt refused them")
    return done
