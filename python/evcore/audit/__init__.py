"""The edge's audit trail: every decision that changes a setpoint, durable before its setpoints
leave, append-only and hash-chained (docs/audit.md). ``evcore audit verify`` / ``show`` are in
``cli``."""

from __future__ import annotations

from evcore.audit.chain import VerifyReport, canonical_bytes, record_hash, seal, verify_chain
from evcore.audit.log import AuditLog, Decision, build_record, digest_inputs

__all__ = [
    "AuditLog",
    "Decision",
    "VerifyReport",
    "build_record",
    "canonical_bytes",
    "digest_inputs",
    "record_hash",
    "seal",
    "verify_chain",
]
