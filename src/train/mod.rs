//! Training: the stage runtime, optimizers, learning-rate schedules, checkpoints, metrics and
//! the training loop.

pub mod checkpoint;
pub mod data_parallel;
pub mod metrics;
pub mod optim;
pub mod pipeline;
pub mod probe;
pub mod runtime;
pub mod schedule;
pub mod sharding;
pub mod trainer;
pub mod worker;

pub use trainer::{
    train, Length, Observer, Resume, StepReport, TrainOptions, TrainReport, Validation,
};
