"""Helpers of the cloud tests: the running service (real socket, real mTLS, real store), sealed
audit chains, request streams."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
from evcore.audit.chain import seal
from evcore.clock import ManualClock
from evcore.cloud import CloudApiServer, CloudConfig, CloudStore, open_cloud_store
from evcore.v1 import cloud_api_pb2_grpc as pb_grpc
from evcore.v1.audit_pb2 import AuditRecord, ChargerBinding
from evcore.v1.setpoint_pb2 import Setpoint
from pg_testkit import PG_DSN

T0 = 1_767_225_600.0
SITES = ("depot-1", "depot-2")


def _load_cert_helpers() -> Any:
    if "ocpp_certs" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "ocpp" / "ocpp_certs.py"
        spec = importlib.util.spec_from_file_location("ocpp_certs", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["ocpp_certs"] = module
        spec.loader.exec_module(module)
    return sys.modules["ocpp_certs"]


def pg_url(schema: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(PG_DSN)
    user = info.get("user", "postgres")
    return (
        f"postgresql://{user}@{info.get('host', '127.0.0.1')}:{info.get('port', 5432)}/"
        f"{info.get('dbname', 'test')}?schema={schema}"
    )


@dataclass
class Cloud:
    port: int
    ca: bytes
    clients: dict[str, tuple[bytes, bytes]]
    store: CloudStore
    server: CloudApiServer
    clock: ManualClock

    def channel(self, site: str | None) -> grpc.aio.Channel:
        client = self.clients[site] if site else None
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=client[1] if client else None,
            certificate_chain=client[0] if client else None,
        )
        return grpc.aio.secure_channel(f"127.0.0.1:{self.port}", creds)

    def stub(self, channel: grpc.aio.Channel) -> pb_grpc.CloudApiStub:
        return pb_grpc.CloudApiStub(channel)


def make_certs(tmp_path: Path) -> tuple[dict[str, str], bytes, dict[str, tuple[bytes, bytes]]]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate per site of ``SITES``
    (common name = site id): the ``[tls]`` table, the CA's PEM and each site's (cert, key) PEMs."""
    certs = _load_cert_helpers()
    tmp_path.mkdir(parents=True, exist_ok=True)
    ca = certs.CertAuthority(tmp_path, "cloud test CA")
    server_cert, server_key = ca.issue("localhost", server=True)
    clients = {}
    for site in SITES:
        cert, key = ca.issue(site)
        clients[site] = (Path(cert).read_bytes(), Path(key).read_bytes())
    tls = {"cert_file": server_cert, "key_file": server_key, "client_ca_file": str(ca.ca_path)}
    return tls, ca.ca_path.read_bytes(), clients


async def start_cloud(
    tmp_path: Path, store_url: str, *, store: dict[str, Any] | None = None
) -> Cloud:
    """A started cloud service with mTLS; client certificates for ``SITES``; ``store``: more keys
    of its ``[store]`` table."""
    tls, ca_pem, clients = make_certs(tmp_path)
    config = CloudConfig.from_table(
        {"listen": "127.0.0.1:0", "tls": tls, "store": {"url": store_url, **(store or {})}},
        tmp_path,
    )
    store = open_cloud_store(
        config.store_url,
        tmp_path,
        read_timeout_s=config.store_read_timeout_s,
        write_timeout_s=config.store_write_timeout_s,
    )
    clock = ManualClock(T0)
    server = CloudApiServer(config, store, clock=clock)
    port = await server.start()
    return Cloud(port, ca_pem, clients, store, server, clock)


def chain(n: int, *, site_tag: str = "") -> list[AuditRecord]:
    """``n`` records sealed one after the other with evcore.audit.chain.seal (seq from 0)."""
    out: list[AuditRecord] = []
    prev = ""
    for i in range(n):
        r = AuditRecord(
            decision_id=f"{i}@{site_tag}2026-01-01T00:00:{i:02d}Z",
            trigger="tick" if i % 2 else "meter:C1",
            inputs_digest=f"{i:064x}",
            config_version="cfg-1",
            edge_id="edge-1",
        )
        r.decided_at.FromSeconds(int(T0) + i)
        r.setpoints.append(
            Setpoint(charger_id="C1", setpoint_a=16.0 + i, reason="held: feeder F1 phase L1")
        )
        r.bindings.append(ChargerBinding(charger_id="C2", reason="no session"))
        sealed = seal(r, seq=i, prev_hash=prev)
        out.append(sealed)
        prev = sealed.hash
    return out


async def stream(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def run_evcore(*args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    """``evcore ARGS`` as a child process to its end: (exit code, stdout, stderr)."""
    exe = shutil.which("evcore")
    assert exe is not None, "the evcore console script is not installed"
    proc = await asyncio.create_subprocess_exec(
        exe, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def cloud_serve(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``evcore cloud serve --config CONFIG`` as a child process (stdout and stderr piped); killed
    on exit if it is still running."""
    exe = shutil.which("evcore")
    assert exe is not None, "the evcore console script is not installed"
    proc = await asyncio.create_subprocess_exec(
        exe,
        "cloud",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def wait_until(pred: Callable[[], object], what: str, timeout_s: float = 20.0) -> None:
    """Poll ``pred()`` every 50 ms until true; fail naming ``what`` after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
