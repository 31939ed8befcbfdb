"""Which site is calling: the common name of its client certificate (mTLS), checked by a
``grpc.aio.ServerInterceptor`` before any handler runs, as the edge API does (evcore.api.auth).

A site may only touch its own records: the interceptor puts the caller's site in
:data:`current_site` for the handlers (uploads are stored under it; ``AuditRecord`` and
``MeterSampleBatch`` carry no site id) and refuses a request naming another ``site_id``
(PERMISSION_DENIED) before the handler sees it. Health checks need no identity.

The operators' ``FleetApi`` on the same port is not for sites: its caller must present a client
certificate signed by the operator CA (``[fleet] operator_ca_file``, a CA that is not the sites')
whose common name is a configured operator with the method's role (the edge API's roles,
evcore.api.auth: ``grid_operator`` to curtail, re-split and cancel, any role to list
curtailments or sites). A site's certificate calling it, or an operator's certificate calling
CloudApi, is PERMISSION_DENIED.

``insecure`` (local development only) takes the site from the ``x-evcore-site-id`` header of a
plaintext connection, and the operator from ``x-evcore-operator``: anyone who can reach the port
can then act as any site or configured operator.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import grpc
from cryptography import x509

from evcore.api.auth import GRID_OPERATOR, OPERATOR, VIEWER, Credentials, Principal
from evcore.api.intercept import CheckingInterceptor

log = logging.getLogger("evcore.cloud.auth")

SITE_HEADER = "x-evcore-site-id"
OPERATOR_HEADER = "x-evcore-operator"
FLEET_SERVICE = "/evcore.v1.FleetApi/"
#: Roles allowed per FleetApi method (a method not listed is refused to everyone).
FLEET_METHOD_ROLES: dict[str, frozenset[str]] = {
    FLEET_SERVICE + "Curtail": frozenset({GRID_OPERATOR}),
    FLEET_SERVICE + "Resplit": frozenset({GRID_OPERATOR}),
    FLEET_SERVICE + "Cancel": frozenset({GRID_OPERATOR}),
    FLEET_SERVICE + "List": frozenset({VIEWER, OPERATOR, GRID_OPERATOR}),
    FLEET_SERVICE + "ListSites": frozenset({VIEWER, OPERATOR, GRID_OPERATOR}),
}

#: The calling site of the RPC being handled (set by the interceptor).
current_site: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "evcore_cloud_site", default=None
)


#: The operator of the FleetApi call being handled (set by the interceptor).
current_operator: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "evcore_cloud_operator", default=None
)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


class DirectIssuers:
    """The CA certificates of one role (a PEM bundle), and whether a peer's certificate was
    signed by one of them directly. The TLS handshake verifies a client's chain against the
    sites' and the operators' CAs together; this says which role's CA issued the leaf, so that a
    certificate chaining to one role's CA through an intermediate is never taken for the other
    role (review 2026-12-05, M2: a leaf with CN depot-1 issued by a sub-CA of the operators' CA
    was accepted as site depot-1)."""

    def __init__(self, ca_pem: bytes | None) -> None:
        self._cas = x509.load_pem_x509_certificates(ca_pem) if ca_pem else []
        self._issued: dict[bytes, bool] = {}

    def issued(self, cert_pem: bytes) -> bool:
        known = self._issued.get(cert_pem)
        if known is not None:
            return known
        found = False
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            cert = None
        if cert is not None and _is_ca(cert):
            cert = None  # a CA's certificate is never a caller's identity (a sub-CA as a leaf)
        for ca in self._cas if cert is not None else ():
            assert cert is not None
            if cert.issuer != ca.subject:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except Exception:  # InvalidSignature, or a key type it cannot check
                continue
            found = True
            break
        if len(self._issued) > 4096:
            self._issued.clear()
        self._issued[cert_pem] = found
        return found


class OperatorAuth:
    """Operator identities: certificates issued by the operator CA, mapped by common name."""

    def __init__(self, operators: Credentials, ca_pem: bytes | None) -> None:
        self.operators = operators
        self._issuers = DirectIssuers(ca_pem)

    def issued_by_operator_ca(self, cert_pem: bytes) -> bool:
        """Whether the peer's certificate was signed by the operator CA directly."""
        return self._issuers.issued(cert_pem)


def caller_operator() -> Principal:
    p = current_operator.get()
    if p is None:  # only reachable if a handler were served without the interceptor
        raise RuntimeError("no authenticated operator for this call")
    return p


