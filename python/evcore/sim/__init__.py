"""Simulation: charge point simulators, EV model, site physics (and the digital twin beside them).

The simulators talk to the rest only through OCPP sockets, as a real site would; everything takes
a clock so the twin can run it on virtual time.
"""
