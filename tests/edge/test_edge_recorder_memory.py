"""What the audit recorder keeps per decision stays bounded over a long run.

``AuditRecorder.durable`` (the decision numbers whose record is durable) gained one entry per
decision that sent anything and never lost one: a busy site's edge held a number for every such
decision since it started (millions over weeks), while the decision ids beside it were already
kept to the last ``_KEEP_IDS``.
"""

from __future__ import annotations

from typing import Any

from evcore.edge.recording import _KEEP_IDS, AuditRecorder


class _Log:
    """An audit log that takes every record at once."""

    def __init__(self) -> None:
        self.n = 0

    async def append(self, decision: Any) -> None:
        self.n += 1


def _record(n: int) -> dict[str, Any]:
    return {
        "decision": n,
        "at": 1_800_000_000.0 + n,
        "trigger": "tick",
        "setpoints": [
            {
                "charger_id": "cp-0001",
                "purpose": "tx",
                "kind": "decrease",
                "old": 16.0,
                "new": 8.0,
                "sent": 8.0,
                "unit": "A",
                "valid_to": 1_800_000_100.0 + n,
            }
        ],
    }


async def test_the_durable_decisions_kept_are_the_recent_ones_only() -> None:
    log = _Log()
    recorder = AuditRecorder(log)
    total = 3 * _KEEP_IDS
    for n in range(1, total + 1):
        await recorder.append(_record(n))
    assert log.n == total
    # The recent decisions are still known durable (the loop's tests ask right after a send).
    assert all(n in recorder.durable for n in range(total - 100, total + 1))
    assert len(recorder.durable) <= 2 * _KEEP_IDS, len(recorder.durable)  # before: 12,288
    assert len(recorder._ids) <= _KEEP_IDS
