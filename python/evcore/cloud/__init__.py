"""The cloud side of evcore: the ``CloudApi`` gRPC service that many sites' edges upload their audit
chains, telemetry and topologies to and fetch plans from (docs/cloud.md).

The cloud records and checks what edges send; it never decides a setpoint and never repairs a
chain it was sent.
"""

from __future__ import annotations

from evcore.cloud.config import CloudConfig, CloudConfigError
from evcore.cloud.consumer import AuditConsumer
from evcore.cloud.service import CloudApiServer, CloudApiService
from evcore.cloud.store import AuditBatchResult, AuditRefused, CloudStore, open_cloud_store
from evcore.cloud.topology import site_from_topology, topology_from_site

__all__ = [
    "AuditBatchResult",
    "AuditConsumer",
    "AuditRefused",
    "CloudApiServer",
    "CloudApiService",
    "CloudConfig",
    "CloudConfigError",
    "CloudStore",
    "open_cloud_store",
    "site_from_topology",
    "topology_from_site",
]
