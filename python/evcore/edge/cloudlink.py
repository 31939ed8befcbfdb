"""The edge's link to the cloud service (``evcore.v1.CloudApi``, docs/cloud.md), from the edge side.

What this module owns: putting the site's topology to the cloud, uploading the audit chain from
where the cloud's copy ends, uploading the chargers' latest measurements, and fetching the plan
the cloud made for the site. It runs beside the control loop and never holds it up: an
unreachable cloud is logged once per outage and retried every ``interval_s``; nothing is lost,
because the audit chain is read from the edge's store from the cloud's ``contiguous_count`` on,
and every upload is idempotent at the cloud (a repeat is dropped there).

It never decides a setpoint: a fetched plan goes to the controller as a cloud plan, like one from
the bus (``EdgeController.set_plan``), and the envelope still decides every setpoint under it.

Configuration: the site file's ``[cloud]`` section (``CloudLinkConfig.from_section``).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from evcore.clock import Clock
from evcore.site.sections import Key, Section
from evcore.v1 import cloud_api_pb2 as cpb
from evcore.v1 import cloud_api_pb2_grpc as cpb_grpc
from evcore.v1.audit_pb2 import AuditRecord
from evcore.v1.meter_pb2 import MeterSampleBatch

log = logging.getLogger("evcore.edge.cloud")

#: The header that names the site to a cloud in insecure (development) mode (cloud/auth.py).
SITE_HEADER = "x-evcore-site-id"


#: Codes that mean the cloud is away (the round ends; the next one retries).
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: While no newer plan is found, every this many rounds the newest one is asked for too: a
#: cloud whose plans were restored from a backup numbers them below the version held.
PLAN_RECHECK_ROUNDS = 30


class CloudLinkConfigError(ValueError):
    """The ``[cloud]`` section is wrong; the message names the key."""


@dataclass(frozen=True)
class CloudLinkConfig:
    """The validated ``[cloud]`` section of a site file (docs/cloud.md, "The edge's link")."""

    #: ``host:port`` of the cloud's CloudApi.
    url: str
    #: PEM files: the CA that signed the cloud's server certificate, and this site's client
    #: certificate (its common name is the site id) and key. None only in insecure mode.
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: The name the cloud's certificate is checked against, when ``url`` names it otherwise.
    server_name: str | None = None
    #: Plaintext, the site named by a header: local development only (the cloud must say so too).
    insecure: bool = False
    interval_s: float = 10.0
    timeout_s: float = 10.0
    #: Audit records per upload call.
    batch: int = 256
    telemetry: bool = True
    plans: bool = True

    @staticmethod
    def from_section(
        section: Mapping[str, Any] | None, base_dir: Path | str
    ) -> CloudLinkConfig | None:
        """None without a section (or with ``enabled = false``); ``CloudLinkConfigError`` naming
        the key for anything wrong."""
        if section is None:
            return None
        if isinstance(section, Mapping) and section.get("enabled") is False:
            _SECTION.refuse_unknown(section)  # the rest is not checked: files may be missing
            return None
        s = _SECTION.read(section, base_dir)
        files = {k: s.get(k) for k in _FILES}
        if s["insecure"] and any(files.values()):
            raise CloudLinkConfigError(
                "[cloud] insecure = true takes no ca_file, cert_file or key_file"
            )
        if not s["insecure"] and not all(files.values()):
            missing = ", ".join(k for k, v in files.items() if v is None)
            raise CloudLinkConfigError(
                f"[cloud] needs ca_file, cert_file and key_file (mTLS; missing: {missing}), "
                f"or insecure = true for local development"
            )
        s.pop("enabled")
        return CloudLinkConfig(**s)


_FILES = ("ca_file", "cert_file", "key_file")
_SECTION = Section(
    "[cloud]",
    {
        **dict.fromkeys(("enabled", "telemetry", "plans"), Key("bool", True)),
        "url": Key("host_port", required=True, connect=True, example='url = "cloud:50061"'),
        **dict.fromkeys(_FILES, Key("file")),
        "server_name": Key("text"),
        "insecure": Key("bool", False),
        "interval_s": Key("number", 10.0, lo=0.05, hi=86_400.0),
        "timeout_s": Key("number", 10.0, lo=0.05, hi=3_600.0),
        "batch": Key("integer", 256, lo=1, hi=100_000),
    },
    CloudLinkConfigError,
)


@dataclass
class CloudLinkStats:
    #: The cloud's ``topology_version`` of this site after the last PutTopology (None: not yet).
    topology_version: int | None = None
    #: Records the cloud holds from seq 0 without a gap (None: not asked yet).
    audit_contiguous: int | None = None
    audit_stored: int = 0
    audit_repeats: int = 0
    telemetry_batches: int = 0
    telemetry_samples: int = 0
    plan_version: int = 0
    plans_applied: int = 0
    #: Steps that failed (cloud unreachable, a call refused, the edge's store away).
    failures: int = 0
    last_error: str = ""
    #: Per step ("topology", "audit", "telemetry", "plan") the error of its last run, while it
    #: fails.
    step_errors: dict[str, str] = field(default_factory=dict)
    #: Wall time of the last round that completed.
    last_sync_at: float | None = None
    #: Times the TLS files were re-read after they changed and the channel rebuilt with them.
    tls_reloads: int = 0
    #: Why the TLS files on disk are not in use (a bad new file; the previous ones are), or "".
    tls_error: str = ""


async def _items(items: Sequence[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


class CloudLink:
    """Keeps the cloud's copy of this site up to date (``run``), one round every ``interval_s``.

    ``store``: the edge's store (the audit chain is read from it). ``ctrl``: the controller
    (measurements for telemetry, ``set_plan`` for fetched plans); None uploads audit and
    topology only. ``topology``: the ``SiteTopology`` message of the loaded site."""

    def __init__(
        self,
        config: CloudLinkConfig,
        *,
        site_id: str,
        store: Any,
        clock: Clock,
        topology: Any = None,
        ctrl: Any = None,
    ) -> None:
        self.config = config
        self.site_id = site_id
        self.store = store
        self.clock = clock
        self.topology = topology
        self.ctrl = ctrl
        self.stats = CloudLinkStats()
        self._channel: grpc.aio.Channel | None = None
        self._stub: cpb_grpc.CloudApiStub | None = None
        self._stop = asyncio.Event()
        self._down = False
        # Per charger, the monotonic time of the measurement uploaded last.
        self._sent_measured: dict[str, float] = {}
        self._round = 0
        self.synced = asyncio.Event()  # set after each round that completed
        # The TLS credentials in use, and the files' stat when they were last looked at.
        self._tls: _Tls | None = None
        self._tls_stamp: tuple[tuple[int, ...], ...] | None = None

    # -- the channel ------------------------------------------------------------------------
    def _open(self) -> cpb_grpc.CloudApiStub:
        if self._stub is not None:
            return self._stub
        cfg = self.config
        # A cloud back after an outage is reconnected to within a round, not after gRPC's
        # default backoff of up to 120 s.
        backoff_ms = int(min(cfg.interval_s, 30.0) * 1000)
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        if cfg.insecure:
            self._channel = grpc.aio.insecure_channel(cfg.url, options=options)
        else:
            if self._tls is None:
                self._tls_stamp = _stamp(self._tls_files())
                self._tls = _load_tls(*self._tls_files())
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._tls.ca,
                private_key=self._tls.key,
                certificate_chain=self._tls.cert,
            )
            if cfg.server_name:
                options.append(("grpc.ssl_target_name_override", cfg.server_name))
            self._channel = grpc.aio.secure_channel(cfg.url, creds, options=options)
        self._stub = cpb_grpc.CloudApiStub(self._channel)
        return self._stub

    def _tls_files(self) -> tuple[Path, Path, Path]:
        cfg = self.config
        assert cfg.ca_file and cfg.cert_file and cfg.key_file
        return cfg.ca_file, cfg.cert_file, cfg.key_file

    async def _reload_tls(self) -> None:
        """Before each round: when the TLS files changed on disk (stat: mtime, ctime, size,
        inode), read and check them, and if they hold new credentials close the channel so the
        next call connects with them (a rotated certificate needs no restart). A file that is
        missing, unreadable, not PEM, a key that is not the certificate's, or a certificate not
        valid now keeps the credentials in use and is logged, naming the file."""
        if self.config.insecure or self._tls is None:
            return  # the first call loads them
        files = self._tls_files()
        stamp = await asyncio.to_thread(_stamp, files)
        if stamp == self._tls_stamp:
            return
        self._tls_stamp = stamp
        try:
            new = await asyncio.to_thread(_load_tls, *files)
        except ValueError as exc:
            # Looked at again every round until good (a certificate not valid yet becomes valid
            # without a change on disk); logged when what is wrong changes.
            self._tls_stamp = None
            if str(exc) != self.stats.tls_error:
                log.error(
                    "cloud link: %s; keeping the credentials in use (%s)", exc, self._tls.subject
                )
            self.stats.tls_error = str(exc)
            return
        self.stats.tls_error = ""
        if new == self._tls:
            return  # touched, not changed
        log.warning(
            "cloud link: TLS files changed; reconnecting as %s (valid until %s, was %s)",
            new.subject,
            new.not_after,
            self._tls.subject,
        )
        self._tls = new
        self.stats.tls_reloads += 1
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SITE_HEADER, self.site_id),) if self.config.insecure else ()

    async def close(self) -> None:
        self._stop.set()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    def stop(self) -> None:
        self._stop.set()

    # -- the loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        """One round now and every ``interval_s`` until ``stop`` (or a cancel); errors are
        logged, never raised: the control loop beside it must not end because the cloud or the
        store is away (review 2026-12-05: a store outage raised out of here ended the edge)."""
        while not self._stop.is_set():
            try:
                await self.sync_once()
            except Exception:  # a bug in a round: logged, the next round runs
                self.stats.failures += 1
                log.exception("cloud link: round failed")
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.interval_s)
            except TimeoutError:
                pass

    async def sync_once(self) -> bool:
        """One round: topology (until the cloud took it), audit from where the cloud's copy
        ends, telemetry, plan, each on its own: one that fails (a refused upload, a store
        outage) does not keep the others from running, except that a cloud found unreachable
        ends the round. Returns whether every step completed."""
        await self._reload_tls()
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if self.topology is not None and self.stats.topology_version is None:
            steps.append(("topology", self._put_topology))
        steps.append(("audit", self._upload_audit))
        if self.config.telemetry and self.ctrl is not None:
            steps.append(("telemetry", self._upload_telemetry))
        if self.config.plans and self.ctrl is not None:
            steps.append(("plan", self._fetch_plan))
        self._round += 1
        ok = True
        unreachable = False
        for name, step in steps:
            try:
                await step()
            except grpc.aio.AioRpcError as exc:
                ok = False
                code = exc.code()
                if code in _UNREACHABLE:
                    unreachable = True
                    self._unreachable(f"{code.name}: {exc.details()}")
                    break
                self._step_failed(name, f"{code.name}: {exc.details()}")
            except Exception as exc:  # the edge's store away, a bad record: this step only
                ok = False
                self._step_failed(name, f"{type(exc).__name__}: {exc}")
            else:
                self.stats.step_errors.pop(name, None)
        if not unreachable and self._down:
            self._down = False
            log.warning("cloud %s reachable again", self.config.url)
        if ok:
            self.stats.last_sync_at = self.clock.now()
            self.synced.set()
        return ok

    def _unreachable(self, what: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = what
        if not self._down:
            self._down = True
            log.warning(
                "cloud %s unreachable (%s); control goes on, uploads retried every %g s",
                self.config.url,
                what,
                self.config.interval_s,
            )

    def _step_failed(self, step: str, what: str) -> None:
        """A step refused by the cloud for its content (a fork of the chain, say) or failed on
        the edge's side: logged when its message changes, counted every time."""
        self.stats.failures += 1
        self.stats.last_error = f"{step}: {what}"
        if self.stats.step_errors.get(step) != what:
            log.error("cloud link: %s failed: %s", step, what)
        self.stats.step_errors[step] = what

    # -- what is sent -------------------------------------------------------------------------
    async def _put_topology(self) -> None:
        ack = await self._open().PutTopology(
            self.topology,
            timeout=self.config.timeout_s,
            metadata=self._metadata(),
            wait_for_ready=True,
        )
        self.stats.topology_version = int(ack.topology_version)
        log.info("cloud: topology put (version %d)", ack.topology_version)

    async def _audit_call(self, records: Sequence[AuditRecord]) -> Any:
        return await self._open().UploadAudit(
            _items(records),
            timeout=self.config.timeout_s,
            metadata=self._metadata(),
            wait_for_ready=True,
        )

    async def _upload_audit(self) -> None:
        if self.stats.audit_contiguous is None:
            # An empty upload: the cloud answers how much of the chain it holds.
            ack = await self._audit_call([])
            self.stats.audit_contiguous = int(ack.contiguous_count)
        while not self._stop.is_set():
            held = self.stats.audit_contiguous
            assert held is not None
            records = await self.store.audit_records(after_seq=held - 1, limit=self.config.batch)
            if not records:
                return
            ack = await self._audit_call(records)
            self.stats.audit_stored += int(ack.stored_count)
            self.stats.audit_repeats += int(ack.duplicate_count)
            self.stats.audit_contiguous = int(ack.contiguous_count)
            if int(ack.contiguous_count) <= held:
                # Nothing joined the cloud's chain (records before seq `held` missing on this
                # edge, e.g. pruned): say so, and do not send the same batch again at once.
                raise ValueError(
                    f"the cloud's chain holds {held} records without a gap and the edge's "
                    f"records from seq {records[0].seq} did not extend it"
                )
            if len(records) < self.config.batch:
                return

    def _readings(self) -> list[_Reading]:
        """Plain copies of the readings taken since the last upload (cheap: on the loop); the
        protobuf is built from them in a worker thread (``_batch``)."""
        now_w, now_m = self.clock.now(), self.clock.monotonic()
        out: list[_Reading] = []
        for cid, c in self.ctrl.state.chargers.items():
            at = c.measured_at
            if at is None or at <= self._sent_measured.get(cid, -math.inf):
                continue
            offered = c.holding if c.accepted else None
            out.append(
                _Reading(
                    cid,
                    at,
                    now_w - (now_m - at),
                    str(c.transaction_id or ""),
                    tuple(c.measured_a),
                    c.measured_w,
                    offered,
                    bool(c.is_dc),
                )
            )
        return out

    async def _upload_telemetry(self) -> None:
        readings = self._readings()
        if not readings:
            return
        batch = await asyncio.to_thread(_batch, readings)
        await self._open().UploadTelemetry(
            _items([batch]),
            timeout=self.config.timeout_s,
            metadata=self._metadata(),
            wait_for_ready=True,
        )
        self._sent_measured.update((r.charger_id, r.measured_mono) for r in readings)
        self.stats.telemetry_batches += 1
        self.stats.telemetry_samples += len(readings)

    async def _get_plan(self, newer_than: int) -> Any:
        req = cpb.GetPlanRequest(site_id=self.site_id, newer_than_version=newer_than)
        try:
            return await self._open().GetPlan(
                req, timeout=self.config.timeout_s, metadata=self._metadata(), wait_for_ready=True
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def _fetch_plan(self) -> None:
        from evcore.edge.signals import plan_from_proto

        held = self.stats.plan_version
        plan = await self._get_plan(held)
        if plan is None and held > 0 and self._round % PLAN_RECHECK_ROUNDS == 0:
            newest = await self._get_plan(0)
            if newest is not None and int(newest.plan_version) < held:
                # The cloud numbers its plans below the version held (its plans were restored
                # from a backup, say): without this the edge would wait for version held + 1.
                log.warning(
                    "cloud: newest plan is version %d, below the %d applied; taking it",
                    newest.plan_version,
                    held,
                )
                plan = newest
        if plan is None:
            return  # nothing newer: keep what is in force
        self.stats.plan_version = int(plan.plan_version)
        now = self.clock.now()
        if plan.HasField("valid_until") and _ts(plan.valid_until) <= now:
            log.warning(
                "cloud: plan %s version %d expired at %s; not applied",
                plan.plan_id,
                plan.plan_version,
                plan.valid_until.ToJsonString(),
            )
            return
        # Its age counts from when it was computed, not from when this edge fetched it.
        made = _ts(plan.computed_at) if plan.HasField("computed_at") else now
        ctrl = self.ctrl
        targets = plan_from_proto(
            plan.SerializeToString(), min(made, now), lambda cid: cid in ctrl.state.chargers
        )
        if targets.source == "cloud":
            ctrl.set_plan(targets)
            self.stats.plans_applied += 1
            log.info("cloud: plan %s version %d applied", plan.plan_id, plan.plan_version)


@dataclass(frozen=True)
class _Tls:
    """PEM credentials read from the ``[cloud]`` files and checked to belong together."""

    ca: bytes
    cert: bytes
    key: bytes
    subject: str = field(compare=False)
    not_after: str = field(compare=False)


def _stamp(files: Sequence[Path]) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    for p in files:
        try:
            st = p.stat()
        except OSError:
            out.append(())
        else:
            out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _load_tls(ca_file: Path, cert_file: Path, key_file: Path) -> _Tls:
    """The three files' bytes, or ``ValueError`` naming the file that is wrong."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def read(key: str, path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"[cloud].{key} {str(path)!r}: cannot read ({exc.strerror})") from None

    ca, cert, key = (
        read("ca_file", ca_file),
        read("cert_file", cert_file),
        read("key_file", key_file),
    )
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        raise ValueError(f"[cloud].ca_file {str(ca_file)!r}: not a PEM certificate") from None
    try:
        leaf = x509.load_pem_x509_certificates(cert)[0]
    except ValueError:
        raise ValueError(f"[cloud].cert_file {str(cert_file)!r}: not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        raise ValueError(
            f"[cloud].key_file {str(key_file)!r}: not an unencrypted PEM private key"
        ) from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValueError(
            f"[cloud].key_file {str(key_file)!r}: not the key of cert_file {str(cert_file)!r}"
        )
    # Checked against the real time, as the cloud's TLS handshake does.
    now = dt.datetime.now(dt.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise ValueError(
            f"[cloud].cert_file {str(cert_file)!r}: valid from {leaf.not_valid_before_utc} to "
            f"{leaf.not_valid_after_utc}, not now"
        )
    return _Tls(ca, cert, key, leaf.subject.rfc4514_string(), str(leaf.not_valid_after_utc))


def _ts(t: Any) -> float:
    return float(t.seconds) + float(t.nanos) * 1e-9


@dataclass(frozen=True, slots=True)
class _Reading:
    charger_id: str
    measured_mono: float
    measured_wall: float
    transaction_id: str
    current_a: tuple[float | None, ...]
    power_w: float | None
    offered: float | None
    is_dc: bool


def _batch(readings: Sequence[_Reading]) -> MeterSampleBatch:
    """The ``MeterSampleBatch`` of ``readings`` (a worker thread builds it)."""
    batch = MeterSampleBatch()
    for r in sorted(readings, key=lambda r: r.charger_id):
        s = batch.samples.add(charger_id=r.charger_id)
        if r.transaction_id:
            s.transaction_id = r.transaction_id
        ns = int(r.measured_wall * 1e9)
        s.sampled_at.FromNanoseconds(ns)
        s.received_at.FromNanoseconds(ns)
        s.current_a.extend(math.nan if v is None else float(v) for v in r.current_a)
        if r.power_w is not None and math.isfinite(r.power_w):
            s.power_w = float(r.power_w)
        if r.offered is not None and math.isfinite(r.offered):
            # What the charger offers the car is the limit in force (docs/cloud.md: the fleet
            # split counts a charger drawing 90 % of its offer at its maximum).
            if r.is_dc:
                s.offered_power_w = float(r.offered)
            else:
                s.offered_current_a = float(r.offered)
    return batch
