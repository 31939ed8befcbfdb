"""The controller's decision records into the audit log and the store; recovery after a restart.

What this module owns: converting a decision record (``EdgeController._record``) into the audit
room's ``evcore.v1.AuditRecord`` with ``evcore.v1.Setpoint`` messages, appending it (durable when
``append`` returns — the controller sends nothing before), remembering sent setpoints in the store,
and reading sessions and last setpoints back after a restart. It records; it never changes a value.

When the store cannot take a record in time (unreachable, a locked table), the record goes to a
local append-only journal file (fsynced) instead, so the decision — its decreases above all — may
still leave; journaled records are moved into the audit log, in order and without repeats, by the
next append, at start (``replay_journal``) and on ``drain``. A record that is durable nowhere
raises, and the controller then sends nothing of its decision.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import secrets
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evcore.edge.state import ChargerState, SiteState, priority_error
from evcore.v1 import setpoint_pb2

log = logging.getLogger("evcore.edge")

_KEEP_IDS = 4096
# Journaled records read from the journal file at a time while they are moved.
_REPLAY_PART = 64
# Chain records read at a time for the ids a journaled record may repeat.
_CHAIN_PAGE = 256

# Core binding codes (``evcore._core.binding_codes()``) → the contract's BindingReason.
_REASON = {
    "none": setpoint_pb2.BINDING_REASON_NONE,
    "demand": setpoint_pb2.BINDING_REASON_VEHICLE_DEMAND,
    "plan": setpoint_pb2.BINDING_REASON_PLAN_TARGET,
    "admission": setpoint_pb2.BINDING_REASON_MIN_CURRENT_OR_STEP,
    "hysteresis": setpoint_pb2.BINDING_REASON_SWITCHING_RULE,
    "disconnected": setpoint_pb2.BINDING_REASON_NO_SESSION,
    "fault": setpoint_pb2.BINDING_REASON_FAULTED,
    "charger_max": setpoint_pb2.BINDING_REASON_CHARGER_MAX,
    "min_current": setpoint_pb2.BINDING_REASON_MIN_CURRENT_OR_STEP,
    "step": setpoint_pb2.BINDING_REASON_MIN_CURRENT_OR_STEP,
    "ramp": setpoint_pb2.BINDING_REASON_SWITCHING_RULE,
    "node_phase": setpoint_pb2.BINDING_REASON_NODE_PHASE_LIMIT,
    "node_power": setpoint_pb2.BINDING_REASON_NODE_POWER_LIMIT,
    "unbalance": setpoint_pb2.BINDING_REASON_UNBALANCE_LIMIT,
    "stale_telemetry": setpoint_pb2.BINDING_REASON_STALE_TELEMETRY,
    "unconfirmed_decrease": setpoint_pb2.BINDING_REASON_NODE_PHASE_LIMIT,
    "unknown_profile": setpoint_pb2.BINDING_REASON_NODE_PHASE_LIMIT,
    "failsafe": setpoint_pb2.BINDING_REASON_FAILSAFE,
}


def _ts(msg: Any, seconds: float) -> None:
    whole = int(seconds // 1)
    msg.seconds = whole
    msg.nanos = min(999_999_999, round((seconds - whole) * 1e9))


def bindings_of(record: Mapping[str, Any]) -> list[Any]:
    """``ChargerBinding`` for each charger considered and left unchanged."""
    from evcore.v1.audit_pb2 import ChargerBinding

    return [
        ChargerBinding(
            charger_id=str(b["charger_id"]),
            binding=_REASON.get(
                str(b.get("code") or "none"), setpoint_pb2.BINDING_REASON_UNSPECIFIED
            ),
            reason=str(b.get("reason") or ""),
            binding_node_id=str(b.get("binding_node_id") or ""),
        )
        for b in record.get("bindings") or ()
    ]


def setpoints_of(record: Mapping[str, Any], decision_id: str) -> list[setpoint_pb2.Setpoint]:
    out: list[setpoint_pb2.Setpoint] = []
    for sp in record["setpoints"]:
        msg = setpoint_pb2.Setpoint(charger_id=sp["charger_id"], decision_id=decision_id)
        # The value the charger is told (after the central system's rounding); the decided one
        # goes into the reason when it differs.
        sent = float(sp.get("sent", sp["new"]))
        if sp["unit"] == "W":
            msg.setpoint_w = sent
        else:
            msg.setpoint_a = sent
        code = "failsafe" if sp["purpose"] == "tx_default" else sp.get("code", "none")
        msg.binding = _REASON.get(code, setpoint_pb2.BINDING_REASON_UNSPECIFIED)
        reason = sp.get("binding") or ""
        if sp["purpose"] == "tx_default":
            reason = f"TxDefault failsafe level {float(sp['new']):g} {sp['unit']}"
        msg.reason = reason or f"{sp['kind']} to {float(sp['new']):g} {sp['unit']}"
        if abs(sent - float(sp["new"])) > 1e-9:
            msg.reason += f" (decided {float(sp['new']):g} {sp['unit']}, sent {sent:g})"
        if sp.get("binding_node"):
            msg.binding_node_id = sp["binding_node"]
        _ts(msg.decided_at, float(record["at"]))
        if sp.get("valid_to") is not None:
            _ts(msg.valid_until, float(sp["valid_to"]))
        out.append(msg)
    return out


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One record in the local journal: the unsealed ``evcore.v1.AuditRecord`` (deterministic
    encoding) and the audit log's head when it was journaled (a late commit of the same record,
    from an append that timed out, can only lie after it)."""

    decision_id: str
    after_seq: int
    decided_at_s: float
    payload: bytes

    def line(self) -> bytes:
        obj = {
            "v": 1,
            "decision_id": self.decision_id,
            "after_seq": self.after_seq,
            "decided_at_s": self.decided_at_s,
            "record": base64.b64encode(self.payload).decode("ascii"),
        }
        return json.dumps(obj, separators=(",", ":")).encode("utf-8") + b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _parse_line(raw: bytes) -> JournalEntry:
    """One journal line back (``ValueError`` or a decoding error when it cannot be read)."""
    from evcore.v1.audit_pb2 import AuditRecord

    obj = json.loads(raw)
    payload = base64.b64decode(obj["record"], validate=True)
    record = AuditRecord.FromString(payload)
    entry = JournalEntry(
        decision_id=str(obj["decision_id"]),
        after_seq=int(obj["after_seq"]),
        decided_at_s=float(obj["decided_at_s"]),
        payload=payload,
    )
    if record.decision_id != entry.decision_id:
        raise ValueError(f"holds decision {record.decision_id!r}")
    return entry


