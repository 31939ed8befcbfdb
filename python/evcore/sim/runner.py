"""Pick how a comparison runs: the full stack over loopback OCPP, or the in-process loop."""

from __future__ import annotations

from evcore.sim.controllers import make_controller
from evcore.sim.scenario import Scenario
from evcore.sim.twin import Comparison, compare


def run_comparison(
    sc: Scenario, *, backend: str = "auto", progress: bool = False, jobs: int = 1
) -> Comparison:
    """Run every policy of ``sc``; ``backend`` is ``auto``, ``stack`` or ``in-process``."""
    if backend not in ("auto", "stack", "in-process"):
        raise ValueError(f"unknown backend {backend!r} (auto, stack, in-process)")
    if backend in ("auto", "stack"):
        from evcore.sim import stack

        ok, why = stack.available()
        if ok:
            return stack.compare_stack(sc, progress=progress, jobs=jobs)
        if backend == "stack":
            raise RuntimeError(f"the full stack is not available in this build: {why}")
    cmp = compare(sc, make_controller, progress=progress, backend="in-process")
    cmp.notes.append(
        "in-process loop: the controller is called directly on simulated time; OCPP over "
        "WebSockets, the bus and the edge's dispatch are not in this loop"
    )
    return cmp
