"""evcore's exception hierarchy. The classes are created in Rust (``evcore._core``) so that the
core's errors and Python's are the same objects; this module re-exports them.

- ``EvcoreError``: base of everything evcore raises on purpose.
- ``SiteConfigError(EvcoreError, ValueError)``: invalid site file; ``.node`` and ``.field``.
- ``InputError(EvcoreError, ValueError)``: bad array or record batch; ``.column`` and ``.row``.
- ``SolverError(EvcoreError, RuntimeError)``: an optimisation failed (planner).
"""

from __future__ import annotations

from evcore._core import EvcoreError, InputError, SiteConfigError, SolverError

__all__ = ["EvcoreError", "InputError", "SiteConfigError", "SolverError"]
