//! Optimizer updates as one operation per parameter tensor. The composition below is what
//! every backend runs by default (a chain of element-wise tensor operations, each a kernel and a
//! temporary on a GPU); CubeCL backends run it as one kernel (`kernels::cube`).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// One AdamW update's hyperparameters, as `torch.optim.AdamW` applies them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first and second moments.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f64,
    /// This update's number, from 1.
    pub step: u64,
}

impl AdamWStep {
    /// What the update multiplies by: `[1 − lr·wd, β₁, 1 − β₁, β₂, 1 − β₂, √(1 − β₂ᵗ), ε,
    /// lr / (1 − β₁ᵗ)]`.
    pub fn coefficients(&self) -> [f64; 8] {
        let (b1, b2) = self.betas;
        let t = self.step as f64;
        [
            1.0 - self.lr * self.weight_decay,
            b1,
            1.0 - b1,
            b2,
            1.0 - b2,
            (1.0 - b2.powf(t)).sqrt(),
            self.eps,
            self.lr / (1.0 - b1.powf(t)),
        ]
    }
}

/// The updated parameter and moments `[param, m, v]`.
pub type AdamWResult<B> = [Tensor<B, 2>; 3];

/// AdamW as a composition of tensor operations: decay the parameter, update both moments,
/// step by `m̂ / (√v̂ + ε)`.
pub fn adamw_composed<B: Backend>(
    param: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    m: Tensor<B, 2>,
    v: Tensor<B, 2>,
    step: &AdamWStep,
) -> AdamWResult<B> {
    let [decay, b1, one_minus_b1, b2, one_minus_b2, bias2_sqrt, eps, step_size] =
        step.coefficients();
    let param = param * decay;
    let m = m * b1 + grad.clone() * one_minus_b1;
    let v = v * b2 + grad.square() * one_minus_b2;
    let denom = v.clone().sqrt() / bias2_sqrt + eps;
    let updated = param - m.clone() / denom * step_size;
    [updated, m, v]
}
