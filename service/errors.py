"""What the handlers raise, and how a failed worker call becomes a status."""

from __future__ import annotations

import logging

import grpc

from .admission import AdmissionError
from .auth import AuthError
from .leases import LeaseError
from .validation import RequestError

log = logging.getLogger("proxyprefill.service")

# the errors a handler answers with their own status (anything else is a bug: INTERNAL)
REQUEST_ERRORS = (RequestError, LeaseError, AdmissionError, AuthError)


class WorkerGone(Exception):
    """The worker no longer holds the KV asked for (released, or it restarted)."""


def worker_error(error: Exception) -> RequestError:
    """A worker that died answers UNAVAILABLE (retryable); anything else INTERNAL."""
    name = type(error).__name__
    if "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name:
        log.warning("worker lost: %s", error)
        return RequestError(grpc.StatusCode.UNAVAILABLE, "the worker was lost; retry the request")
    log.error("worker call failed: %s: %s", name, error)
    return RequestError(grpc.StatusCode.INTERNAL, f"worker call failed: {name}")
