//! SwiGLU's gating, `silu(gate) · up`, as one operation: autodiff of the composition keeps the
//! sigmoid, the activated gate and both inputs of the product; this keeps only `gate` and `up`
//! and recomputes the sigmoid in backward.

use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `silu(gate) · up`.
pub fn forward<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    silu(gate) * up
}

/// Gradients `[d gate, d up]` for `grad` of the output: with `s = σ(gate)`,
/// `d up = grad · gate · s` and `d gate = grad · up · s · (1 + gate · (1 − s))`.
pub fn backward<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    grad: Tensor<B, 3>,
) -> [Tensor<B, 3>; 2] {
    let s = sigmoid(gate.clone());
    let grad_up = grad.clone() * gate.clone() * s.clone();
    let slope = s.clone() * ((s.neg() + 1.0) * gate + 1.0);
    [grad * up * slope, grad_up]
}
