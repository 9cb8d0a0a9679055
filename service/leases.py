"""KV leases: who may use a handle, until when, and how much memory all handles hold.

The KV tensors themselves stay on the worker that made them; this table is the server's record of
them. A prefill that will keep KV first *reserves* its estimated bytes (so concurrent prefills
cannot together overshoot the cap), then *commits* the reservation into a lease with the exact
bytes, or cancels it. Handles are 128 random bits (`secrets.token_bytes(16)`, hex) and are bound
to the principal that made them.

Status codes (gRPC): a malformed handle is INVALID_ARGUMENT; an unknown or released one NOT_FOUND;
an expired one FAILED_PRECONDITION (its KV is gone and the prompt must be prefilled again);
another principal's handle PERMISSION_DENIED; a reservation beyond the cap RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from .errors import ServiceError

HANDLE_PATTERN = re.compile(r"[0-9a-f]{32}")  # used with fullmatch: `$` would accept a trailing newline
_FORGOTTEN_LIMIT = 65536  # how many released/expired handles keep their specific error message


class LeaseError(ServiceError):
    """A lease refused: no memory left to reserve, or a handle that is malformed, unknown,
    expired, released or another caller's."""


@dataclass
class Reservation:
    nbytes: int
    active: bool = True


@dataclass
class Lease:
    handle: str
    owner: str
    worker: str
    kv_bytes: int
    num_tokens: int
    expires_at: float  # seconds since the epoch
    header: dict = field(default_factory=dict)
    last_token_id: int = -1

    @property
    def expires_at_unix_ms(self) -> int:
        return int(self.expires_at * 1000)


def new_handle() -> str:
    return secrets.token_bytes(16).hex()


class LeaseTable:
    """Thread-safe; `clock` returns seconds since the epoch (injectable for tests)."""

    def __init__(
        self,
        cap_bytes: int,
        default_seconds: int,
        max_seconds: int,
        clock: Callable[[], float] = time.time,
    ):
        self.cap_bytes = cap_bytes
        self.default_seconds = default_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._forgotten: OrderedDict[str, str] = OrderedDict()  # handle -> "released" | "expired"
        self._reserved = 0

    # memory ----------------------------------------------------------------------------------
    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(lease.kv_bytes for lease in self._leases.values())

    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    def __len__(self) -> int:
        return len(self._leases)

    def reserve(self, nbytes: int) -> Reservation:
        with self._lock:
            held = sum(lease.kv_bytes for lease in self._leases.values())
            if held + self._reserved + nbytes > self.cap_bytes:
                raise LeaseError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"KV memory cap reached: this prompt's KV needs {nbytes} bytes, {held} are held and "
                    f"{self._reserved} reserved of {self.cap_bytes}; release handles or retry later",
                )
            self._reserved += nbytes
            return Reservation(nbytes)

    def cancel(self, reservation: Reservation) -> None:
        with self._lock:
            if reservation.active:
                reservation.active = False
                self._reserved -= reservation.nbytes

    def lease_seconds(self, requested: int) -> int:
        """0 means the default; beyond the maximum is an error (the client asked for a promise
        the server will not keep)."""
        if requested == 0:
            return self.default_seconds
        if requested > self.max_seconds:
            raise LeaseError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"lease_seconds must be <= {self.max_seconds}, got {requested}",
            )
        return requested

    def commit(
        self,
        reservation: Reservation,
        handle: str,
        owner: str,
        worker: str,
        kv_bytes: int,
        num_tokens: int,
        seconds: int,
        header: dict | None = None,
        last_token_id: int = -1,
    ) -> Lease:
        lease = Lease(
            handle=handle,
            owner=owner,
            worker=worker,
            kv_bytes=kv_bytes,
            num_tokens=num_tokens,
            expires_at=self._clock() + seconds,
            header=dict(header or {}),
            last_token_id=last_token_id,
        )
        with self._lock:
            if reservation.active:
                reservation.active = False
                self._reserved -= reservation.nbytes
            self._leases[handle] = lease
        return lease

    # lookups ---------------------------------------------------------------------------------
    def get(self, handle: str, owner: str) -> Lease:
        if not isinstance(handle, str) or not HANDLE_PATTERN.fullmatch(handle):
            raise LeaseError(grpc.StatusCode.INVALID_ARGUMENT, "handle must be 32 lowercase hex digits")
        with self._lock:
            lease = self._leases.get(handle)
            # an expired lease stays in the table until pop_expired() hands it to the sweeper,
            # which frees its KV on the worker; to callers it is gone already
            expired = lease is not None and lease.expires_at <= self._clock()
            if lease is None or expired:
                reason = "expired" if expired else self._forgotten.get(handle)
                if reason == "expired":
                    raise LeaseError(
                        grpc.StatusCode.FAILED_PRECONDITION, "handle expired: its KV was freed; prefill again"
                    )
                if reason == "released":
                    raise LeaseError(grpc.StatusCode.NOT_FOUND, "handle was released")
                if reason == "lost":
                    raise LeaseError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "the KV of this handle was lost with its worker (restarted); prefill again",
                    )
                raise LeaseError(grpc.StatusCode.NOT_FOUND, "unknown handle")
            if not hmac.compare_digest(lease.owner.encode(), owner.encode()):
                raise LeaseError(grpc.StatusCode.PERMISSION_DENIED, "handle belongs to another caller")
            return lease

    def renew(self, handle: str, owner: str, seconds: int) -> Lease:
        lease = self.get(handle, owner)
        seconds = self.lease_seconds(seconds)
        with self._lock:
            lease.expires_at = max(lease.expires_at, self._clock() + seconds)
        return lease

    def release(self, handle: str, owner: str) -> Lease:
        lease = self.get(handle, owner)
        with self._lock:
            self._forget(handle, "released")
        return lease

    def pop_expired(self) -> list[Lease]:
        """Removes and returns the leases past their expiry (the caller frees their KV)."""
        now = self._clock()
        with self._lock:
            expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
            for lease in expired:
                self._forget(lease.handle, "expired")
        return expired

    def lose(self, handle: str) -> Lease | None:
        """Forgets a lease whose KV is gone from its worker (the worker died and restarted); a
        handle already released or expired keeps that reason. Returns the lease, if it was live."""
        with self._lock:
            lease = self._leases.get(handle)
            if lease is not None:
                self._forget(handle, "lost")
        return lease

    def lose_worker(self, worker: str) -> list[Lease]:
        """Forgets every lease whose KV was on `worker`, which lost it all (it restarted or is gone
        for good): their bytes stop counting against the cap, and their handles answer
        FAILED_PRECONDITION."""
        with self._lock:
            lost = [lease for lease in self._leases.values() if lease.worker == worker]
            for lease in lost:
                self._forget(lease.handle, "lost")
        return lost

    def drain_all(self) -> list[Lease]:
        with self._lock:
            leases = list(self._leases.values())
            for lease in leases:
                self._forget(lease.handle, "released")
        return leases

    def _forget(self, handle: str, reason: str) -> None:
        self._leases.pop(handle, None)
        self._forgotten[handle] = reason
        self._forgotten.move_to_end(handle)
        while len(self._forgotten) > _FORGOTTEN_LIMIT:
            self._forgotten.popitem(last=False)
