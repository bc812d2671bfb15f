//! Training: the stage runtime, optimizers, learning-rate schedules and the training loop.

pub mod optim;
pub mod runtime;