def caller_site() -> str:
    site = current_site.get()
    if not site:  # only reachable if a handler were served without the interceptor
        raise RuntimeError("no authenticated site for this call")
    return site


class SiteAuthInterceptor(CheckingInterceptor):
    """Authenticates the calling site and keeps it to its own ``site_id``."""

    def __init__(
        self,
        *,
        insecure: bool = False,
        operators: OperatorAuth | None = None,
        sites: DirectIssuers | None = None,
    ) -> None:
        self._insecure = insecure
        self._operators = operators
        # The sites' CA (``[tls] client_ca_file``): a site's certificate must be signed by it
        # directly. None: not checked (insecure mode, or a caller that checks elsewhere).
        self._sites = sites
        self.unauthenticated = 0
        self.denied = 0

    def _peer_is_operator(self, context: Any) -> bool:
        if self._insecure or self._operators is None:
            return False
        pems = context.auth_context().get("x509_pem_cert") or []
        return len(pems) == 1 and self._operators.issued_by_operator_ca(bytes(pems[0]))

    def _peer_is_site(self, context: Any) -> bool:
        if self._insecure or self._sites is None:
            return True
        pems = context.auth_context().get("x509_pem_cert") or []
        return len(pems) == 1 and self._sites.issued(bytes(pems[0]))

    async def _deny(self, context: Any, method: str, why: str) -> None:
        self.denied += 1
        log.warning("cloud: %s denied: %s", method, why)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        raise AssertionError("unreachable: abort raises")

    async def _check_operator(self, method: str, metadata: Any, context: Any) -> None:
        ops = self._operators
        name: str | None = None
        if self._insecure:
            for key, value in metadata or ():
                if key.lower() == OPERATOR_HEADER:
                    name = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            if not name:
                self.unauthenticated += 1
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"insecure mode: send the operator in the {OPERATOR_HEADER} header",
                )
        else:
            names = context.auth_context().get("x509_common_name") or []
            cn = bytes(names[0]).decode("utf-8", "replace") if len(names) == 1 else "?"
            if not self._peer_is_operator(context):
                await self._deny(
                    context,
                    method,
                    f"FleetApi is for operators: the certificate of {cn!r} is a site's, not one "
                    "signed by the operator CA",
                )
            name = cn
        principal = ops.operators.clients.get(name or "") if ops is not None else None
        if principal is None:
            await self._deny(context, method, f"operator {name!r} is not configured in [fleet]")
        assert principal is not None
        allowed = FLEET_METHOD_ROLES.get(method, frozenset())
        if not (allowed & principal.roles):
            await self._deny(
                context,
                method,
                f"{method.rsplit('/', 1)[-1]} needs role {' or '.join(sorted(allowed)) or '?'} "
                f"(operator {principal.name!r} has {', '.join(sorted(principal.roles))})",
            )
        current_operator.set(principal)

    def _site(self, metadata: Any, context: Any) -> tuple[str | None, str]:
        if self._insecure:
            for key, value in metadata or ():
                if key.lower() == SITE_HEADER:
                    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                    return (text.strip() or None), f"empty {SITE_HEADER} header"
            return None, f"insecure mode: send the site id in the {SITE_HEADER} header"
        names = context.auth_context().get("x509_common_name") or []
        if len(names) != 1:
            return None, "a client certificate with one common name (the site id) is required"
        raw = names[0]
        cn = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return (cn or None), "the client certificate's common name is empty"

    async def check(self, method: str, metadata: Any, context: Any, request: Any) -> None:
        if method.startswith(FLEET_SERVICE):
            await self._check_operator(method, metadata, context)
            return
        if self._peer_is_operator(context):
            await self._deny(context, method, "an operator's certificate is not a site's")
        if not self._peer_is_site(context):
            await self._deny(
                context,
                method,
                "a site's certificate must be signed directly by a CA certificate of [tls] "
                "client_ca_file (this one chains to a trusted CA through another issuer)",
            )
        site, why = self._site(metadata, context)
        if site is None:
            self.unauthenticated += 1
            log.info("cloud: %s refused: %s", method, why)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)
            raise AssertionError("unreachable: abort raises")
        named = getattr(request, "site_id", None)
        if isinstance(named, str):
            if not named:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "site_id is required")
            if named != site:
                self.denied += 1
                log.warning("cloud: %s by site %r for site %r denied", method, site, named)
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"site {site!r} may not touch site {named!r}",
                )
        current_site.set(site)
