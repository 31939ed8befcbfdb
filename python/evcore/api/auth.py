"""Who may call what on the edge API: bearer tokens (and optional mTLS identities) with roles,
enforced by a ``grpc.aio.ServerInterceptor`` before any handler runs.

Roles: ``viewer`` reads; ``operator`` reads and steers; ``grid_operator`` posts grid signals. A call
without credentials, or with a token that is not configured, gets UNAUTHENTICATED; a known caller
without the method's role gets PERMISSION_DENIED. Either way the handler never runs, so nothing
changes. Health checks need no credentials; reflection needs any valid identity.

Tokens are configured by their SHA-256 (``token_sha256``) so the site file holds no secret; a plain
``token`` is accepted for tests and development. This module never logs a token. A tokens file
(:class:`TokensFile`) is read again when it changes, so a token is revoked without a restart.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from evcore.api.intercept import CheckingInterceptor
from evcore.filewatch import FileWatch, OneAtATime

log = logging.getLogger("evcore.api.auth")

VIEWER = "viewer"
OPERATOR = "operator"
GRID_OPERATOR = "grid_operator"
ROLES = frozenset({VIEWER, OPERATOR, GRID_OPERATOR})

_SERVICE = "/evcore.v1.EdgeApi/"
_READ = frozenset({VIEWER, OPERATOR})
_STEER = frozenset({OPERATOR})
_GRID = frozenset({GRID_OPERATOR})

#: Roles allowed per method. A method of ``evcore.v1.EdgeApi`` not listed is denied to everyone (a
#: new RPC is closed until it has its roles here); one of another service (reflection) needs any
#: valid identity.
METHOD_ROLES: Mapping[str, frozenset[str]] = {
    _SERVICE + "GetSiteState": _READ,
    _SERVICE + "ListSessions": _READ,
    _SERVICE + "ListSetpoints": _READ,
    _SERVICE + "GetNodeUtilisation": _READ,
    _SERVICE + "WatchChanges": _READ,
    _SERVICE + "ListDecisions": _READ,
    _SERVICE + "SetChargerAvailability": _STEER,
    _SERVICE + "ClearChargerFault": _STEER,
    _SERVICE + "SetSessionPriority": _STEER,
    _SERVICE + "SetSessionDeparture": _STEER,
    _SERVICE + "PostGridSignal": _GRID,
}


class AuthConfigError(ValueError):
    """The ``[api]`` token or client configuration is wrong; the message names the entry."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    roles: frozenset[str]
    # "token" or "mtls"
    via: str = "token"


#: The caller of the RPC being handled (set by the interceptor, read by handlers for logs).
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "evcore_api_principal", default=None
)


