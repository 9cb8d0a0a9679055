"""The audit log: one line for every event in the life of a KV handle, naming the principal that
caused it, on the logger "proxyprefill.audit" (route it to a file of its own with the standard
logging configuration):

    handle=3f9c0a1b2c3d action=created principal=alice request_id=doc-7 kv_bytes=1048576
    handle=3f9c0a1b2c3d action=fetched principal=alice layers=0-30
    handle=3f9c0a1b2c3d action=released principal=alice kv_bytes=1048576

A handle is shown by its first 12 hex digits: enough to follow one handle through its life, not
enough to use it. The principal is the bearer token's name, or the peer's address without tokens.
"""

from __future__ import annotations

import logging

log = logging.getLogger("proxyprefill.audit")

HANDLE_DIGITS_SHOWN = 12


def handle_event(handle: str, action: str, principal: str, **details: object) -> None:
    """Logs `action` ("created", "fetched", "mapped", "pushed", "renewed", "released",
    "expired") on `handle`."""
    extra = "".join(f" {key}={value}" for key, value in details.items())
    log.info("handle=%s action=%s principal=%s%s", handle[:HANDLE_DIGITS_SHOWN], action, principal, extra)
