"""One station's WebSocket session: the OCPP-J framing, fast validation and call plumbing.

Built on the ``ocpp`` library's ``ChargePoint`` (its ``@on`` routing, action enums, schemas and
error codes) but with its slow or unsafe defaults replaced: schema validators are compiled once and
run inline (no thread pool), a malformed CALL or frame gets a CALLERROR (a malformed answer fails
our CALL: an answer is never answered) and the connection lives on, an
unhandled action gets ``NotImplemented`` in every version, and outgoing CALLs are matched by id with
a timeout on the injected clock. Handlers receive the validated camelCase payload, return a
camelCase dict, and must never await an outgoing call (they enqueue; see ``queue.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ocpp.charge_point import ChargePoint as _LibChargePoint
from ocpp.routing import on as _lib_on
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State as _WsState

from evcore.clock import Clock
from evcore.ocpp import validation
from evcore.ocpp.metering import MeterValueError
from evcore.ocpp.oneline import install as install_one_line
from evcore.ocpp.publish import STORE_UNAVAILABLE, NotRecorded
from evcore.ocpp.queue import CallOutcome
from evcore.store.base import StoreUnavailable

if TYPE_CHECKING:
    from evcore.ocpp.server import CentralSystem, Station

LOG = logging.getLogger("evcore.ocpp")
# What stations choose (ids, event types) may hold CR/LF: every line of this logger stays one.
install_one_line(LOG)

_F = TypeVar("_F", bound=Callable[..., Any])


def on(action: str) -> Callable[[_F], _F]:
    """The ``ocpp`` library's ``@on`` routing decorator, typed."""
    return cast(Callable[[_F], _F], _lib_on(action))


_ids = itertools.count(1)
#: The start of an OCPP-J frame up to its message id: ``[2, "id"``, ``[3, "id"``, ``[4, "id"``.
_HEAD = re.compile(r'\s*\[\s*([234])\s*,\s*"([^"\\]{1,64})"')
_OPEN = _WsState.OPEN
#: The start of a CALLRESULT or CALLERROR (``[3,`` / ``[4,``): answers to our CALLs.
_ANSWER = re.compile(r"\s*\[\s*[34]\s*,")
#: The station's frames read and not yet handled, per connection (``StationConnection.start``).
CALLS_BUFFERED = 16


