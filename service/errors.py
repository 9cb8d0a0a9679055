"""The one error type the service answers with a gRPC status.

Every refusal (a malformed request, admission's back-pressure, a lease that is gone, a caller
without a valid token) is a `ServiceError` carrying the status code and a message that names the
field or the reason. The server turns it into that status at the edge of each RPC; the subclasses
only say which part of the service refused.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