class AuditJournal:
    """The local fallback for audit records the store did not take in time: an append-only file,
    one JSON line per record, each append written and fsynced before it returns. How many of its
    first lines have moved into the audit log is kept beside it (``<name>.moved``: a number,
    replaced atomically); once every line has moved the file is emptied. (It was rewritten after
    every partial move, inside a decision's append budget: 0.69 s for 150 MB of records, and a
    day's outage would outlast the budget, so nothing of that decision left.) A crash between a
    move and its count leaves those lines to move again; the recorder recognises them by their
    decision ids. Blocking: call it from a worker thread, one operation at a time.

    Only where each pending line lies is kept in memory (32 bytes a record); records are read
    from the file when asked for (``read``). It held every pending record's bytes, and read the
    whole file at once at start: a 10 MB journal held 7.8 MB, and moving it peaked at 28 MB (an
    edge box starting after a day's outage held its journal two to three times over)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.moved_path = self.path.with_name(self.path.name + ".moved")
        # Per pending line, in file order: its offset and length in the file, and the audit
        # log's head and the decision time it was journaled with (``min_after_seq``).
        self._offsets = array("q")
        self._lengths = array("q")
        self._after = array("q")
        self._decided = array("d")
        #: Lines that could not be read back (a write torn by a crash; its record never counted
        #: as durable, so its setpoints never left).
        self.unreadable = 0
        #: Lines at the head of the file already in the audit log.
        self.moved = 0
        self._load()

    def __len__(self) -> int:
        """Records pending (journaled, not yet counted moved)."""
        return len(self._offsets)

    @property
    def entries(self) -> list[JournalEntry]:
        """Every pending record, read from the file (for tests and small journals: the
        recorder reads them a part at a time, ``read``)."""
        return self.read(0, len(self))

    def read(self, start: int, count: int) -> list[JournalEntry]:
        """Pending records ``start`` .. ``start + count - 1`` (fewer at the end), from the file."""
        stop = min(len(self), start + max(0, count))
        if start >= stop:
            return []
        out: list[JournalEntry] = []
        with self.path.open("rb") as fh:
            for k in range(start, stop):
                fh.seek(self._offsets[k])
                out.append(_parse_line(fh.read(self._lengths[k])))
        return out

    def min_after_seq(self) -> int:
        """The lowest audit log head a pending record was journaled at (-1: none known)."""
        return min(self._after) if self._after else -1

    def min_decided_at_s(self) -> float:
        """The earliest decision time of a pending record."""
        return min(self._decided) if self._decided else math.inf

    def _index(self, offset: int, length: int, entry: JournalEntry) -> None:
        self._offsets.append(offset)
        self._lengths.append(length)
        self._after.append(entry.after_seq)
        self._decided.append(entry.decided_at_s)

    def _forget_first(self, n: int | None = None) -> None:
        """Forget the first ``n`` lines of the index (None: every line)."""
        k = len(self) if n is None else n
        for a in (self._offsets, self._lengths, self._after, self._decided):
            del a[:k]

    def _load(self) -> None:
        """Index the file line by line (each record read and checked, none kept)."""
        try:
            fh = self.path.open("rb")
        except (FileNotFoundError, NotADirectoryError):  # nothing journaled there (yet)
            if self._read_moved():
                self._write_moved(0)  # a count left without its file must not skip new lines
            return
        torn = False
        with fh:
            offset = 0
            for n, raw in enumerate(fh, start=1):
                length = len(raw)
                torn = not raw.endswith(b"\n")
                if raw.strip():
                    try:
                        entry = _parse_line(raw)
                    except Exception as exc:
                        self.unreadable += 1
                        log.warning(
                            "audit journal %s: line %d unreadable, dropped (%s)", self.path, n, exc
                        )
                    else:
                        self._index(offset, length, entry)
                offset += length
        moved = self._read_moved()
        if moved > len(self):
            # More than the file holds (it was replaced): move everything again, ids decide.
            log.warning(
                "audit journal %s: %d line(s) counted moved, %d in the file; moving all again",
                self.path,
                moved,
                len(self),
            )
            moved = 0
            self._write_moved(0)
        if self.unreadable or torn:
            self._rewrite()  # (every line again: the count is reset first)
        else:
            self.moved = moved
            self._forget_first(moved)

    def _read_moved(self) -> int:
        try:
            text = self.moved_path.read_text(encoding="ascii").strip()
        except (FileNotFoundError, NotADirectoryError):
            return 0
        except (OSError, UnicodeDecodeError) as exc:
            log.warning(
                "audit journal %s: moved count unreadable (%s); moving all again", self.path, exc
            )
            return 0
        try:
            n = int(text)
        except ValueError:
            log.warning(
                "audit journal %s: moved count %r unreadable; moving all again", self.path, text
            )
            return 0
        return max(0, n)

    def _write_moved(self, n: int) -> None:
        if n == 0 and not self.moved_path.exists():
            return
        tmp = self.moved_path.with_name(self.moved_path.name + ".tmp")
        with tmp.open("w", encoding="ascii") as fh:
            fh.write(f"{n}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.moved_path)
        _fsync_dir(self.path.parent)

    def append(self, entry: JournalEntry) -> None:
        new = not self.path.exists()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        line = entry.line()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):  # no half line for the next append to join
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if new:
            _fsync_dir(self.path.parent)
        self._index(size, len(line), entry)

    def drop_first(self, n: int) -> None:
        """The first ``n`` entries are in the audit log now: counted as moved (a small file),
        or, when nothing is left, the journal emptied; never a rewrite of what remains."""
        if n <= 0:
            return
        if n >= len(self):
            # Count first: a crash before the truncation moves the old lines again (ids decide);
            # the other order could leave a count that skips lines appended after a restart.
            self._write_moved(0)
            self.moved = 0
            with self.path.open("r+b") as fh:
                fh.truncate(0)
                os.fsync(fh.fileno())
            self._forget_first()
            return
        self._write_moved(self.moved + n)
        self.moved += n
        self._forget_first(n)

    def _rewrite(self) -> None:
        """The file again with only the readable lines indexed (copied a line at a time)."""
        self._write_moved(0)  # first: the new file holds only the indexed lines
        self.moved = 0
        tmp = self.path.with_name(self.path.name + ".tmp")
        offsets, lengths = array("q"), array("q")
        with self.path.open("rb") as src, tmp.open("wb") as dst:
            at = 0
            for offset, length in zip(self._offsets, self._lengths, strict=True):
                src.seek(offset)
                raw = src.read(length)
                if not raw.endswith(b"\n"):
                    raw += b"\n"  # (a last line whole but for its newline)
                dst.write(raw)
                offsets.append(at)
                lengths.append(len(raw))
                at += len(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self._offsets, self._lengths = offsets, lengths


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the append timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AuditRecorder:
    """``AuditSink`` over ``evcore.audit.AuditLog`` (+ the store's last-setpoint table).

    With ``journal_path``, a record the store does not take within ``append_timeout_s`` (keep it
    below the controller's ``audit_timeout_s``: the journal write must fit in the rest) goes to
    the local journal; ``append`` then returns normally and the decision may leave. Journaled
    records are moved into the audit log in order, before any newer record, by the next
    ``append`` (within the same budget), by ``replay_journal`` (the edge's start) and by
    ``drain``; one whose timed-out append committed after all is recognised by its decision id
    and not appended twice. Without ``journal_path`` a record the store does not take raises.
    """

    def __init__(
        self,
        audit_log: Any,
        store: Any = None,
        *,
        edge_id: str = "edge",
        journal_path: Path | None = None,
        append_timeout_s: float = 1.0,
        store_backoff_s: float = 1.0,
        store_backoff_max_s: float = 30.0,
    ) -> None:
        if not append_timeout_s > 0:
            raise ValueError(f"append_timeout_s must be positive, got {append_timeout_s!r}")
        if journal_path is not None and store is None:
            raise ValueError("an audit journal needs the store (to find records already moved)")
        self.audit_log = audit_log
        self.store = store
        self.edge_id = edge_id
        # This run's tag in its decision ids: the decision number starts again at 1 with every
        # start, so a restart whose clock comes back to a millisecond already used (a clock
        # stepped back; the twin's virtual clock over a store kept between runs) made an id the
        # chain already held. The store refused it, the recorder took that for an outage, and the
        # journal replay never got past it: every later record queued behind it for good.
        self.run_tag = secrets.token_hex(4)
        self.append_timeout_s = float(append_timeout_s)
        self.journal = AuditJournal(journal_path) if journal_path is not None else None
        # After the store failed, decisions are journaled at once (not after another wait on a
        # store that is down) until ``_retry_at`` (event loop time); the wait doubles up to
        # ``store_backoff_max_s`` while it keeps failing, and starts again at
        # ``store_backoff_s`` once it takes a record. 0 tries the store on every append.
        self.store_backoff_s = max(0.0, float(store_backoff_s))
        self.store_backoff_max_s = max(self.store_backoff_s, float(store_backoff_max_s))
        self._backoff = self.store_backoff_s
        self._retry_at = -math.inf
        #: Records written to the journal / moved from it into the audit log / found already in
        #: the chain (a timed-out append that committed after all) / durable nowhere.
        self.journaled = 0
        self.journal_moved = 0
        self.journal_skipped = 0
        self.journal_failures = 0
        self._order = asyncio.Lock()  # one append or replay at a time: the chain keeps order
        # What the moves of the journal read of the chain so far (``_recorded_ids``), so that a
        # move reads only what came after: the highest seq read (None: nothing yet), the ids
        # read that a pending record may repeat, and the seqs of the records the last move
        # appended and dropped from the journal itself (not repeats of anything pending). Each
        # move read the chain from the head the pending records were journaled at: after a long
        # outage every move read again every record moved since it began.
        self._chain_read_upto: int | None = None
        self._chain_found: set[str] = set()
        self._moved_seqs: set[int] = set()
        self._journal_lock = asyncio.Lock()  # one journal file operation at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self.store_failures = 0
        #: Decision numbers whose record is durable (for tests: nothing leaves before its record):
        #: the recent ones (at most ``2 * _KEEP_IDS``; it once held every decision of the run).
        self.durable: set[int] = set()
        #: Called with each record once durable (the facade's recent decisions and watchers),
        #: its ``decision_id`` the audit trail's (what ``ListDecisions`` returns).
        self.on_durable: Callable[[Mapping[str, Any]], None] | None = None
        self._ids: dict[int, str] = {}  # decision number -> decision id (recent ones)
        self.confirmations = 0
        # Last-setpoint bookkeeping waiting for the store, per charger (the latest wins): one
        # writer, one store operation (a batch) at a time, so a decision's audit append never
        # queues behind many of them on the store's connection (each is a durable commit).
        self._to_record: dict[str, tuple[setpoint_pb2.Setpoint, float]] = {}
        self._to_confirm: dict[str, tuple[str, float]] = {}
        self._writer: asyncio.Task[None] | None = None
        #: Store operations the writer performed (for tests and benchmarks).
        self.store_writes = 0

    @property
    def journal_pending(self) -> int:
        """Records in the journal, not yet in the audit log."""
        return 0 if self.journal is None else len(self.journal)

    async def append(self, record: Mapping[str, Any]) -> None:
        from evcore.audit.log import Decision

        decision_id = (
            f"{self.edge_id}-{self.run_tag}-{record['decision']}-{int(float(record['at']) * 1000)}"
        )
        setpoints = setpoints_of(record, decision_id)
        plan_version = record.get("plan_version") or ""
        decision = Decision(
            decision_id=decision_id,
            trigger=str(record["trigger"]),
            decided_at_s=float(record["at"]),
            setpoints=setpoints,
            bindings=bindings_of(record),
            inputs_digest=str(record.get("inputs_digest", "")),
            plan_version=int(plan_version.rsplit("@", 1)[-1]) if "@" in plan_version else 0,
            config_version=str(record.get("config_version", "")),
            edge_id=self.edge_id,
        )
        if self.journal is None:
            await self.audit_log.append(decision)
        else:
            await self._make_durable(decision)
        self.durable.add(int(record["decision"]))
        self._ids[int(record["decision"])] = decision_id
        while len(self._ids) > _KEEP_IDS:
            del self._ids[next(iter(self._ids))]
        if len(self.durable) > 2 * _KEEP_IDS:
            self.durable = set(self._ids)  # the recent ones (their ids are kept as well)
        if self.on_durable is not None:
            # With the audit trail's id: the counter alone ("24") named no record a client of
            # the API could fetch (review 2026-12-06).
            self.on_durable({**record, "decision_id": decision_id})
        if self.store is not None:
            # Last-setpoint bookkeeping is for restart recovery, not for this decision's safety
            # (the audit record above is): it runs beside the send, owned here.
            at = float(record["at"])
            for sp in setpoints:
                self._to_record[sp.charger_id] = (sp, at)
                self._to_confirm.pop(sp.charger_id, None)  # for an older decision: moot
            self._kick()

    async def _make_durable(self, decision: Any) -> None:
        """The record in the audit log (after everything journaled before it), or else in the
        journal; raises when it is in neither."""
        from evcore.audit.log import build_record

        assert self.journal is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.append_timeout_s
        async with self._order:
            try:
                async with self._journal_lock:  # a journal write of a cancelled append ends first
                    pending = len(self.journal) > 0
                if pending and loop.time() < self._retry_at:
                    why = (
                        f"the store failed; it is tried again in "
                        f"{self._retry_at - loop.time():.1f} s"
                    )
                else:
                    if pending:
                        await self._replay(deadline)
                    if not len(self.journal):
                        left = deadline - loop.time()
                        if left > 0:
                            await asyncio.wait_for(self.audit_log.append(decision), left)
                            self._store_ok()
                            return
                        why = "the append budget went to moving journaled records"
                    else:
                        why = f"{self.journal_pending} earlier record(s) still in the journal"
            except Exception as exc:
                why = _describe(exc)
                self._store_failed()
            # The same record the audit log would have sealed (``build_record`` is deterministic).
            await self._journal_write(build_record(decision, edge_id=self.edge_id), why)

    def _store_failed(self) -> None:
        self._retry_at = asyncio.get_running_loop().time() + self._backoff
        # Doubling from 0 stays 0: ``store_backoff_s=0`` tries the store on every append (a
        # floor here made the wait grow to milliseconds after a few failures).
        self._backoff = min(self.store_backoff_max_s, self._backoff * 2.0)

    def _store_ok(self) -> None:
        self._backoff = self.store_backoff_s
        self._retry_at = -math.inf

    async def keep_moving(self, every_s: float = 5.0) -> None:
        """Beside the loop: move journaled records into the audit log when the store is due to
        be tried again, so that a quiet site (no decision to append) does not leave them in the
        journal. Each try takes at most ``append_timeout_s`` (a decision's append waits for it).
        Runs until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            if self.journal_pending and loop.time() >= self._retry_at:
                await self.replay_journal(self.append_timeout_s)

    async def _journal_write(self, rec: Any, why: str) -> None:
        assert self.journal is not None
        journal = self.journal
        entry = JournalEntry(
            decision_id=rec.decision_id,
            after_seq=int(getattr(self.audit_log, "head_seq", -1)),
            decided_at_s=rec.decided_at.seconds + rec.decided_at.nanos / 1e9,
            payload=rec.SerializeToString(deterministic=True),
        )
        try:
            await self._journal_op(journal.append, entry)
        except Exception as exc:
            self.journal_failures += 1
            log.error(
                "audit: decision %s is durable nowhere: the store did not take it (%s) and the "
                "journal %s could not be written (%s); none of its setpoints may leave",
                rec.decision_id,
                why,
                journal.path,
                _describe(exc),
            )
            raise
        self.journaled += 1
        log.warning(
            "audit: the store did not take decision %s (%s); recorded in the local journal %s "
            "(%d record(s) pending), its setpoints may leave",
            rec.decision_id,
            why,
            journal.path,
            len(journal),
        )

    async def _journal_op(self, fn: Callable[..., None], *args: Any) -> None:
        """Run one blocking journal operation in a worker thread, to its end even if the caller
        is cancelled (the file and the journal's index stay in step)."""

        async def run() -> None:
            async with self._journal_lock:
                await asyncio.to_thread(fn, *args)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.shield(task)

    async def _replay(self, deadline: float) -> None:
        """Move journaled records into the audit log in order, until one fails or the deadline;
        drops those moved (or found already there) from the journal. Records are read from the
        journal file ``_REPLAY_PART`` at a time (a long outage's journal is not held at once)."""
        from evcore.v1.audit_pb2 import AuditRecord

        assert self.journal is not None
        journal = self.journal
        loop = asyncio.get_running_loop()

        def left() -> float:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            return remaining

        async with self._journal_lock:  # after a journal operation still running
            total = len(journal)
            after_seq, since_s = journal.min_after_seq(), journal.min_decided_at_s()
        if not total:
            return
        recorded = await asyncio.wait_for(self._recorded_ids(after_seq, since_s), left())
        done = 0
        appended: list[int] = []  # seqs of the records this move appended
        skipped: list[str] = []
        try:
            while done < total:
                async with self._journal_lock:
                    part = await asyncio.to_thread(
                        journal.read, done, min(_REPLAY_PART, total - done)
                    )
                if not part:
                    break
                for entry in part:
                    if entry.decision_id in recorded:
                        self.journal_skipped += 1
                        skipped.append(entry.decision_id)
                    else:
                        sealed = await asyncio.wait_for(
                            self.audit_log.append(AuditRecord.FromString(entry.payload)), left()
                        )
                        seq = getattr(sealed, "seq", None)
                        if isinstance(seq, int):
                            appended.append(seq)
                        self.journal_moved += 1
                    done += 1
        finally:
            # Until they are dropped from the journal, the records appended count as found (a
            # failed drop leaves them pending, and they must not be appended twice).
            self._moved_seqs = set()
            if done:
                await self._journal_op(journal.drop_first, done)
                self._moved_seqs = set(appended)
                recorded.difference_update(skipped)
                if not len(journal):
                    self._chain_read_upto = None
                    self._chain_found.clear()
                    self._moved_seqs.clear()
                log.info(
                    "audit: moved %d journaled record(s) into the audit log, %d still pending",
                    done,
                    len(journal),
                )

    async def _recorded_ids(self, after_seq: int, since_s: float) -> set[str]:
        """Decision ids already in the chain that a journaled record might repeat: those after
        the earliest head a pending record was journaled at (``after_seq``; or, when that head
        was not known, decided since the earliest pending record ``since_s``, less a minute for
        clock steps). What an earlier move read is not read again: only the records after it,
        but for the ones that move appended itself, join the ids it found. Read
        ``_CHAIN_PAGE`` records at a time, keeping only ids: after a restart in the middle of
        moving a long journal, everything the run before moved lies after that head, and was
        read at once."""
        found = self._chain_found
        while True:
            upto = self._chain_read_upto
            if upto is None and after_seq < 0:
                records = await self.store.audit_records(since_s=since_s - 60.0, limit=_CHAIN_PAGE)
            else:
                start = after_seq if upto is None else max(upto, after_seq)
                records = await self.store.audit_records(after_seq=start, limit=_CHAIN_PAGE)
                upto = start
            for r in records:
                if r.seq not in self._moved_seqs:
                    found.add(r.decision_id)
                upto = r.seq if upto is None else max(upto, r.seq)
            # Kept page by page: a move whose budget ends mid-read leaves the next to go on.
            self._chain_read_upto = upto
            if len(records) < _CHAIN_PAGE:
                return found

    async def replay_journal(self, timeout_s: float = 30.0) -> int:
        """Move what the journal holds (records left by a crash, or by a store outage) into the
        audit log, for at most ``timeout_s``; returns how many records remain in it."""
        if self.journal is None or not len(self.journal):
            return 0
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with self._order:
            try:
                opener = getattr(self.audit_log, "open", None)
                if opener is not None:  # loads the head the journal's records follow
                    await asyncio.wait_for(opener(), timeout_s)
                await self._replay(deadline)
                if not len(self.journal):
                    self._store_ok()
            except Exception as exc:
                self._store_failed()
                log.warning(
                    "audit: %d journaled record(s) not moved into the audit log yet (%s); the "
                    "next append tries again",
                    self.journal_pending,
                    _describe(exc),
                )
        return self.journal_pending

    def _kick(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
            self._tasks.add(self._writer)
            self._writer.add_done_callback(self._tasks.discard)

    async def _write(self) -> None:
        """Drain the bookkeeping into the store, one batch (one transaction) at a time: records
        first (a confirmation names the record's decision, so it follows it)."""
        while self._to_record or self._to_confirm:
            if self._to_record:
                batch = list(self._to_record.values())
                self._to_record.clear()
                try:
                    await self.store.add_setpoints(batch)
                except Exception:
                    self.store_failures += 1
                    log.exception("store: recording %d setpoint(s) failed", len(batch))
            else:
                confirmed = [(cid, d, at) for cid, (d, at) in self._to_confirm.items()]
                self._to_confirm.clear()
                try:
                    self.confirmations += await self.store.confirm_setpoints(confirmed)
                except Exception:
                    self.store_failures += 1
                    log.exception("store: confirming %d setpoint(s) failed", len(confirmed))
            self.store_writes += 1

    async def confirm(self, charger_id: str, decision_id: str, at: float) -> None:
        if self.store is not None:
            try:
                if await self.store.confirm_setpoint(charger_id, decision_id, at):
                    self.confirmations += 1
            except Exception:
                self.store_failures += 1
                log.exception("store: confirming setpoint for %s failed", charger_id)

    def confirm_sent(self, charger_id: str, decision: int, at: float) -> None:
        """The charger accepted the setpoint of decision number ``decision``: record it beside
        the loop (after the setpoint itself was remembered)."""
        decision_id = self._ids.get(decision)
        if decision_id is None or self.store is None:
            return
        self._to_confirm[charger_id] = (decision_id, at)
        self._kick()

    async def drain(self, *, journal_timeout_s: float = 10.0) -> None:
        """Wait for the store bookkeeping; try once more to move journaled records in."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.journal_pending:
            await self.replay_journal(journal_timeout_s)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


#: The store's meta key holding the chargers an operator made unavailable (a JSON list of ids).
UNAVAILABLE_KEY = "edge.unavailable_chargers"
#: How long saving them waits for the store (s) before the lever is answered UNAVAILABLE.
AVAILABILITY_SAVE_S = 5.0


async def save_unavailable(
    store: Any, state: SiteState, timeout_s: float = AVAILABILITY_SAVE_S
) -> list[str]:
    """Store which chargers an operator made unavailable (all of them, as they are now: the
    last save wins); returns them. ``StoreUnavailable`` when the store does not take it in
    ``timeout_s``."""
    from evcore.store.base import StoreUnavailable

    ids = sorted(c.charger_id for c in state.chargers.values() if not c.available)
    try:
        await asyncio.wait_for(store.set_meta(UNAVAILABLE_KEY, json.dumps(ids)), timeout_s)
    except TimeoutError as exc:
        raise StoreUnavailable(
            f"saving the chargers made unavailable: no answer within {timeout_s:g} s"
        ) from exc
    return ids


async def recover_unavailable(state: SiteState, store: Any) -> list[str]:
    """Hold the chargers an operator made unavailable before a restart unavailable again
    (``save_unavailable``); returns those found in the site."""
    try:
        text = await store.get_meta(UNAVAILABLE_KEY)
        ids = [] if text is None else json.loads(text)
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise ValueError(f"not a list of charger ids: {text!r}")
    except Exception as exc:
        log.error(
            "store: the chargers an operator made unavailable could not be read (%s): every "
            "charger starts available (set them again: SetChargerAvailability)",
            exc,
        )
        return []
    held = []
    for cid in ids:
        c = state.chargers.get(cid)
        if c is None:
            log.warning(
                "store: charger %r was made unavailable but is not in the site file; ignored", cid
            )
            continue
        c.available = False
        held.append(cid)
    if held:
        log.info("held unavailable as an operator set them before the restart: %s", held)
    return held


async def recover(state: SiteState, store: Any, keeper: SessionKeeper | None = None) -> int:
    """Load last setpoints and open sessions from the store into ``state``; returns how many.

    Recovered values are *unconfirmed*: the charger may have fallen back or rebooted since, so the
    envelope keeps counting each charger at least at its last value (or its maximum while its
    profile state is unknown) until the charger accepts a fresh profile.
    """
    n = 0
    last = await store.last_setpoints()
    for cid, rec in last.items():
        c = state.chargers.get(cid)
        if c is None:
            continue
        sp = rec.setpoint
        value = sp.setpoint_w if sp.HasField("setpoint_w") else sp.setpoint_a
        c.sent = float(value)
        c.accepted = False
        c.needs_resend = True
        n += 1
    with contextlib.suppress(Exception):
        # Newest first: a charger's newest open transaction is its session (an older one whose
        # end was lost stays open in the store until the central system supersedes it).
        open_txs = await store.list_open_transactions()
        open_txs.sort(key=lambda t: (t.started_at_s or 0.0, t.transaction_id), reverse=True)
        for tx in open_txs:
            c = state.chargers.get(tx.charger_id)
            if c is not None and c.transaction_id is None:
                c.transaction_id = tx.transaction_id
                c.plugged = True
    # Open sessions: what the operator set comes back (a priority outside today's range does not).
    with contextlib.suppress(Exception):
        for rec in await store.list_open_sessions():
            c = state.chargers.get(rec.charger_id)
            if c is None:
                # Taken out of the site file (or renamed) while a car charged on it: its car may
                # still draw what its station's profiles allow, and nothing counts it now.
                log.warning(
                    "store: session %s (transaction %s, started at %s) is open at charger %r, "
                    "which is not in the site file: if its car still charges, its draw is not "
                    "counted (put the charger back, or stop the transaction at the station)",
                    rec.session_id,
                    rec.transaction_id,
                    rec.started_at_s,
                    rec.charger_id,
                )
                continue
            if c.transaction_id not in (None, rec.transaction_id):
                continue
            if c.transaction_id is None and rec.transaction_id:
                c.transaction_id = rec.transaction_id
                c.plugged = True
            c.session_started_at = rec.started_at_s
            # The energy it had delivered (saved as readings came, ``SessionKeeper.note_energy``):
            # counted from 0 until the next reading, the car needed its whole request again.
            if math.isfinite(rec.energy_delivered_kwh):
                c.session_energy_wh = max(c.session_energy_wh, rec.energy_delivered_kwh * 1000.0)
                # The central system may count it from 0 again (``count_session_energy``).
                c.energy_restored_wh = c.session_energy_wh
            c.departure = rec.departure_s
            c.energy_requested_kwh = rec.energy_requested_kwh
            if priority_error(rec.priority) is None:
                c.priority = rec.priority
            if keeper is not None:
                keeper.open[rec.charger_id] = rec
    return n


#: How often a session's delivered energy is saved as its readings raise it (s, per session).
SESSION_ENERGY_SAVE_S = 60.0
#: A session save the store refused is tried again after this, doubling up to the maximum (s).
SESSION_RETRY_S = 1.0
SESSION_RETRY_MAX_S = 30.0


class SessionKeeper:
    """Saves sessions in the store when they start, end or are steered, and their delivered
    energy as readings raise it, at most every ``energy_save_s`` per session (beside the loop)."""

    def __init__(
        self,
        store: Any,
        clock: Any,
        *,
        energy_save_s: float = SESSION_ENERGY_SAVE_S,
        retry_s: float = SESSION_RETRY_S,
    ) -> None:
        self.store = store
        self.clock = clock
        self.energy_save_s = float(energy_save_s)
        # A save the store refused is tried again after this (s, real time), doubling up to
        # ``SESSION_RETRY_MAX_S`` while it keeps failing.
        self.retry_s = max(0.0, float(retry_s))
        self._retry_wait = self.retry_s
        # charger id -> (transaction id, monotonic instant its energy was saved last)
        self._energy_saved: dict[str, tuple[str, float]] = {}
        self.open: dict[str, Any] = {}  # charger id -> SessionRecord
        # charger id -> the SessionRecord that ended last (its transaction's end may come after
        # the status that ended it, with the energy since the last reading)
        self.closed: dict[str, Any] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.failures = 0
        # Records waiting for the store, per session id, in the order they were made; one
        # writer saves them one at a time (``_write``).
        self._waiting: dict[str, Any] = {}
        self._writer: asyncio.Task[None] | None = None

    def __call__(self, c: ChargerState, ended: str | None, ended_wh: float | None = None) -> None:
        """Save ``c``'s session (``ended``: the transaction that ended, with ``ended_wh``, the
        energy into the car it ended with)."""
        from dataclasses import replace

        from evcore.store.base import SessionRecord

        now = float(self.clock.now())
        prev = self.open.get(c.charger_id)
        if ended is not None:
            if prev is None or prev.transaction_id != ended:
                done = self.closed.get(c.charger_id)
                if done is None or done.transaction_id != ended or ended_wh is None:
                    return
                # Its end, after the status that ended it: the energy it carries counts.
                if not (math.isfinite(ended_wh) and ended_wh / 1000.0 > done.energy_delivered_kwh):
                    return
                rec = replace(done, energy_delivered_kwh=ended_wh / 1000.0, updated_at_s=now)
                self.closed[c.charger_id] = rec
                self._spawn(rec)
                return
            # The energy it ended with (before: the one saved last, at its start or when it was
            # last steered: 0 kWh for most sessions).
            delivered = prev.energy_delivered_kwh
            if ended_wh is not None and math.isfinite(ended_wh):
                delivered = max(delivered, ended_wh / 1000.0)
            rec = replace(
                prev,
                ended_at_s=now,
                energy_delivered_kwh=delivered,
                updated_at_s=now,
            )
            del self.open[c.charger_id]
            self.closed[c.charger_id] = rec
        else:
            tx = c.transaction_id or ""
            if prev is None or prev.transaction_id != tx:
                prev = SessionRecord(
                    session_id=f"{c.charger_id}:{tx}",
                    charger_id=c.charger_id,
                    started_at_s=float(c.session_started_at or now),
                    transaction_id=tx,
                )
            rec = replace(
                prev,
                departure_s=c.departure,
                energy_requested_kwh=c.energy_requested_kwh,
                priority=c.priority,
                energy_delivered_kwh=c.session_energy_wh / 1000.0,
                updated_at_s=now,
            )
            self.open[c.charger_id] = rec
        self._spawn(rec)

    def late(
        self,
        charger_id: str,
        transaction_id: str,
        started_at_s: float,
        ended_at_s: float,
        energy_wh: float | None,
    ) -> None:
        """An older transaction a station replayed (its start came after the charger's session
        began, so it never was the charger's session): saved as a session of its own, ended."""
        from evcore.store.base import SessionRecord

        delivered = energy_wh / 1000.0 if energy_wh is not None and math.isfinite(energy_wh) else 0
        self._spawn(
            SessionRecord(
                session_id=f"{charger_id}:{transaction_id}",
                charger_id=charger_id,
                started_at_s=float(started_at_s),
                transaction_id=transaction_id,
                energy_delivered_kwh=max(0.0, float(delivered)),
                ended_at_s=float(ended_at_s),
                updated_at_s=float(self.clock.now()),
            )
        )

    def note_energy(self, c: ChargerState) -> None:
        """A reading raised ``c``'s session energy: saved when ``energy_save_s`` passed since it
        was saved last (a restart takes it back, ``recover``; it was saved only at the start,
        when steered and at the end, and a restarted edge counted 0 kWh delivered)."""
        tx = c.transaction_id
        if tx is None:
            return
        now = float(self.clock.monotonic())
        last = self._energy_saved.get(c.charger_id)
        if last is not None and last[0] == tx and now - last[1] < self.energy_save_s:
            return
        self._energy_saved[c.charger_id] = (tx, now)
        self(c, None)

    def _spawn(self, rec: Any) -> None:
        # The latest record of a session replaces one still waiting (a store that is slow or
        # down holds at most one record per session, not one per save).
        self._waiting[rec.session_id] = rec
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())
            self._tasks.add(self._writer)
            self._writer.add_done_callback(self._tasks.discard)

    async def _write(self) -> None:
        """One save at a time, in the order they were made: an energy save made before the end
        must not commit after it and reopen the session. A save the store refuses is kept
        (unless a newer record of its session came meanwhile) and tried again after
        ``retry_s``: dropped, a session that ended while the store was away stayed open there
        for good, with the energy saved before, and a restart took it back as a session."""
        while self._waiting:
            sid = next(iter(self._waiting))
            rec = self._waiting.pop(sid)
            if await self._save(rec):
                self._retry_wait = self.retry_s
                continue
            self._waiting.setdefault(sid, rec)
            await asyncio.sleep(self._retry_wait)
            self._retry_wait = min(SESSION_RETRY_MAX_S, max(self._retry_wait * 2.0, 0.01))

    async def _save(self, rec: Any) -> bool:
        try:
            await self.store.upsert_session(rec)
            return True
        except Exception:
            self.failures += 1
            log.exception("store: saving session %s failed", rec.session_id)
            return False

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the saves made so far, at most ``timeout_s`` while the store refuses them
        (then what is left is logged and given up)."""

        async def settled() -> None:
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            await asyncio.wait_for(settled(), timeout_s)
        except TimeoutError:
            log.error(
                "store: %d session record(s) not saved (%s); given up",
                len(self._waiting),
                ", ".join(list(self._waiting)[:10]),
            )
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