class HandlerError(Exception):
    """Raised by a handler to answer with a CALLERROR (``code`` as the version names it)."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


class StationConnection(_LibChargePoint):  # type: ignore[misc]
    """Base class for the 1.6 and 2.0.1 sessions; subclasses hold the ``@on`` handlers."""

    version: str = ""
    #: The CALLERROR code for a frame that is not valid OCPP-J at all.
    frame_error_code: str = "FormationViolation"
    format_error_code: str = "FormationViolation"
    #: The CALLERROR code for a MessageTypeId other than 2, 3 and 4.
    unknown_type_code: str = "FormationViolation"

    def __init__(self, station: Station, ws: Any, csms: CentralSystem, clock: Clock) -> None:
        super().__init__(station.ocpp_id, ws, response_timeout=csms.config.call_timeout_s)
        self.station = station
        self.csms = csms
        self.clock = clock
        self.ws = ws
        self._pending: dict[str, tuple[str, asyncio.Future[CallOutcome]]] = {}
        self._after_reply: list[Callable[[], None]] = []
        self.closed = False

    # ---- receiving -------------------------------------------------------------------------
    async def start(self) -> None:
        """Read frames until the socket closes. An answer to one of our CALLs is matched at
        once; everything else (the station's CALLs, frames that are neither) is handled one at
        a time in arrival order by a second task. A handler waits on the store and the bus
        before it replies: one stuck there (PostgreSQL away, a table locked) held every answer
        to our SetChargingProfile unread behind it until it timed out, so decreases were never
        seen accepted and the chargers counted at their maximum. Up to ``CALLS_BUFFERED``
        frames wait for the handler; beyond that the reader waits too."""
        inbox: asyncio.Queue[str | bytes | None] = asyncio.Queue(CALLS_BUFFERED)
        handler = asyncio.ensure_future(self._handle_inbox(inbox))
        closed: ConnectionClosed | None = None
        try:
            try:
                async for raw in self.ws:
                    if _ANSWER.match(raw if isinstance(raw, str) else raw[:64].decode("latin-1")):
                        await self.route_message(raw)
                    else:
                        await self._hand_over(inbox, handler, raw)
            except ConnectionClosed as exc:
                # Closed abnormally (the link dropped, a 1006): raised out of the loop.
                closed = exc
        except BaseException:
            handler.cancel()  # (this process stops, or the handler failed: raised here)
            raise
        if handler.done() and not handler.cancelled() and handler.exception() is not None:
            # The handler failed and closed the socket: its error, not the close it caused.
            raise cast(BaseException, handler.exception())
        # What was read before the close is still handled, in order (its replies cannot leave),
        # as it was when each frame was handled as read; the handler task runs on while the
        # session ends now, so the station is reported gone at once, not when a handler waiting
        # on a stuck store returns.
        self.csms._spawn(self._drain(inbox, handler))
        if closed is not None:
            raise closed

    async def _drain(
        self, inbox: asyncio.Queue[str | bytes | None], handler: asyncio.Future[None]
    ) -> None:
        try:
            await self._hand_over(inbox, handler, None)
            await handler
        except asyncio.CancelledError:
            handler.cancel()
            raise
        except Exception:
            LOG.exception("station %s: handling what it sent before it closed", self.id)

    async def _hand_over(
        self,
        inbox: asyncio.Queue[str | bytes | None],
        handler: asyncio.Future[None],
        raw: str | bytes | None,
    ) -> None:
        """Queue ``raw`` for the handler; if it is full, wait for room or for the handler to
        fail (its error ends the session, as it did when frames were handled inline)."""
        try:
            inbox.put_nowait(raw)
            return
        except asyncio.QueueFull:
            pass
        put = asyncio.ensure_future(inbox.put(raw))
        try:
            await asyncio.wait({put, handler}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled():
            handler.result()  # raises what ended it

    async def _handle_inbox(self, inbox: asyncio.Queue[str | bytes | None]) -> None:
        try:
            while (raw := await inbox.get()) is not None:
                await self.route_message(raw)
        except BaseException:
            # End the session as an error inline did: the reader stops with it.
            with contextlib.suppress(Exception):
                await self.ws.close(1011, "internal error")
            raise

    async def route_message(self, raw: str | bytes) -> None:
        try:
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8")
            msg = json.loads(raw)
        except RecursionError:
            # Nested deeper than the parser goes (a few thousand levels in a 30 kB frame): no
            # OCPP payload is, and it must not end the session.
            await self._unreadable(raw, "frame nested too deeply")
            return
        except (ValueError, UnicodeDecodeError):
            await self._unreadable(raw, "frame is not valid JSON")
            return
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], int):
            await self._send_error(
                _guess_id(msg), self.frame_error_code, "frame is not an OCPP-J array"
            )
            return
        kind = msg[0]
        if kind == 2:
            if (
                len(msg) != 4
                or not isinstance(msg[1], str)
                or not isinstance(msg[2], str)
                or not isinstance(msg[3], dict)
            ):
                await self._send_error(
                    _guess_id(msg),
                    self.frame_error_code,
                    "CALL must be [2, messageId, action, {payload}]",
                )
                return
            await self._handle_frame_call(msg[1], msg[2], msg[3])
        elif kind == 3 and len(msg) == 3 and isinstance(msg[1], str):
            self._resolve_result(msg[1], msg[2])
        elif kind == 4 and len(msg) >= 4 and isinstance(msg[1], str):
            self._resolve_error(msg[1], str(msg[2]), str(msg[3]))
        elif kind not in (2, 3, 4):
            await self._send_error(
                _guess_id(msg), self.unknown_type_code, f"unknown message type {kind}"
            )
        else:
            # A malformed answer (a CALLRESULT without its payload, a CALLERROR without its
            # description): an answer is never answered (before, the station got a CALLERROR
            # under our CALL's id); one naming a CALL of ours fails it at once, not at its
            # timeout.
            unique_id = _guess_id(msg)
            detail = f"malformed answer: message type {kind} of {len(msg)} elements"
            LOG.warning("%s: %s, to %s", self.id, detail, unique_id)
            if unique_id in self._pending:
                self._resolve_error(unique_id, self.format_error_code, detail)

    async def _unreadable(self, raw: str | bytes, detail: str) -> None:
        """A frame that is not JSON we can read. If its head names a message id: an answer to a
        CALL of ours fails that CALL at once (instead of at its timeout; an answer is never
        answered), a CALL gets the version's format error with its id. Otherwise the frame
        error with id "-1"."""
        head = _HEAD.match(raw[:200]) if isinstance(raw, str) else None
        if head is None:
            await self._send_error("-1", self.frame_error_code, detail)
        elif head[1] == "2":
            await self._send_error(head[2], self.format_error_code, detail)
        else:
            LOG.warning("%s: unreadable answer to %s: %s", self.id, head[2], detail)
            self._resolve_error(head[2], self.format_error_code, f"answer unreadable: {detail}")

    async def _handle_frame_call(
        self, unique_id: str, action: str, payload: dict[str, Any]
    ) -> None:
        handlers = self.route_map.get(action)
        handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = (
            handlers.get("_on_action") if handlers else None
        )
        if handler is None:
            await self._send_error(unique_id, "NotImplemented", f"no handler for {action}")
            return
        try:
            validation.validate(self.version, action, payload, response=False)
        except validation.SchemaError as exc:
            try:
                payload, dropped = validation.without_refused_meter_values(
                    self.version, action, payload, exc
                )
            except validation.SchemaError as refused:  # a fault outside the meter values
                await self._send_error(unique_id, refused.code, refused.description)
                return
            # Skipped and counted as a value that is no number is (``_on_meter_value``).
            for measurand, why in dropped:
                LOG.warning("%s: sampled value skipped (its schema refuses it): %s", self.id, why)
                if measurand is not None:
                    self.csms._count_skipped(self.station, measurand)
        except KeyError:
            await self._send_error(
                unique_id, "NotImplemented", f"{action} unknown in {self.version}"
            )
            return
        try:
            response = await handler(payload)
        except HandlerError as exc:
            await self._send_error(unique_id, exc.code, exc.description)
            self._after_reply.clear()
            return
        except MeterValueError as exc:
            await self._send_error(unique_id, "PropertyConstraintViolation", str(exc))
            self._after_reply.clear()
            return
        except (NotRecorded, StoreUnavailable) as exc:
            # Not a fault of the message (the bus outbox full, the store away on a write or on a
            # read the handler needed): the station is told why and sends it again later.
            if isinstance(exc, NotRecorded):
                why, cause = exc.why, exc.__cause__
            else:
                why, cause = STORE_UNAVAILABLE, exc
            LOG.warning("%s: %s not recorded, answered InternalError: %s", self.id, action, cause)
            await self._send_error(
                unique_id, "InternalError", f"{action} not recorded: {why}; send it again"
            )
            self._after_reply.clear()
            return
        except Exception:  # a bug in a handler must not end the connection
            LOG.exception("%s: handler for %s failed", self.id, action)
            await self._send_error(unique_id, "InternalError", f"{action} could not be handled")
            self._after_reply.clear()
            return
        try:
            validation.validate(self.version, action, response, response=True)
        except validation.SchemaError as exc:  # our own bug: say so rather than send garbage
            LOG.error("%s: invalid %s response %r: %s", self.id, action, response, exc)
            await self._send_error(unique_id, "InternalError", "invalid response built")
            self._after_reply.clear()
            return
        await self._send_text(json.dumps([3, unique_id, response], separators=(",", ":")))
        after, self._after_reply = self._after_reply, []
        for fn in after:
            fn()

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the CALLRESULT of the current handler has been sent."""
        self._after_reply.append(fn)

    def _resolve_result(self, unique_id: str, payload: Any) -> None:
        entry = self._pending.pop(unique_id, None)
        if entry is None:
            LOG.warning("%s: CALLRESULT for unknown id %s ignored", self.id, unique_id)
            return
        action, fut = entry
        if fut.done():
            return
        now = self.clock.now()
        if not isinstance(payload, dict):
            fut.set_result(
                CallOutcome("CallError", None, "FormatViolation", "result not an object")
            )
            return
        try:
            validation.validate(self.version, action, payload, response=True)
        except (validation.SchemaError, KeyError) as exc:
            fut.set_result(
                CallOutcome(
                    "CallError",
                    payload,
                    getattr(exc, "code", "FormatViolation"),
                    f"invalid {action} response: {exc}",
                    answered_at=now,
                )
            )
            return
        fut.set_result(CallOutcome("Result", payload, answered_at=now))

    def _resolve_error(self, unique_id: str, code: str, description: str) -> None:
        entry = self._pending.pop(unique_id, None)
        if entry is None:
            LOG.warning("%s: CALLERROR for unknown id %s ignored", self.id, unique_id)
            return
        _, fut = entry
        if not fut.done():
            fut.set_result(
                CallOutcome("CallError", None, code, description, answered_at=self.clock.now())
            )

    # ---- sending ---------------------------------------------------------------------------
    async def _send_text(self, text: str) -> None:
        try:
            await self.ws.send(text)
        except Exception as exc:  # connection gone; the receive loop will end it
            LOG.info("%s: send failed: %s", self.id, exc)

    async def _send_error(self, unique_id: str, code: str, description: str) -> None:
        await self._send_text(
            json.dumps([4, unique_id, code, description[:500], {}], separators=(",", ":"))
        )

    async def call_raw(self, action: str, payload: dict[str, Any], timeout_s: float) -> CallOutcome:
        """Send one CALL and wait for its answer (the queue worker is the only caller)."""
        try:
            validation.validate(self.version, action, payload, response=False)
        except (validation.SchemaError, KeyError) as exc:
            return CallOutcome(
                "CallError", None, "InternalError", f"refused to send {action}: {exc}"
            )
        unique_id = f"cs{next(_ids)}"
        fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        self._pending[unique_id] = (action, fut)
        await self._send_text(json.dumps([2, unique_id, action, payload], separators=(",", ":")))
        # Handed to the socket (the transport's buffer) now: what "left" means for latency.
        sent_at, sent_mono = self.clock.now(), self.clock.monotonic()
        timer: asyncio.Future[None] = asyncio.ensure_future(self.clock.sleep(timeout_s))
        try:
            await asyncio.wait(
                cast(list[asyncio.Future[Any]], [fut, timer]), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            timer.cancel()
        self._pending.pop(unique_id, None)
        if fut.done():
            outcome = fut.result()
        else:
            fut.cancel()
            outcome = CallOutcome("Timeout", detail=f"no answer to {action} in {timeout_s} s")
        outcome.sent_at = sent_at
        outcome.sent_mono = sent_mono
        return outcome

    def send_now(
        self, action: str, payload: dict[str, Any] | str
    ) -> tuple[str, asyncio.Future[CallOutcome]] | None:
        """Write one CALL to the socket now, synchronously, without waiting for its answer.

        For payloads valid by construction (``frames``; the tests check them against the OCPP
        schemas), so no schema check here; a ``str`` payload is JSON text. Returns (message id,
        future of the outcome): the answer resolves it, ``expire`` or a closed connection too.
        ``None`` when the frame cannot be written synchronously (connection not open); the
        caller then takes the queued path. The caller keeps the one-CALL-in-flight rule.
        """
        ws = self.ws
        protocol = getattr(ws, "protocol", None)
        send_data = getattr(ws, "send_data", None)
        if self.closed or protocol is None or send_data is None:
            return None
        if getattr(protocol, "state", None) is not _OPEN or getattr(ws, "send_in_progress", None):
            return None
        unique_id = f"cs{next(_ids)}"
        if isinstance(payload, str):  # already JSON text (``frames``)
            text = f'[2,"{unique_id}","{action}",{payload}]'
        else:
            text = json.dumps([2, unique_id, action, payload], separators=(",", ":"))
        try:
            # What ``ws.send`` does before it awaits the write buffer's drain: frame the message
            # and hand it to the transport. The buffer is drained by the event loop as usual.
            protocol.send_text(text.encode())
            send_data()
        except Exception as exc:  # connection gone; the receive loop will end it
            LOG.info("%s: send failed: %s", self.id, exc)
            return None
        fut: asyncio.Future[CallOutcome] = asyncio.get_running_loop().create_future()
        self._pending[unique_id] = (action, fut)
        return unique_id, fut

    def expire(self, unique_id: str, detail: str) -> None:
        """No answer in time to a CALL of ``send_now``: resolve it ``Timeout``."""
        entry = self._pending.pop(unique_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(CallOutcome("Timeout", detail=detail))

    def fail_pending(self, status: str) -> None:
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_result(CallOutcome(status, detail="connection closed"))
        self._pending.clear()


def _guess_id(msg: Any) -> str:
    if isinstance(msg, list) and len(msg) > 1 and isinstance(msg[1], str):
        return msg[1]
    return "-1"
