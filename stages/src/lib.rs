//! Pipeline stages for `pp`: which part of the model each stage owns, and (as the engine grows)
//! the schedules that order their work and the runtime that executes them.
//!
//! A decoder-only model is treated as a line of *parts*: the token embedding, the decoder layers
//! `0..L`, and the head (final norm, output projection and loss). A stage owns a contiguous slice
//! of that line. Single-device training is the one-stage case that owns every part.
#![deny(missing_docs)]

mod partition;
pub mod schedule;
mod slice;

pub use partition::{PartCosts, Partition, PartitionError};
pub use schedule::{Schedule, ScheduleKind};
pub use slice::{SliceError, StageSlice};
