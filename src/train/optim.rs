//! Optimizers that step one parameter at a time, so that a stage can step its own parameters —
//! and, with optimizer-in-backward, a layer's parameters as soon as their gradients are complete.
//! State is keyed by Hugging Face parameter name, so it survives re-partitioning and resumption.
//!
//! The update rules themselves are in `kernels::optimizer` (one operation per parameter tensor,
//! a kernel on GPU backends); this keeps their state by parameter.

use std::collections::{HashMap, HashSet};

use burn::module::{ModuleMapper, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};

use super::runtime::{as_matrix, GradStore};
use super::sharding::{steps_shards, Sharding};
use crate::dtype::DType;
use crate::kernels::{AdafactorStep, AdamWStep, Kernels, SecondMoment, SgdStep, TrainBackend};

/// Which update rule, with its hyperparameters (the learning rate is given per step).
#[derive(Debug, Clone, PartialEq)]
pub enum Optimizer {
    /// Adam with decoupled weight decay.
    AdamW {
        /// Decay rates of the first and second moments.
        betas: (f64, f64),
        /// Added to the denominator.
        eps: f64,
        /// Decoupled weight decay (multiplied by the learning rate).
        weight_decay: f64,
    },
    /// Adafactor: a factored second moment for matrices, no first moment, update clipping.
    Adafactor {
        /// Added to the squared gradient, and the floor of the parameter scale (unused here).
        eps: (f64, f64),
        /// Updates whose RMS exceeds this are scaled down to it.
        clip_threshold: f64,
        /// The second-moment decay is `1 - step^decay_rate`.
        decay_rate: f64,
        /// Weight decay (multiplied by the learning rate).
        weight_decay: f64,
    },
    /// Stochastic gradient descent, with optional momentum.
    Sgd {
        /// Momentum factor (0 disables it).
        momentum: f64,
        /// L2 penalty added to the gradient.
        weight_decay: f64,
    },
}

/// The state of one parameter.
#[derive(Debug, Clone)]
pub struct ParamState<B: Backend> {
    /// Steps taken.
    pub step: u64,
    /// The rule's tensors (AdamW: first and second moment; factored Adafactor: row and column
    /// statistics as `[rows, 1]` and `[1, cols]`; unfactored Adafactor: second moment; SGD:
    /// momentum buffer, if any).
    pub tensors: Vec<Tensor<B, 2>>,
}

impl Optimizer {
    /// The name users give it (`--optimizer`).
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::AdamW { .. } => "adamw",
            Optimizer::Adafactor { .. } => "adafactor",
            Optimizer::Sgd { .. } => "sgd",
        }
    }

    /// The shapes of the state it keeps for a `[rows, cols]` parameter (a vector is one row;
    /// Adafactor factors only matrices).
    pub fn state_shapes(&self, rows: usize, cols: usize) -> Vec<[usize; 2]> {
        match *self {
            Optimizer::AdamW { .. } => vec![[rows, cols], [rows, cols]],
            Optimizer::Adafactor { .. } if rows > 1 => vec![[rows, 1], [1, cols]],
            Optimizer::Adafactor { .. } => vec![[rows, cols]],
            Optimizer::Sgd { momentum, .. } if momentum != 0.0 => vec![[rows, cols]],
            Optimizer::Sgd { .. } => Vec::new(),
        }
    }

    /// Steps `param` with `grad` at learning rate `lr`, both viewed as `[rows, cols]` matrices
    /// (a vector is `[1, n]`). `factored` says whether the parameter is a matrix for Adafactor.
    pub fn step<B: Kernels>(
        &self,
        state: &mut Option<ParamState<B>>,
        param: Tensor<B, 2>,
        grad: Tensor<B, 2>,
        factored: bool,
        lr: f64,
    ) -> Tensor<B, 2> {
        let state = state.get_or_insert_with(|| ParamState {
            step: 0,
            tensors: Vec::new(),
        });
        state.step += 1;
        match *self {
            Optimizer::AdamW {
                betas: (b1, b2),
                eps,
                weight_decay,
            } => {
                let (m, v) = match state.tensors.as_slice() {
                    [m, v] => (m.clone(), v.clone()),
                    _ => (grad.zeros_like(), grad.zeros_like()),
                };
                let hyper = AdamWStep {
                    lr,
                    betas: (b1, b2),
                    eps,
                    weight_decay,
                    step: state.step,
                };
                let [updated, m, v] = B::adamw_step(param, grad, m, v, &hyper);
                state.tensors = vec![m, v];
                updated
            }
            Optimizer::Adafactor {
                eps: (eps, _),
                clip_threshold,
                decay_rate,
                weight_decay,
            } => {
                let hyper = AdafactorStep {
                    lr,
                    eps,
                    clip_threshold,
                    decay_rate,
                    weight_decay,
                    step: state.step,
                };
                let moment = match std::mem::take(&mut state.tensors).as_slice() {
                    [rows, cols] => SecondMoment::Factored {
                        rows: rows.clone(),
                        cols: cols.clone(),
                    },
                    [v] => SecondMoment::Full(v.clone()),
                    _ => {
                        let [rows, cols] = grad.dims();
                        SecondMoment::zeros(rows, cols, factored, &grad.device())
                    }
                };
                let (updated, moment) = B::adafactor_step(param, grad, moment, &hyper);
                state.tensors = match moment {
                    SecondMoment::Factored { rows, cols } => vec![rows, cols],
                    SecondMoment::Full(v) => vec![v],
                };
                updated
            }
            Optimizer::Sgd {
                momentum,
                weight_decay,
            } => {
                let hyper = SgdStep {
                    lr,
                    momentum,
                    weight_decay,
                };
                let (updated, buffer) = B::sgd_step(param, grad, state.tensors.pop(), &hyper);
                state.tensors = buffer.into_iter().collect();
                updated
            }
        }
    }
}

