//! Optimizer updates as one operation per parameter tensor. The compositions below are what
//! every backend runs by default (a chain of element-wise tensor operations, each a kernel and a
//! temporary on a GPU); CubeCL backends run the element-wise work as single kernels
//! (`kernels::cube`).
//!
//! AdamW follows `torch.optim.AdamW`; Adafactor follows `transformers.optimization.Adafactor`
//! with `beta1=None, scale_parameter=False, relative_step=False, warmup_init=False`; SGD follows
//! `torch.optim.SGD` (no dampening, no Nesterov).

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

/// One Adafactor update's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorStep {
    /// Learning rate.
    pub lr: f64,
    /// Added to the squared gradient.
    pub eps: f64,
    /// Updates whose RMS exceeds this are scaled down to it.
    pub clip_threshold: f64,
    /// The second-moment decay is `1 − step^decay_rate`.
    pub decay_rate: f64,
    /// Weight decay (multiplied by the learning rate).
    pub weight_decay: f64,
    /// This update's number, from 1.
    pub step: u64,
}

impl AdafactorStep {
    /// How much of the previous second moment is kept.
    pub fn beta2(&self) -> f64 {
        1.0 - (self.step as f64).powf(self.decay_rate)
    }
}

/// Adafactor's estimate of the squared gradient.
#[derive(Debug, Clone)]
pub enum SecondMoment<B: Backend> {
    /// A matrix's, as row means `[rows, 1]` and column means `[1, cols]`.
    Factored {
        rows: Tensor<B, 2>,
        cols: Tensor<B, 2>,
    },
    /// A vector's (viewed as `[1, n]`), whole.
    Full(Tensor<B, 2>),
}

impl<B: Backend> SecondMoment<B> {
    /// The zero moment of a `[rows, cols]` parameter, factored or not.
    pub fn zeros(rows: usize, cols: usize, factored: bool, device: &B::Device) -> Self {
        if factored {
            SecondMoment::Factored {
                rows: Tensor::zeros([rows, 1], device),
                cols: Tensor::zeros([1, cols], device),
            }
        } else {
            SecondMoment::Full(Tensor::zeros([rows, cols], device))
        }
    }

    /// The moment after this step's gradient: each statistic decayed by `β₂` plus `1 − β₂` of
    /// the same statistic of `grad² + ε`.
    pub fn updated(self, grad: &Tensor<B, 2>, step: &AdafactorStep) -> Self {
        let beta2 = step.beta2();
        let squared = grad.clone().square() + step.eps;
        match self {
            SecondMoment::Factored { rows, cols } => SecondMoment::Factored {
                rows: rows * beta2 + squared.clone().mean_dim(1) * (1.0 - beta2),
                cols: cols * beta2 + squared.mean_dim(0) * (1.0 - beta2),
            },
            SecondMoment::Full(v) => SecondMoment::Full(v * beta2 + squared * (1.0 - beta2)),
        }
    }

    /// `grad / √v̂`, the update before clipping. A factored moment's rank-1 estimate is
    /// `v̂ = rows · cols / mean(rows)`.
    pub fn precondition(&self, grad: Tensor<B, 2>) -> Tensor<B, 2> {
        match self {
            SecondMoment::Factored { rows, cols } => {
                let row_factor = (rows.clone() / rows.clone().mean().unsqueeze::<2>())
                    .sqrt()
                    .recip();
                row_factor * cols.clone().sqrt().recip() * grad
            }
            SecondMoment::Full(v) => v.clone().sqrt().recip() * grad,
        }
    }
}

/// The divisor that clips an update to RMS `clip_threshold`: `max(rms(update) / clip, 1)`,
/// `[1, 1]`, left on the device.
pub fn adafactor_clip_divisor<B: Backend>(
    update: &Tensor<B, 2>,
    clip_threshold: f64,
) -> Tensor<B, 2> {
    let elements = update.shape().num_elements() as f64;
    let rms = (update.clone().square().sum() / elements).sqrt();
    (rms / clip_threshold).clamp_min(1.0).unsqueeze::<2>()
}

/// Adafactor as a composition of tensor operations: `[param, moment]` after the step.
pub fn adafactor_composed<B: Backend>(
    param: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    moment: SecondMoment<B>,
    step: &AdafactorStep,
) -> (Tensor<B, 2>, SecondMoment<B>) {
    let moment = moment.updated(&grad, step);
    let update = moment.precondition(grad);
    let divisor = adafactor_clip_divisor(&update, step.clip_threshold);
    let param = if step.weight_decay != 0.0 {
        param * (1.0 - step.weight_decay * step.lr)
    } else {
        param
    };
    (param - update / divisor * step.lr, moment)
}

/// One SGD update's hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdStep {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 disables it).
    pub momentum: f64,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
}

/// SGD as a composition of tensor operations: the parameter and the momentum buffer after the
/// step. On the first step with momentum the buffer is the gradient itself, as in torch.
pub fn sgd_composed<B: Backend>(
    param: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    buffer: Option<Tensor<B, 2>>,
    step: &SgdStep,
) -> (Tensor<B, 2>, Option<Tensor<B, 2>>) {
    let grad = if step.weight_decay != 0.0 {
        grad + param.clone() * step.weight_decay
    } else {
        grad
    };
    if step.momentum == 0.0 {
        return (param - grad * step.lr, None);
    }
    let buffer = match buffer {
        Some(buffer) => buffer * step.momentum + grad,
        None => grad,
    };
    (param - buffer.clone() * step.lr, Some(buffer))
}
