"""``EdgeFacade``: the one thing the edge API reads and steers through.

The edge controller implements it (``evcore.edge.facade.ControllerFacade``); unit tests implement
it over a store and in-memory state. Methods may be plain or ``async``; they return plain data (the
``TypedDict`` shapes below; extra keys are ignored, missing optional keys read as absent). A
steering method either applies the change as an event for the next decision or raises
:class:`FacadeError` (``ValueError``) naming what was wrong; it never sends a setpoint itself. A
lookup of an unknown charger or node raises :class:`UnknownTarget`. Only these are taken for the
caller's mistake: a plain ``ValueError``, ``KeyError`` or ``IndexError`` is a bug behind the facade
(INTERNAL, logged with its traceback), and the store's ``StoreUnavailable`` an outage (UNAVAILABLE,
which clients retry). The API never bypasses the facade.

Times are seconds since the Unix epoch; ``unit`` is ``"A"`` (AC chargers, per phase) or ``"W"``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any, Protocol, TypeAlias, TypedDict, TypeVar, runtime_checkable

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]


class FacadeError(ValueError):
    """A request carried a bad value or cannot apply now; the message says which (→ INVALID_ARGUMENT
    or FAILED_PRECONDITION)."""


class UnknownTarget(FacadeError, LookupError):
    """The charger, session or node named does not exist (→ NOT_FOUND)."""


class NotApplicable(FacadeError):
    """The request is well formed but the target is not in a state it applies to (→
    FAILED_PRECONDITION), e.g. clearing a fault on a charger that is not faulted."""


class ChargerDict(TypedDict, total=False):
    charger_id: str
    ocpp_id: str
    online: bool
    status: str
    plugged: bool
    available: bool
    transaction_id: str | None
    unit: str
    setpoint: float | None
    accepted: bool | None
    valid_to: float | None
    measured_a: Sequence[float]
    measured_w: float | None
    measurement_age_s: float | None
    suspect: bool
    faulted: bool
    fault_reason: str | None


class SiteStateDict(TypedDict, total=False):
    site_id: str
    at: float
    policy: str
    decisions: int
    profiles_sent: int
    curtailments_kw: Mapping[str, float]
    failsafe: Mapping[str, float]
    chargers: Sequence[ChargerDict]
    faults: Sequence[Mapping[str, str]]


class SessionDict(TypedDict, total=False):
    charger_id: str
    transaction_id: str | None
    started_at: float | None
    energy_delivered_kwh: float
    energy_requested_kwh: float | None
    departure: float | None
    priority: float


class SetpointDict(TypedDict, total=False):
    charger_id: str
    unit: str
    setpoint: float | None
    accepted: bool | None
    valid_to: float | None
    failsafe: float | None


class NodeDict(TypedDict, total=False):
    node_id: str
    current_a: Sequence[float]
    phase_limit_a: Sequence[float]
    power_kw: float | None
    power_limit_kw: float | None


class ChangeDict(TypedDict, total=False):
    # "setpoint" | "decision" | anything the edge adds; the API adds its own steering changes.
    kind: str
    charger_id: str
    decision: Any
    purpose: str
    value: float | None
    unit: str
    detail: str


@runtime_checkable
class EdgeFacade(Protocol):
    """What the API needs from the running edge (see the module docstring for the rules)."""

    def site_state(self) -> MaybeAwaitable[Mapping[str, Any]]: ...

    def sessions(self) -> MaybeAwaitable[Sequence[Mapping[str, Any]]]: ...

    def setpoints(self) -> MaybeAwaitable[Sequence[Mapping[str, Any]]]: ...

    def node_utilisation(self) -> MaybeAwaitable[Sequence[Mapping[str, Any]]]:
        """Per node: ``current_a`` and ``phase_limit_a`` (site phase order), optionally
        ``power_kw`` and ``power_limit_kw`` (the lower of the node's cap and a curtailment)."""
        ...

    def recent_decisions(
        self, *, charger_id: str | None = None, limit: int = 50
    ) -> MaybeAwaitable[Sequence[Mapping[str, Any]]]:
        """Decisions newest first in the audit log's mapping shape (``evcore.audit.log``); only
        used when the API has no store to read the audit trail from."""
        ...

    def watch(self) -> AsyncIterator[Mapping[str, Any]]:
        """Changes as they happen; ends when the consumer stops iterating. Subscribed by its
        first step, before that step's first wait (the API then tells its caller the watch is
        attached: a change made after that reaches it)."""
        ...

    def set_availability(self, charger_id: str, available: bool) -> MaybeAwaitable[None]: ...

    def clear_fault(self, charger_id: str, note: str) -> MaybeAwaitable[str]: ...

    # A session lever may also take a keyword ``transaction_id``: the API then passes the
    # transaction it looked up (or the caller named), and the lever raises ``NotApplicable``
    # naming it, in the same step as the change, when the charger's session is no longer that
    # one (the car left, or the next one came, while the API looked). Not part of the signatures
    # here, so that a facade without it still is an ``EdgeFacade``; the API checks for it.
    def set_priority(self, charger_id: str, priority: float) -> MaybeAwaitable[None]: ...

    def set_departure(
        self, charger_id: str, departure: float, energy_requested_kwh: float | None = None
    ) -> MaybeAwaitable[None]: ...

    def post_curtailment(
        self, signal_id: str, node_id: str, max_kw: float, start: float, end: float
    ) -> MaybeAwaitable[None]: ...

    def cancel_curtailment(self, signal_id: str) -> MaybeAwaitable[bool]: ...

    def post_prices(self, points: list[tuple[float, float]]) -> MaybeAwaitable[None]:
        """``points``: (start epoch seconds, price per kWh), in time order."""
        ...
