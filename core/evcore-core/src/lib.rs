//! evcore control core: pure functions of their inputs, no I/O, no clock, no Python.
