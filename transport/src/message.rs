//! What travels between stages: a tagged float tensor.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What a tensor is to the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// The output activations of a stage, going forward to the next one.
    Activation,
    /// The gradient of a stage's input, going backward to the previous one.
    Gradient,
    /// The gradient of a tied embedding, exchanged between the first and the last stage so
    /// both step with the sum.
    TiedGradient,
    /// Per-rank numbers summed over the pipeline (squared gradient norms, losses); `stage`
    /// holds the sending rank.
    Reduce,
    /// A piece of a collective operation ([`crate::collective`]): `step` numbers the
    /// operation, `microbatch` its ring step and `stage` its channel and slab. Always float32.
    Collective,
}

/// Identifies one transfer: which optimizer step, micro-batch and receiving stage it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tag {
    /// Optimizer step.
    pub step: u64,
    /// Micro-batch within the step.
    pub microbatch: u32,
    /// The stage (model slice) the tensor is addressed to.
    pub stage: u32,
    /// Activation or gradient.
    pub kind: Kind,
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} for stage {} (step {}, micro-batch {})",
            self.kind, self.stage, self.step, self.microbatch
        )
    }
}

/// A float32 tensor with its tag and shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorMessage {
    /// What the tensor is.
    pub tag: Tag,
    /// Its dimensions.
    pub shape: Vec<usize>,
    /// Row-major values; `values.len()` is the product of `shape`.
    pub values: Vec<f32>,
}
