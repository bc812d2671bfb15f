//! The CPU backend's kernels, on every core: the matmuls through the `gemm` crate
//! ([`matmul`]), attention as FlashAttention-2 tiles per row and key/value head
//! ([`attention`]), the fused head loss in parallel chunks ([`head_loss`]), and the
//! element-wise operations (SwiGLU, RMSNorm, the rotary embedding, AdamW) as one pass each
//! ([`elementwise`]), where burn-ndarray runs each step of their compositions as its own
//! single-threaded pass with its own temporary.
//!
//! Each kernel takes float32 tensors; other dtypes fall back to the compositions.

mod attention;
mod elementwise;
mod head_loss;
mod matmul;

use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_ndarray::NdArrayTensor;
use ndarray::{CowArray, IxDyn};

use super::attention::Shape;
use super::{
    attention as tiled, head_loss as chunked, optimizer, rotary, swiglu, AdamWResult, AdamWStep,
    AttentionForward, AttentionGrads, AttentionSaved, AttentionSpec, HeadLossForward,
    HeadLossGrads, HeadLossSaved, Kernels, LossTargets,
};
use crate::device::Cpu;
use crate::model::layers::in_dtype;
use matmul::matmul;

impl Kernels for Cpu {
    fn linear(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let weight = in_dtype(weight, x.dtype());
        matmul(x, weight.transpose())
    }

    fn linear_backward_input(grad: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        matmul(grad, weight)
    }

    fn linear_backward_weight(x: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Tensor<Self, 2> {
        matmul(grad.transpose(), x)
    }

    fn batched_matmul(lhs: Tensor<Self, 4>, rhs: Tensor<Self, 4>) -> Tensor<Self, 4> {
        matmul(lhs, rhs)
    }

    fn flash_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        spec: &AttentionSpec<Self>,
    ) -> AttentionForward<Self> {
        let shape = Shape::from_dims(q.dims(), k.dims());
        let Some(cpu_spec) = attention::Spec::of(spec) else {
            return tiled::forward(q, k, v, spec);
        };
        with_f32([&q, &k, &v].map(native), |[q_values, k_values, v_values]| {
            let (output, log_sum_exp) =
                attention::forward(shape, &cpu_spec, q_values, k_values, v_values);
            let [batch, heads, seq, dim] = q.dims();
            AttentionForward {
                output: tensor(output, [batch, heads, seq, dim]),
                log_sum_exp: tensor(log_sum_exp, [batch, heads, seq, 1]),
            }
        })
        .unwrap_or_else(|| tiled::forward(q, k, v, spec))
    }

    fn flash_attention_backward(
        saved: AttentionSaved<Self>,
        grad_output: Tensor<Self, 4>,
        spec: &AttentionSpec<Self>,
    ) -> AttentionGrads<Self> {
        let shape = Shape::from_dims(saved.q.dims(), saved.k.dims());
        let Some(cpu_spec) = attention::Spec::of(spec) else {
            return tiled::backward(saved, grad_output, spec);
        };
        let inputs = [
            &saved.q,
            &saved.k,
            &saved.v,
            &saved.forward.output,
            &saved.forward.log_sum_exp,
            &grad_output,
        ]
        .map(native);
        with_f32(inputs, |[q, k, v, output, log_sum_exp, grad_output]| {
            let saved = attention::Saved {
                q,
                k,
                v,
                output,
                log_sum_exp,
            };
            let [q, k, v] = attention::backward(shape, &cpu_spec, &saved, grad_output);
            AttentionGrads {
                q: tensor(q, saved_dims(&shape, shape.heads)),
                k: tensor(k, saved_dims(&shape, shape.kv_heads)),
                v: tensor(v, saved_dims(&shape, shape.kv_heads)),
            }
        })
        .unwrap_or_else(|| tiled::backward(saved, grad_output, spec))
    }

    fn head_loss_forward(
        hidden: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        targets: &LossTargets<Self>,
    ) -> HeadLossForward<Self> {
        let tokens = hidden.dims()[0];
        let inputs = [
            native(&hidden),
            native(&weight),
            native(targets.target_weights()),
        ];
        with_f32(inputs, |[hidden_values, weight_values, weights]| {
            let ids = target_ids(targets);
            let problem = head_loss::Problem {
                hidden: hidden_values,
                weight: weight_values,
                ids: &ids,
                weights,
                dim: hidden.dims()[1],
                max_chunk: targets.max_chunk(),
            };
            let (loss, log_sum_exp) = head_loss::forward(&problem);
            HeadLossForward {
                loss: tensor(vec![loss], [1]),
                log_sum_exp: tensor(log_sum_exp, [tokens, 1]),
            }
        })
        .unwrap_or_else(|| chunked::forward(hidden, weight, targets))
    }

