//! evcore control core: pure functions of their inputs, no I/O, no clock, no Python.
//!
//! - `topology`: the site tree and how charger currents add up on each line.
//! - `envelope`: the last safety step before any setpoint leaves the system.
//! - `allocator`: weighted max-min fair setpoints over the tree and phases.
pub mod allocator;
pub mod envelope;
pub mod error;
pub mod topology;

pub use error::{CoreError, CoreResult};
pub use topology::{Charger, ChargerKind, Node, Topology, Wiring, N_PHASES};
pub mod planner;