/// Optimizer state of every parameter a stage owns, by Hugging Face name.
pub type OptimizerState<B> = HashMap<String, Option<ParamState<B>>>;

/// Steps the parameters of a module that have an accumulated gradient: `part.map(&mut stepper)`.
pub struct Stepper<'a, B: TrainBackend> {
    /// The update rule.
    pub optimizer: &'a Optimizer,
    /// Learning rate of this step.
    pub lr: f64,
    /// Gradients are multiplied by this first (global-norm clipping).
    pub grad_scale: f64,
    /// Gradients by parameter name; each stepped one is removed.
    pub grads: &'a mut GradStore<B::InnerBackend>,
    /// Parameter names, from `StageModel::named_params`.
    pub names: &'a HashMap<ParamId, String>,
    /// Step only these parameters, if given.
    pub only: Option<&'a HashSet<String>>,
    /// State by name; updated in place.
    pub state: &'a mut OptimizerState<B::InnerBackend>,
    /// The dtype the weights are kept in: bf16 weights are rounded after each update.
    pub weight_dtype: DType,
    /// Under FSDP, parameters, gradients and state are shards; rules that need whole
    /// parameters gather each one for its update.
    pub sharding: Option<&'a Sharding>,
}

impl<B: TrainBackend> ModuleMapper<B> for Stepper<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let name = &self.names[&id];
        let wanted = self.only.is_none_or(|only| only.contains(name));
        let grad = if wanted {
            self.grads.remove(name)
        } else {
            None
        };
        let Some(grad) = grad else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let grad = if self.grad_scale == 1.0 {
            grad
        } else {
            grad * self.grad_scale
        };
        let dims = tensor.dims();
        let param = as_matrix(tensor.inner());
        let gather = self.sharding.filter(|_| !steps_shards(self.optimizer));
        let (param, grad, factored) = match gather {
            Some(sharding) => (
                sharding.gather_matrix(name, param),
                sharding.gather_matrix(name, grad),
                sharding.is_matrix(name),
            ),
            None => (param, grad, D >= 2),
        };
        let updated = self.optimizer.step(
            self.state.entry(name.clone()).or_default(),
            param,
            grad,
            factored,
            self.lr,
        );
        let updated = match gather {
            Some(sharding) => sharding.own_shard(updated),
            None => updated,
        };
        let updated = round_to(updated, self.weight_dtype);
        let updated = Tensor::from_inner(updated.reshape(dims)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}

/// Rounds float32 values to `dtype` (round to nearest even), keeping them in float32: on the
/// device where the backend has the dtype, else through the host.
fn round_to<B: Backend>(t: Tensor<B, 2>, dtype: DType) -> Tensor<B, 2> {
    if dtype == DType::F32 {
        return t;
    }
    let device = t.device();
    if B::supports_dtype(&device, dtype.burn()) {
        return t.cast(dtype.burn()).cast(burn::tensor::DType::F32);
    }
    let shape = t.dims();
    let values: Vec<f32> = t
        .into_data()
        .to_vec::<f32>()
        .expect("float32 weights")
        .into_iter()
        .map(|v| dtype.round(v))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &device)
}

/// Rounds every parameter to a dtype: weights loaded from a float32 checkpoint for bf16
/// training start from bf16 values.
pub struct Rounder(pub DType);

impl<B: AutodiffBackend> ModuleMapper<B> for Rounder {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let rounded = round_to(as_matrix(tensor.inner()), self.0).reshape(dims);
        Param::from_mapped_value(id, Tensor::from_inner(rounded).require_grad(), mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;

    fn values(t: Tensor<Cpu, 2>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    #[test]
    fn sgd_with_momentum_follows_torch() {
        // torch.optim.SGD(momentum=0.9, weight_decay=0.1): buf = g + wd·p on the first step,
        // then buf = 0.9·buf + (g + wd·p); p -= lr·buf.
        let device = Default::default();
        let sgd = Optimizer::Sgd {
            momentum: 0.9,
            weight_decay: 0.1,
        };
        let mut state = None;
        let grad = || Tensor::<Cpu, 2>::from_floats([[1.0, -2.0]], &device);
        let p = Tensor::<Cpu, 2>::from_floats([[1.0, 1.0]], &device);
        let p = sgd.step(&mut state, p, grad(), false, 0.5);
        // buf = [1.1, -1.9]; p = [1 - 0.55, 1 + 0.95]
        assert_eq!(values(p.clone()), vec![0.45, 1.95]);
        let p = sgd.step(&mut state, p, grad(), false, 0.5);
        // buf = 0.9·[1.1, -1.9] + [1.045, -1.805] = [2.035, -3.515]
        let got = values(p);
        assert!((got[0] - (0.45 - 0.5 * 2.035)).abs() < 1e-6, "{got:?}");
        assert!((got[1] - (1.95 + 0.5 * 3.515)).abs() < 1e-6, "{got:?}");
        assert_eq!(state.unwrap().step, 2);
    }
}
