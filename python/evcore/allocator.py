"""Typed facade over the Rust setpoint allocator (``_core.allocate``).

Allocation and the envelope run in one Rust call with the GIL released; the output has passed
the envelope. Demand columns join the envelope's charger columns (docs/envelope.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from evcore import _core
from evcore.envelope import CHARGER_COLUMNS, NODE_COLUMNS, _batch, node_batch
from evcore.errors import InputError
from evcore.site import Site

__all__ = ["ALLOCATOR_COLUMNS", "AllocatorParams", "allocate", "allocator_batch"]

INF = math.inf
NAN = math.nan

DEMAND_COLUMNS: dict[str, tuple[pa.DataType, Any]] = {
    "energy_wanted_kwh": (pa.float64(), INF),
    "departure_s": (pa.float64(), NAN),
    "priority": (pa.float64(), 1.0),
    "target_a": (pa.float64(), NAN),
    "target_w": (pa.float64(), NAN),
    "behind_plan": (pa.bool_(), False),
    # The setpoint a charger's reading was taken under (the lowest in force over the 15 s
    # before it); NaN = not known. A reading at it does not cap the session (docs/envelope.md).
    "read_under_a": (pa.float64(), NAN),
    "read_under_w": (pa.float64(), NAN),
}
ALLOCATOR_COLUMNS: dict[str, tuple[pa.DataType, Any]] = {**CHARGER_COLUMNS, **DEMAND_COLUMNS}


@dataclass(frozen=True)
class AllocatorParams:
    now_s: float = 0.0
    stale_after_s: float = 60.0
    min_on_s: float = 60.0
    min_off_s: float = 180.0
    max_switches: float = INF
    max_increase_a: float = INF
    margin_a: float = 2.0
    admission_hysteresis_s: float = 300.0
    reclaim_ramp_s: float = 30.0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def allocator_batch(site: Site, **columns: Any) -> pa.RecordBatch:
    """Allocator input batch (envelope columns + demand columns), site order, with defaults."""
    return _batch("charger_id", site.charger_ids, ALLOCATOR_COLUMNS, columns)


def allocate(
    site: Site,
    chargers: pa.RecordBatch | pa.Table | Mapping[str, Any],
    nodes: pa.RecordBatch | Mapping[str, Any] | None = None,
    *,
    params: AllocatorParams | Mapping[str, float] | None = None,
    explain: bool = True,
) -> pa.RecordBatch:
    """Weighted max-min fair setpoints that have passed the envelope.

    Output: the envelope's columns plus ``level_a`` (water-filling value before steps and
    envelope) and ``admitted``."""
    if isinstance(chargers, pa.Table):
        if not chargers.num_rows:
            raise InputError("chargers: empty table")
        chargers = chargers.combine_chunks().to_batches()[0]
    if isinstance(chargers, Mapping):
        cols = dict(chargers)
        cols.pop("charger_id", None)
        cb = allocator_batch(site, **cols)
    elif isinstance(chargers, pa.RecordBatch):
        cb = chargers
    else:
        raise InputError("chargers: expected a pyarrow RecordBatch, Table or a mapping of columns")
    if nodes is None:
        nb = node_batch(site)
    elif isinstance(nodes, Mapping):
        ncols = dict(nodes)
        ncols.pop("node_id", None)
        nb = node_batch(site, **ncols)
    else:
        nb = nodes
    if params is None:
        p = AllocatorParams().as_dict()
    elif isinstance(params, Mapping):
        p = {k: float(v) for k, v in params.items()}
    else:
        p = params.as_dict()
    result: pa.RecordBatch = _core.allocate(site.topology, cb, nb, p, explain)
    return result


_ = NODE_COLUMNS  # re-exported for callers building node batches by hand
