"""Caller identity: bearer tokens when configured, the peer's address otherwise.

Every KV handle is bound to the principal that made it; only that principal may fetch, renew or
release it. With tokens configured, a call without `authorization: Bearer <token>` metadata, or
with an unknown token, is refused with UNAUTHENTICATED. Without tokens, the principal is the
peer's address without its port ("ipv4:10.0.0.7"), so a decode process on the same host as the
prefill client may pull the KV, and a process on another host may not.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from .errors import ServiceError

_PRINCIPAL = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # used with fullmatch


class AuthError(ServiceError):
    """A caller without a valid token, or not allowed the call."""


@dataclass(frozen=True)
class Principal:
    name: str
    authenticated: bool


def parse_tokens(text: str, separator: str | None = None) -> dict[str, str]:
    """Token -> principal from lines "principal token" (file) or "principal=token,..." (env)."""
    tokens: dict[str, str] = {}
    entries = text.split(",") if separator == "," else text.splitlines()
    for number, entry in enumerate(entries, 1):
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        parts = entry.split("=", 1) if separator == "," else entry.split()
        if len(parts) != 2 or not parts[1]:
            raise ValueError(f"auth token entry {number} must be 'principal token', got {entry[:20]!r}...")
        name, token = parts[0].strip(), parts[1].strip()
        if not _PRINCIPAL.fullmatch(name):
            raise ValueError(f"auth principal {name!r} must match {_PRINCIPAL.pattern}")
        if len(token) < 16:
            raise ValueError(f"auth token of {name!r} is shorter than 16 characters")
        if token in tokens:
            raise ValueError(f"auth token of {name!r} is also the token of {tokens[token]!r}")
        tokens[token] = name
    return tokens


class Authenticator:
    """Maps a call's metadata and peer to a Principal, or raises AuthError."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self._tokens = dict(tokens or {})

    @classmethod
    def from_config(cls, config) -> Authenticator:
        tokens: dict[str, str] = {}
        if config.auth_tokens_file:
            tokens.update(parse_tokens(Path(config.auth_tokens_file).read_text()))
        if config.auth_tokens:
            tokens.update(parse_tokens(config.auth_tokens, separator=","))
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None, peer: str) -> Principal:
        header = None
        for key, value in metadata or ():
            if key.lower() == "authorization":
                header = value.decode() if isinstance(value, bytes) else value
                break
        if not self.enabled:
            return Principal(peer_principal(peer), authenticated=False)
        if header is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata"
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'"
            )
        token = token.strip()
        # compare against every token in constant time, so timing does not reveal a prefix match
        found = None
        for known, name in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        if found is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        return Principal(found, authenticated=True)


def peer_principal(peer: str) -> str:
    """'ipv4:127.0.0.1:5123' -> 'ipv4:127.0.0.1'; 'ipv6:%5B::1%5D:5123' -> 'ipv6:%5B::1%5D'.

    The port differs per connection, so it is not part of the identity; other peers (unix
    sockets) are taken as given."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer or "unknown"
