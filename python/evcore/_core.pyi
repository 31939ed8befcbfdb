"""Hand-kept stubs for the compiled core ``evcore._core`` (keep in step with core/evcore-py)."""

from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = [
    "PLAN_METADATA_KEY",
    "RAISE_RAMP_S",
    "EvcoreError",
    "InputError",
    "Planner",
    "SiteConfigError",
    "SolverError",
    "Topology",
    "__version__",
    "allocate",
    "binding_codes",
    "enforce",
]

__version__: str

class EvcoreError(Exception): ...

class SiteConfigError(EvcoreError, ValueError):
    node: str
    field: str

class InputError(EvcoreError, ValueError):
    column: str
    row: int | None

class SolverError(EvcoreError, RuntimeError): ...

@final
class Topology:
    @staticmethod
    def from_json(text: str) -> Topology: ...
    @property
    def site_id(self) -> str: ...
    @property
    def phase_names(self) -> list[str]: ...
    @property
    def voltage_ln_v(self) -> float: ...
    @property
    def n_nodes(self) -> int: ...
    @property
    def n_chargers(self) -> int: ...
    @property
    def node_ids(self) -> list[str]: ...
    @property
    def charger_ids(self) -> list[str]: ...
    def nodes(self) -> list[dict[str, Any]]: ...
    def chargers(self) -> list[dict[str, Any]]: ...
    def line_coefficients(
        self,
    ) -> tuple[
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.float64],
        npt.NDArray[np.float64],
    ]: ...
    def ancestors(self, charger: int) -> npt.NDArray[np.int64]: ...

def enforce(
    topology: Topology,
    chargers: Any,
    nodes: Any,
    params: dict[str, float] | None = None,
    explain: bool = True,
) -> Any: ...
def allocate(
    topology: Topology,
    chargers: Any,
    nodes: Any,
    params: dict[str, float] | None = None,
    explain: bool = True,
) -> Any: ...
def binding_codes() -> list[str]: ...

RAISE_RAMP_S: float

# --- Planner (core/evcore-py/src/planner.rs; the planner room keeps this section) ---

PLAN_METADATA_KEY: str

@final
class Planner:
    """Receding-horizon planner; keeps its Clarabel solver between calls of equal structure."""

    def __new__(cls, settings_json: str | None = None) -> Planner: ...
    @property
    def settings_json(self) -> str: ...
    def plan(self, input_json: str, budget_s: float) -> Any:
        """A ``pyarrow.RecordBatch`` (schedule) with the summary JSON in its schema metadata
        under ``PLAN_METADATA_KEY``. Raises ``InputError`` naming the field."""
