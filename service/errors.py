"""The one error type the service answers with a gRPC status, and how a failed worker call becomes one.

Every refusal (a malformed request, admission's back-pressure, a lease that is gone, a caller
without a valid token) is a `ServiceError` carrying the status code and a message that names the
field or the reason. The handlers turn it into that status at the edge of each RPC (anything else
is a bug: INTERNAL); the subclasses (validation.RequestError, admission.AdmissionError,
leases.LeaseError, auth.AuthError) only say which part of the service refused.
"""

from __future__ import annotations

import logging

import grpc

from proxyprefill.workers.channel import WorkerChannelLost

log = logging.getLogger("proxyprefill.service")


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerGone(Exception):
    """The worker no longer holds the KV asked for (released, or it restarted)."""


def worker_error(error: Exception) -> ServiceError:
    """A worker that died answers UNAVAILABLE (retryable); anything else INTERNAL."""
    name = type(error).__name__
    ray_lost = "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name
    if ray_lost or isinstance(error, WorkerChannelLost):
        log.warning("worker lost: %s", error)
        return ServiceError(grpc.StatusCode.UNAVAILABLE, "the worker was lost; retry the request")
    log.error("worker call failed: %s: %s", name, error)
    return ServiceError(grpc.StatusCode.INTERNAL, f"worker call failed: {name}")