def token_sha256(token: str) -> str:
    """The hex digest to put in ``token_sha256`` for a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _roles(entry: Mapping[str, Any], where: str) -> frozenset[str]:
    roles = entry.get("roles")
    if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
        raise AuthConfigError(f"{where}: roles must be a non-empty list of strings")
    unknown = sorted(set(roles) - ROLES)
    if unknown:
        raise AuthConfigError(
            f"{where}: unknown role(s) {', '.join(unknown)}; known: {', '.join(sorted(ROLES))}"
        )
    return frozenset(roles)


@dataclass
class Credentials:
    """Configured tokens (by digest) and mTLS client identities (by certificate common name)."""

    tokens: dict[str, Principal] = field(default_factory=dict)
    clients: dict[str, Principal] = field(default_factory=dict)

    @staticmethod
    def from_config(
        tokens: Iterable[Mapping[str, Any]] = (),
        clients: Iterable[Mapping[str, Any]] = (),
        *,
        source: str = "[api]",
    ) -> Credentials:
        creds = Credentials()
        tokens = _tables(tokens, f"{source} tokens")
        clients = _tables(clients, f"{source} clients")
        for i, t in enumerate(tokens):
            name = str(t.get("name") or f"token-{i + 1}")
            where = f"{source} tokens[{i}] ({name})"
            digest = t.get("token_sha256")
            plain = t.get("token")
            if (digest is None) == (plain is None):
                raise AuthConfigError(f"{where}: give exactly one of token_sha256 or token")
            if plain is not None:
                if not isinstance(plain, str) or len(plain) < 16:
                    raise AuthConfigError(f"{where}: token must be a string of at least 16 chars")
                digest = token_sha256(plain)
            if not isinstance(digest, str) or len(digest) != 64:
                raise AuthConfigError(f"{where}: token_sha256 must be 64 hex digits")
            try:
                bytes.fromhex(digest)
            except ValueError:
                raise AuthConfigError(f"{where}: token_sha256 must be 64 hex digits") from None
            digest = digest.lower()
            if digest in creds.tokens:
                raise AuthConfigError(f"{where}: the same token is configured twice")
            creds.tokens[digest] = Principal(name, _roles(t, where), "token")
        for i, c in enumerate(clients):
            cn = c.get("common_name")
            where = f"{source} clients[{i}]"
            if not isinstance(cn, str) or not cn:
                raise AuthConfigError(f"{where}: common_name must be a non-empty string")
            creds.clients[cn] = Principal(cn, _roles(c, f"{where} ({cn})"), "mtls")
        return creds

    def merge_file(self, path: Path) -> None:
        """Add ``[[tokens]]`` / ``[[clients]]`` from a TOML file (kept out of the site file)."""
        try:
            with path.open("rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise AuthConfigError(f"cannot read tokens file {path}: {exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"tokens file {path} is not valid TOML: {exc}") from exc
        more = Credentials.from_config(
            doc.get("tokens", []), doc.get("clients", []), source=str(path)
        )
        for digest, p in more.tokens.items():
            if digest in self.tokens:
                raise AuthConfigError(f"{path}: token {p.name!r} is already configured")
            self.tokens[digest] = p
        self.clients.update(more.clients)

    def by_token(self, token: str) -> Principal | None:
        digest = token_sha256(token)
        # Constant-time compare against every configured digest (no early exit on a match).
        found: Principal | None = None
        for known, principal in self.tokens.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


class TokensFile:
    """The credentials in force: the site file's (``base``) and those of ``path`` (``[api]
    tokens_file``), read again when the file changes (device, inode, size, mtime or ctime; at every
    call while its mtime is under ``evcore.filewatch.SETTLE_S`` old, as two rewrites within the file
    system's timestamp granularity keep them), so a token is revoked, or added, without a restart. A
    file that cannot be read (removed, not valid TOML, a bad entry) leaves none of its tokens or
    clients in force until it is fixed (never the old ones, which the edit may have meant to
    retire); the site file's keep working. ``current`` is what the load read."""

    def __init__(self, base: Credentials, path: Path, current: Credentials) -> None:
        self.base = base
        self.path = path
        self.current = current
        self._watch = FileWatch(path, seen_now=False)  # read again at the first call
        self._failure = ""
        #: The look and read, beside the event loop (the edge's control loop runs on it): a read
        #: that blocks (a hung network file system, a FIFO) holds one thread, not the loop; a
        #: call waits at most ``wait_s`` (1 s) for it, then TimeoutError.
        self.reader = OneAtATime(self._look, name="evcore-api-tokens")

    async def credentials(self) -> Credentials:
        return await self.reader()

    def close(self) -> None:
        self.reader.close()

    def _look(self) -> Credentials:
        """(On the reader thread.) Stat, and read when changed."""
        if not self._watch.changed() and not self._failure:
            return self.current
        fresh = Credentials(tokens=dict(self.base.tokens), clients=dict(self.base.clients))
        try:
            fresh.merge_file(self.path)
        except AuthConfigError as exc:
            if str(exc) != self._failure:
                self._failure = str(exc)
                log.error(
                    "api: none of the tokens file's tokens is accepted until it is fixed: %s", exc
                )
            self.current = self.base
            return self.current
        if self._failure or fresh != self.current:
            log.info(
                "api: %s read again: %d token(s), %d client(s) in force",
                self.path,
                len(fresh.tokens),
                len(fresh.clients),
            )
        self._failure = ""
        self.current = fresh
        return fresh


def _tables(value: Any, where: str) -> list[Mapping[str, Any]]:
    """``value`` as a list of tables, or AuthConfigError naming ``where`` (a string or a table
    given where an array of tables belongs failed with an AttributeError)."""
    if isinstance(value, Mapping | str | bytes) or not isinstance(value, Iterable):
        raise AuthConfigError(f"{where}: expected an array of tables, got {type(value).__name__}")
    out = list(value)
    for i, item in enumerate(out):
        if not isinstance(item, Mapping):
            raise AuthConfigError(f"{where}[{i}]: expected a table, got {type(item).__name__}")
    return out


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header; ``""`` for a malformed one."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return ""
            return token.strip()
    return None


#: Status codes of a call refused for what its caller sent (who, or what it asked), not for the
#: edge's state (UNAVAILABLE, INTERNAL, ...).
REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class AuthInterceptor(CheckingInterceptor):
    """Authenticates every call and checks the method's roles before its handler runs."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        mtls: bool = False,
        tokens_file: TokensFile | None = None,
    ) -> None:
        self._creds = credentials
        self._mtls = mtls
        #: When set, the credentials in force come from it (a tokens file read again on change).
        self._tokens_file = tokens_file
        self.denied = 0
        self.unauthenticated = 0
        #: Calls refused, by (method, reason): the reason is the status code's name in lower
        #: case (``unauthenticated``, ``permission_denied``, ``invalid_argument``, ...), counted
        #: for codes that say the caller asked wrong (:data:`REFUSAL_CODES`), whoever aborted:
        #: this check or the handler. Exported as ``evcore_api_calls_refused_total``.
        self.refused: dict[tuple[str, str], int] = {}

    def aborted(self, method: str, code: grpc.StatusCode | None) -> None:
        if code in REFUSAL_CODES:
            assert code is not None
            key = (method.rsplit("/", 1)[-1], code.name.lower())
            self.refused[key] = self.refused.get(key, 0) + 1

    async def _principal(self, metadata: Any, context: Any) -> tuple[Principal | None, str]:
        if self._tokens_file is None:
            creds = self._creds
        else:
            try:
                creds = await self._tokens_file.credentials()
            except TimeoutError:
                log.warning(
                    "api: the tokens file %s could not be read within %g s; call refused",
                    self._tokens_file.path,
                    self._tokens_file.reader.wait_s,
                )
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "the API's tokens file could not be read in time; try again",
                )
                raise AssertionError("unreachable: abort raises") from None
        token = bearer_token(metadata)
        if token is not None:
            if token == "":
                return None, "malformed authorization header (expected 'Bearer <token>')"
            p = creds.by_token(token)
            return p, "" if p is not None else "unknown token"
        if self._mtls:
            ctx = context.auth_context() if context is not None else {}
            names = ctx.get("x509_common_name") or []
            for raw in names:
                cn = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                p = creds.clients.get(cn)
                if p is not None:
                    return p, ""
            if names:
                return None, "client certificate not mapped to any role"
        return None, "no credentials (send 'authorization: Bearer <token>')"

    async def check(self, method: str, metadata: Any, context: Any, request: Any) -> Principal:
        principal, why = await self._principal(metadata, context)
        if principal is None:
            self.unauthenticated += 1
            log.info("api: %s refused: %s", method, why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            raise AssertionError("unreachable: abort raises")
        allowed = METHOD_ROLES.get(method)
        if allowed is None and method.startswith(_SERVICE):
            self.denied += 1
            log.error("api: %s has no roles in METHOD_ROLES: denied to %s", method, principal.name)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} has no roles configured (denied to everyone)",
            )
            raise AssertionError("unreachable: abort raises")
        if allowed is not None and not (allowed & principal.roles):
            self.denied += 1
            log.warning(
                "api: %s denied to %s (roles %s; needs one of %s)",
                method,
                principal.name,
                ",".join(sorted(principal.roles)),
                ",".join(sorted(allowed)),
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} needs role {' or '.join(sorted(allowed))}",
            )
            raise AssertionError("unreachable: abort raises")
        current_principal.set(principal)
        return principal
