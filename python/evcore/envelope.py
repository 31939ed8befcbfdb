"""Typed facade over the Rust safety envelope (``_core.enforce``).

Builds and checks the Arrow input batches (one row per charger / node, in site file order), then
calls Rust with the GIL released. Schemas: docs/envelope.md. This module never changes a setpoint
itself: every number in the output comes from Rust.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from evcore import _core
from evcore.errors import InputError
from evcore.site import Site

__all__ = [
    "CHARGER_COLUMNS",
    "NODE_COLUMNS",
    "OUTPUT_COLUMNS",
    "EnvelopeParams",
    "charger_batch",
    "enforce",
    "node_batch",
]

NAN = math.nan
INF = math.inf

# name → (Arrow type, default when the caller leaves the column out)
CHARGER_COLUMNS: dict[str, tuple[pa.DataType, Any]] = {
    "requested_a": (pa.float64(), 0.0),
    "requested_w": (pa.float64(), 0.0),
    "measured_l1_a": (pa.float64(), NAN),
    "measured_l2_a": (pa.float64(), NAN),
    "measured_l3_a": (pa.float64(), NAN),
    "measured_age_s": (pa.float64(), INF),
    "last_sent_a": (pa.float64(), 0.0),
    "last_sent_w": (pa.float64(), 0.0),
    "last_sent_confirmed": (pa.bool_(), True),
    "connected": (pa.bool_(), True),
    "faulted": (pa.bool_(), False),
    "profile_unknown": (pa.bool_(), False),
    "on_since_s": (pa.float64(), NAN),
    "off_since_s": (pa.float64(), NAN),
    "switches": (pa.int64(), 0),
}
NODE_COLUMNS: dict[str, tuple[pa.DataType, Any]] = {
    "other_load_l1_a": (pa.float64(), NAN),
    "other_load_l2_a": (pa.float64(), NAN),
    "other_load_l3_a": (pa.float64(), NAN),
    "other_load_age_s": (pa.float64(), INF),
}
OUTPUT_COLUMNS = (
    "charger_id",
    "setpoint_a",
    "setpoint_w",
    "binding",
    "binding_node",
    "binding_phase",
    "binding_value",
    "binding_limit",
    "reason",
)


@dataclass(frozen=True)
class EnvelopeParams:
    """Site-wide parameters (seconds on the caller's clock; ``now_s`` from its ``Clock``)."""

    now_s: float = 0.0
    stale_after_s: float = 60.0
    min_on_s: float = 0.0
    min_off_s: float = 0.0
    max_switches: float = INF
    max_increase_a: float = INF

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def _input_error(column: str, row: int | None, message: str) -> InputError:
    """An ``InputError`` naming ``column`` (and ``row``), as the core raises them."""
    where = f"column {column}" if row is None else f"column {column} row {row}"
    exc = InputError(f"{where}: {message}")
    exc.column = column
    exc.row = row
    return exc


def _checked(name: str, typ: pa.DataType, value: Any) -> np.ndarray[Any, Any]:
    """``value`` (a list, scalar or numpy array) as numpy, refused with an ``InputError`` naming
    the column and row where it is not a value of the column's kind. Before, numpy's own
    conversion took a null as False in a flag column (``faulted``, ``profile_unknown``: the
    unsafe side), any non-empty string as True, and wrapped a uint64 count past int64's range
    to a negative one."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise _input_error(name, None, f"not an array of values: {exc}") from None
    kind = arr.dtype.kind
    if kind == "O":
        flat = arr.reshape(-1)
        for i, v in enumerate(flat):
            if v is None:
                raise _input_error(name, i if arr.ndim else None, "is null")
        try:
            arr = np.asarray(flat.tolist(), dtype=np.float64).reshape(arr.shape)
        except (TypeError, ValueError) as exc:
            raise _input_error(name, None, f"holds a value that is not a number: {exc}") from None
        kind = "f"
    if kind not in "biuf":
        raise _input_error(name, None, f"holds {arr.dtype} values, not numbers or booleans")
    if typ == pa.bool_() and kind == "f" and np.isnan(arr).any():
        row = int(np.flatnonzero(np.isnan(arr.reshape(-1)))[0])
        raise _input_error(name, row if arr.ndim else None, "is NaN (a flag is true or false)")
    if typ == pa.int64() and kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        row = int(np.argmax(arr.reshape(-1)))
        raise _input_error(name, row if arr.ndim else None, "is beyond int64's range")
    return arr


def _column(name: str, typ: pa.DataType, value: Any, n: int) -> pa.Array:
    if isinstance(value, pa.ChunkedArray):
        value = value.combine_chunks()
    if isinstance(value, pa.Array):
        arr = value
        if arr.type != typ:
            try:
                arr = arr.cast(typ)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise InputError(f"column {name}: cannot use {arr.type} as {typ}: {e}") from None
    else:
        np_arr = _checked(name, typ, value)
        if np_arr.ndim == 0:
            np_arr = np.full(n, np_arr.item())
        if typ == pa.float64():
            np_arr = np.ascontiguousarray(np_arr, dtype=np.float64)
        elif typ == pa.bool_():
            np_arr = np.ascontiguousarray(np_arr, dtype=np.bool_)
        elif np_arr.dtype.kind == "f":
            # Counts given as floats stay floats (the core takes float64 counts): a cast would
            # turn NaN or 1e30 into int64's minimum, i.e. far below any cap.
            typ = pa.float64()
            np_arr = np.ascontiguousarray(np_arr, dtype=np.float64)
        else:
            np_arr = np.ascontiguousarray(np_arr, dtype=np.int64)
        arr = pa.array(np_arr, type=typ)
    if len(arr) != n:
        raise InputError(f"column {name}: has {len(arr)} rows, the site has {n}")
    return arr


def _batch(
    ids_name: str,
    ids: list[str],
    spec: Mapping[str, tuple[pa.DataType, Any]],
    columns: Mapping[str, Any],
) -> pa.RecordBatch:
    n = len(ids)
    unknown = set(columns) - set(spec) - {ids_name}
    if unknown:
        raise InputError(f"unknown column(s) {sorted(unknown)} (known: {sorted(spec)})")
    arrays = [pa.array(ids, type=pa.utf8())]
    names = [ids_name]
    for name, (typ, default) in spec.items():
        arrays.append(_column(name, typ, columns.get(name, default), n))
        names.append(name)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def charger_batch(site: Site, **columns: Any) -> pa.RecordBatch:
    """Envelope input batch for every charger of the site (site order); missing columns get the
    defaults in ``CHARGER_COLUMNS``. Values may be numpy arrays, lists, scalars or Arrow arrays."""
    return _batch("charger_id", site.charger_ids, CHARGER_COLUMNS, columns)


def node_batch(site: Site, **columns: Any) -> pa.RecordBatch:
    """Per-node measured non-charger load (site order); default: unknown (counted at maximum)."""
    return _batch("node_id", site.node_ids, NODE_COLUMNS, columns)


def _as_batch(
    site: Site, value: pa.RecordBatch | pa.Table | Mapping[str, Any] | None, kind: str
) -> pa.RecordBatch:
    if value is None:
        return charger_batch(site) if kind == "chargers" else node_batch(site)
    if isinstance(value, pa.Table):
        value = value.combine_chunks().to_batches()[0] if value.num_rows else None
        if value is None:
            raise InputError(f"{kind}: empty table")
    if isinstance(value, pa.RecordBatch):
        return value
    if isinstance(value, Mapping):
        cols = dict(value)
        cols.pop("charger_id" if kind == "chargers" else "node_id", None)
        return charger_batch(site, **cols) if kind == "chargers" else node_batch(site, **cols)
    raise InputError(f"{kind}: expected a pyarrow RecordBatch or a mapping of columns")


def _params(params: EnvelopeParams | Mapping[str, float] | None) -> dict[str, float]:
    if params is None:
        return EnvelopeParams().as_dict()
    if isinstance(params, Mapping):
        return {k: float(v) for k, v in params.items()}
    return params.as_dict()


def enforce(
    site: Site,
    chargers: pa.RecordBatch | pa.Table | Mapping[str, Any] | None,
    nodes: pa.RecordBatch | pa.Table | Mapping[str, Any] | None = None,
    *,
    params: EnvelopeParams | Mapping[str, float] | None = None,
    explain: bool = True,
) -> pa.RecordBatch:
    """Safe setpoints for every charger; see docs/envelope.md for both schemas.

    Raises ``InputError`` for a bad column (type, nulls, row order, length)."""
    cb = _as_batch(site, chargers, "chargers")
    nb = _as_batch(site, nodes, "nodes")
    result: pa.RecordBatch = _core.enforce(site.topology, cb, nb, _params(params), explain)
    return result
