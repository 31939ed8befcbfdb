//! evcore control core: pure functions of their inputs, no I/O, no clock, no Python.
//!
//! - `topology`: the site tree and how charger currents add up on each line.
//! - `envelope`: the last safety step before any setpoint leaves the system.
//! - `allocator`: weighted max-min fair setpoints over the tree and phases.
// `!(x > 0.0)` is how this crate says "not positive, NaN included": safety code must treat NaN as
// the bad case, and `partial_cmp` chains would hide that. Index loops over parallel per-charger
// and per-phase arrays read better than zipped iterators here.
#![allow(clippy::neg_cmp_op_on_partial_ord, clippy::needless_range_loop)]
pub mod allocator;
pub mod envelope;
pub mod error;
pub mod par;
pub mod topology;

pub use error::{CoreError, CoreResult};
pub use topology::{Charger, ChargerKind, Node, Topology, Wiring, N_PHASES};
pub mod planner;
