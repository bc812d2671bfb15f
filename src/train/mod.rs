//! Training: optimizers (and, as the training issue lands, data, schedules and checkpoints).

pub mod optim;
