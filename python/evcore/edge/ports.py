"""What the controller needs from the rooms around it, as narrow protocols.

The controller is written against these, so it runs the same in production (the OCPP central system,
the Rust core, the audit log), in the digital twin (virtual clock, in-process bus) and in unit tests
of a single function. ``coreio.RustCore`` is the one implementation of ``CorePort``: every setpoint
the edge sends comes out of ``evcore.envelope.enforce`` (directly or through ``allocate``) in the
decision that sends it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from evcore.edge.config import EdgeConfig
from evcore.edge.state import SiteState
from evcore.ocpp.events import ProfilePurpose


@dataclass(frozen=True, slots=True)
class EnforcedSetpoints:
    """The envelope's output for one decision (charger unit: A per phase for AC, W for DC)."""

    setpoints: Mapping[str, float]
    #: per charger, the constraint that bound it, in words a person can read.
    binding: Mapping[str, str] = field(default_factory=dict)
    #: digest of the inputs the core saw (for the audit record).
    inputs_digest: str = ""
    #: per charger the core's binding code (``evcore._core.binding_codes()``) and node id.
    codes: Mapping[str, str] = field(default_factory=dict)
    binding_node: Mapping[str, str] = field(default_factory=dict)


class CorePort(Protocol):
    def decide(
        self,
        state: SiteState,
        *,
        now_wall: float,
        now_mono: float,
        caps_kw: Mapping[str, float],
        targets: Mapping[str, float] | None,
        failsafe: Mapping[str, float],
        cfg: EdgeConfig,
        behind_plan: Collection[str] = (),
    ) -> EnforcedSetpoints:
        """Allocate and enforce for every charger in ``state`` (idle ones get 0). A plan target
        caps its session unless the charger is in ``behind_plan``."""
        ...

    def failsafe_levels(
        self,
        caps_kw: Mapping[str, float],
        *,
        at_max: Collection[str] = (),
        held: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Per charger a level such that every charger at it fits every node and phase, with the
        chargers in ``at_max`` (no TxDefault of ours confirmed) counted at their maximum and
        those in ``held`` at least at that value (charger unit: what they may still hold)."""
        ...


class ProfileOutcome(Protocol):
    @property
    def accepted(self) -> bool: ...

    @property
    def status(self) -> str: ...


class ChargerGateway(Protocol):
    """The OCPP central system's smart-charging interface (``evcore.ocpp.CentralSystem``)."""

    async def set_limit(
        self,
        charger_id: str,
        *,
        limit_a: float | None = None,
        limit_w: float | None = None,
        valid_to: float | None = None,
        final_limit_a: float | None = None,
        final_limit_w: float | None = None,
        purpose: ProfilePurpose = "tx",
        transaction_id: str | None = None,
    ) -> ProfileOutcome: ...


class AuditSink(Protocol):
    """``evcore.audit.AuditLog``: ``append`` returns once the record is durable."""

    def append(self, decision: Mapping[str, Any]) -> Awaitable[Any] | Any: ...


class EventPublisher(Protocol):
    """The bus, as far as the controller publishes on it (must never block the loop)."""

    async def publish(self, subject: str, payload: bytes) -> Any: ...
