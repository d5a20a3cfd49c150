"""Bearer tokens for the gRPC service: each edge client sends `authorization: Bearer <token>` in its metadata.

The token file is JSON, one entry per client, readable by its owner only:

    {"edge-0": "Qm9...", "edge-1": "c2V..."}

The server loads it once (`load_tokens` inverts it to token -> client name) and checks every call with
`check_token`, which compares against all tokens with `hmac.compare_digest` and never stops early, so the time it
takes does not tell an attacker which token (or how much of one) matched. Tokens complement TLS: send them only over
a TLS channel, or anyone on the path can copy them.
"""
from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

import grpc

from privacy.security.files import write_private
from protocol import AUTH_HEADER

MIN_TOKEN_CHARS = 20  # ~120 bits of urlsafe base64; refuse weaker hand-written tokens


class AuthError(Exception):
    """A call without a valid bearer token. `code` is the gRPC status to abort with."""
    code = grpc.StatusCode.UNAUTHENTICATED


def make_tokens(path: str | Path, clients: Iterable[str]) -> dict[str, str]:
    """Write a fresh random token per client to `path` (mode 0600). Returns the file's content: client -> token."""
    table = {c: secrets.token_urlsafe(32) for c in clients}
    if not table:
        raise ValueError("need at least one client name")
    write_private(Path(path), json.dumps(table, indent=1, sort_keys=True).encode(), overwrite=True)
    return table


def load_tokens(path: str | Path) -> dict[str, str]:
    """Read a token file `{"client": "token"}` and return the server's lookup table token -> client name."""
    path = Path(path)
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{path} must hold a non-empty JSON object {{\"client-name\": \"token\", ...}}")
    by_token: dict[str, str] = {}
    for client, token in table.items():
        if not isinstance(token, str) or len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{path}: token of {client!r} must be a string of at least {MIN_TOKEN_CHARS} "
                             "characters (make one with privacy.security.tokens.make_tokens)")
        if token in by_token:
            raise ValueError(f"{path}: {by_token[token]!r} and {client!r} share a token")
        by_token[token] = client
    return by_token


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """The call metadata an edge client sends: pass as `metadata=` to a stub call."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


def _pairs(metadata) -> list[tuple[str, str]]:
    if metadata is None:
        return []
    if isinstance(metadata, Mapping):
        return list(metadata.items())
    return [(m[0], m[1]) for m in metadata]  # grpc's _Metadatum namedtuples and plain pairs alike


def check_token(metadata, tokens: Mapping[str, str]) -> str:
    """The client name whose token `metadata` carries (`context.invocation_metadata()`), or raise `AuthError`."""
    values = [v for k, v in _pairs(metadata) if k.lower() == AUTH_HEADER]
    if not values:
        raise AuthError(f"missing {AUTH_HEADER!r} metadata (expected 'Bearer <token>')")
    if len(values) > 1:
        raise AuthError(f"more than one {AUTH_HEADER!r} metadata entry")
    value = values[0].decode() if isinstance(values[0], bytes) else values[0]
    scheme, _, presented = value.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise AuthError(f"{AUTH_HEADER!r} must be 'Bearer <token>'")
    presented_b = presented.strip().encode()
    found = None
    for token, client in tokens.items():  # no early exit: every call compares against every token
        if hmac.compare_digest(presented_b, token.encode()):
            found = client
    if found is None:
        raise AuthError("unknown bearer token")
    return found
