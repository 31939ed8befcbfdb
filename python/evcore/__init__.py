"""evcore: autonomous control of EV charger fleets.

The compiled core lives in ``evcore._core`` (private); use the typed facades in the submodules.
"""

from __future__ import annotations

__all__ = ["__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("evcore")
except Exception:  # pragma: no cover - not installed (source tree only)
    __version__ = "0.0.0"