    fn head_loss_backward(
        saved: HeadLossSaved<Self>,
        grad_loss: Tensor<Self, 1>,
        targets: &LossTargets<Self>,
    ) -> HeadLossGrads<Self> {
        let (hidden_dims, weight_dims) = (saved.hidden.dims(), saved.weight.dims());
        let inputs = [
            &saved.hidden,
            &saved.weight,
            targets.target_weights(),
            &saved.log_sum_exp,
        ]
        .map(native);
        let grad = in_dtype(grad_loss.clone(), burn::tensor::DType::F32).into_scalar();
        with_f32(inputs, |[hidden, weight, weights, log_sum_exp]| {
            let ids = target_ids(targets);
            let problem = head_loss::Problem {
                hidden,
                weight,
                ids: &ids,
                weights,
                dim: hidden_dims[1],
                max_chunk: targets.max_chunk(),
            };
            let (grad_hidden, grad_weight) = head_loss::backward(&problem, log_sum_exp, grad);
            HeadLossGrads {
                hidden: tensor(grad_hidden, hidden_dims),
                weight: tensor(grad_weight, weight_dims),
            }
        })
        .unwrap_or_else(|| chunked::backward(saved, grad_loss, targets))
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let dims = gate.dims();
        with_f32([&gate, &up].map(native), |[g, u]| {
            let [out] = elementwise::map(&[g, u], |[g, u]| [elementwise::silu(g) * u]);
            tensor(out, dims)
        })
        .unwrap_or_else(|| swiglu::forward(gate, up))
    }

    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        grad: Tensor<Self, 3>,
    ) -> [Tensor<Self, 3>; 2] {
        let dims = gate.dims();
        with_f32([&gate, &up, &grad].map(native), |inputs| {
            elementwise::map(&inputs, elementwise::swiglu_backward).map(|t| tensor(t, dims))
        })
        .unwrap_or_else(|| swiglu::backward(gate, up, grad))
    }

    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        let dims = x.dims();
        with_f32([native(&x), native(&weight)], |[x, weight]| {
            tensor(elementwise::rms_norm(x, weight, eps as f32), dims)
        })
        .unwrap_or_else(|| super::norm::forward(x, weight, eps))
    }

    fn rms_norm_backward(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 1>) {
        let dims = x.dims();
        with_f32([native(&x), native(&weight), native(&grad)], |[x, w, g]| {
            let (grad_x, grad_weight) = elementwise::rms_norm_backward(x, w, eps as f32, g);
            (tensor(grad_x, dims), tensor(grad_weight, [dims[2]]))
        })
        .unwrap_or_else(|| super::norm::backward(x, weight, eps, grad))
    }

    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let dims = x.dims();
        let [batch, _, seq, dim] = dims;
        if cos.dims() != [batch, 1, seq, dim] {
            return rotary::forward(x, cos, sin);
        }
        with_f32([&x, &cos, &sin].map(native), |[x, cos, sin]| {
            tensor(elementwise::rotary(x, cos, sin, dims), dims)
        })
        .unwrap_or_else(|| rotary::forward(x, cos, sin))
    }

    fn adamw_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        m: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        step: &AdamWStep,
    ) -> AdamWResult<Self> {
        let dims = param.dims();
        let c = step.coefficients().map(|c| c as f32);
        with_f32([&param, &grad, &m, &v].map(native), |inputs| {
            elementwise::map(&inputs, |[p, g, m, v]| {
                // As `adamw_composed`, in float32 like the GPU kernel.
                let m_new = m * c[1] + g * c[2];
                let v_new = v * c[3] + g * g * c[4];
                let denom = v_new.sqrt() / c[5] + c[6];
                [p * c[0] - m_new / denom * c[7], m_new, v_new]
            })
            .map(|t| tensor(t, dims))
        })
        .unwrap_or_else(|| optimizer::adamw_composed(param, grad, m, v, step))
    }
}

/// Each token's target id.
fn target_ids(targets: &LossTargets<Cpu>) -> Vec<i64> {
    targets
        .target_ids()
        .clone()
        .into_data()
        .convert::<i64>()
        .into_vec()
        .expect("target ids are integers")
}

/// `[batch, heads, seq, dim]` of attention's queries (`heads`) or keys and values.
fn saved_dims(shape: &Shape, heads: usize) -> [usize; 4] {
    [shape.batch, heads, shape.seq, shape.dim]
}

/// The burn-ndarray tensor behind `t`.
fn native<const D: usize>(t: &Tensor<Cpu, D>) -> NdArrayTensor {
    match t.clone().into_primitive() {
        TensorPrimitive::Float(tensor) => tensor,
        TensorPrimitive::QFloat(_) => unreachable!("pp's CPU tensors are not quantized"),
    }
}

/// `f` of the float32 values of `tensors`, each in row-major order (borrowed where the tensor
/// is contiguous, copied where it is a strided view); `None` when any is not float32.
fn with_f32<const N: usize, R>(
    tensors: [NdArrayTensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Option<R> {
    let storages = tensors
        .into_iter()
        .map(|t| match t {
            NdArrayTensor::F32(storage) => Some(storage),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    let arrays: Vec<CowArray<f32, IxDyn>> = storages
        .iter()
        .map(|storage| {
            let view = storage.view();
            if view.is_standard_layout() {
                CowArray::from(view)
            } else {
                CowArray::from(view.as_standard_layout().into_owned())
            }
        })
        .collect();
    Some(f(std::array::from_fn(|i| {
        arrays[i]
            .as_slice()
            .expect("a standard-layout array is one slice")
    })))
}

/// A CPU tensor of `dims` holding `values` (moved, not copied).
fn tensor<const D: usize>(values: Vec<f32>, dims: [usize; D]) -> Tensor<Cpu, D> {
    Tensor::from_data(TensorData::new(values, dims), &Default::default())
}
