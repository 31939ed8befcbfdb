"""The edge controller: the only place that decides what to send to chargers, and when.

Modules: ``config`` ([edge] section), ``state`` (site state from events), ``dispatch`` (deadband,
decreases first, settle), ``failsafe`` (profile expiry and refresh timing), ``faults`` (ignored
profiles), ``grid`` (curtailments, prices), ``coreio`` (the Rust allocator + envelope behind
``CorePort``), ``controller`` (the loop), ``facade`` (the API's ``EdgeFacade``), ``cli`` (``evcore
edge``). Every setpoint sent came out of the core's envelope in the same decision.
"""
