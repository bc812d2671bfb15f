//! pp's own CubeCL kernels for Burn's CubeCL backends (CUDA, wgpu): one source compiled for
//! each device at run time.

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;
// Burn's `Tensor` is the one imported by name above; kernels take CubeCL's strided tensors.
use cubecl::prelude::Tensor as KernelTensor;

use super::optimizer::{
    adafactor_clip_divisor, adafactor_composed, adamw_composed, sgd_composed, AdafactorStep,
    AdamWResult, AdamWStep, SecondMoment, SgdStep,
};
use super::Kernels;

/// AdamW for one element per unit: reads the parameter, gradient and both moments once and
/// writes the three results, where the composition makes about ten passes and temporaries.
/// `c` holds [`AdamWStep::coefficients`].
#[cube(launch)]
fn adamw_kernel<F: Float>(
    param: &Array<F>,
    grad: &Array<F>,
    m: &Array<F>,
    v: &Array<F>,
    c: &Array<F>,
    param_out: &mut Array<F>,
    m_out: &mut Array<F>,
    v_out: &mut Array<F>,
) {
    if ABSOLUTE_POS < param.len() {
        let g = grad[ABSOLUTE_POS];
        let m_new = m[ABSOLUTE_POS] * c[1] + g * c[2];
        let v_new = v[ABSOLUTE_POS] * c[3] + g * g * c[4];
        let denom = F::sqrt(v_new) / c[5] + c[6];
        param_out[ABSOLUTE_POS] = param[ABSOLUTE_POS] * c[0] - m_new / denom * c[7];
        m_out[ABSOLUTE_POS] = m_new;
        v_out[ABSOLUTE_POS] = v_new;
    }
}

/// Adafactor's factored update before clipping, for one element of `[rows, cols]` per unit:
/// `grad / √(rows / mean(rows)) / √cols` (see [`super::optimizer::SecondMoment`]).
#[cube(launch)]
fn adafactor_direction_kernel<F: Float>(
    grad: &KernelTensor<F>,
    rows: &Array<F>,
    cols: &Array<F>,
    row_mean: &Array<F>,
    output: &mut KernelTensor<F>,
) {
    let pos = ABSOLUTE_POS;
    if pos < grad.len() {
        let width = grad.shape(1);
        let row_factor = F::new(1.0) / F::sqrt(rows[pos / width] / row_mean[0]);
        let col_factor = F::new(1.0) / F::sqrt(cols[pos % width]);
        output[pos] = row_factor * col_factor * grad[pos];
    }
}

/// Adafactor's step for one element per unit: decay, then the update clipped by `divisor`.
#[cube(launch)]
fn adafactor_apply_kernel<F: Float>(
    param: &Array<F>,
    update: &Array<F>,
    divisor: &Array<F>,
    decay: f32,
    lr: f32,
    output: &mut Array<F>,
) {
    let (decay, lr) = (F::cast_from(decay), F::cast_from(lr));
    if ABSOLUTE_POS < param.len() {
        output[ABSOLUTE_POS] = param[ABSOLUTE_POS] * decay - update[ABSOLUTE_POS] / divisor[0] * lr;
    }
}

/// SGD with momentum for one element per unit (weight decay as an L2 term of the gradient).
#[cube(launch)]
fn sgd_momentum_kernel<F: Float>(
    param: &Array<F>,
    grad: &Array<F>,
    buffer: &Array<F>,
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    param_out: &mut Array<F>,
    buffer_out: &mut Array<F>,
) {
    let (lr, momentum) = (F::cast_from(lr), F::cast_from(momentum));
    let weight_decay = F::cast_from(weight_decay);
    if ABSOLUTE_POS < param.len() {
        let p = param[ABSOLUTE_POS];
        let b = buffer[ABSOLUTE_POS] * momentum + (grad[ABSOLUTE_POS] + p * weight_decay);
        buffer_out[ABSOLUTE_POS] = b;
        param_out[ABSOLUTE_POS] = p - b * lr;
    }
}

/// SwiGLU's gating for one element per unit.
#[cube(launch)]
fn swiglu_forward_kernel<F: Float>(gate: &Array<F>, up: &Array<F>, output: &mut Array<F>) {
    if ABSOLUTE_POS < gate.len() {
        let g = gate[ABSOLUTE_POS];
        let s = F::new(1.0) / (F::new(1.0) + F::exp(-g));
        output[ABSOLUTE_POS] = g * s * up[ABSOLUTE_POS];
    }
}

/// SwiGLU's gradients for one element per unit (see [`super::swiglu::backward`]).
#[cube(launch)]
fn swiglu_backward_kernel<F: Float>(
    gate: &Array<F>,
    up: &Array<F>,
    grad: &Array<F>,
    grad_gate: &mut Array<F>,
    grad_up: &mut Array<F>,
) {
    if ABSOLUTE_POS < gate.len() {
        let g = gate[ABSOLUTE_POS];
        let dy = grad[ABSOLUTE_POS];
        let s = F::new(1.0) / (F::new(1.0) + F::exp(-g));
        grad_up[ABSOLUTE_POS] = dy * g * s;
        grad_gate[ABSOLUTE_POS] = dy * up[ABSOLUTE_POS] * s * (F::new(1.0) + g * (F::new(1.0) - s));
    }
}

/// Units of the cube that normalises one row: each sums a strided share of the row, then the
/// cube adds the shares up in shared memory.
const ROW_UNITS: u32 = 128;

/// The sum of every unit's `value` over the cube, in every unit (a tree in shared memory).
#[cube]
fn cube_sum<F: Float>(value: F) -> F {
    let mut shared = SharedMemory::<F>::new(ROW_UNITS as usize);
    let unit = UNIT_POS as usize;
    shared[unit] = value;
    sync_cube();
    // CUBE_DIM (= ROW_UNITS), not the constant: the loop changes it at run time.
    let mut active = CUBE_DIM as usize / 2;
    while active > 0 {
        if unit < active {
            shared[unit] = shared[unit] + shared[unit + active];
        }
        sync_cube();
        active /= 2;
    }
    shared[0]
}

/// RMSNorm of one row per cube: `x / rms(x) · weight`.
#[cube(launch)]
fn rms_norm_forward_kernel<F: Float>(
    x: &Array<F>,
    weight: &Array<F>,
    eps: f32,
    output: &mut Array<F>,
) {
    let eps = F::cast_from(eps);
    let hidden = weight.len();
    let start = CUBE_POS * hidden;
    // Uniform over the cube (one row each), so the barriers inside stay uniform.
    if start < x.len() {
        let mut squares = F::new(0.0);
        let mut i = UNIT_POS as usize;
        while i < hidden {
            let value = x[start + i];
            squares += value * value;
            i += ROW_UNITS as usize;
        }
        let inverse = F::new(1.0) / F::sqrt(cube_sum::<F>(squares) / F::cast_from(hidden) + eps);
        let mut i = UNIT_POS as usize;
        while i < hidden {
            output[start + i] = x[start + i] * inverse * weight[i];
            i += ROW_UNITS as usize;
        }
    }
}

/// RMSNorm's backward for one row per cube (see [`super::norm::backward`]): `d x`, and each
/// token's share `grad · x̂` of `d weight`, summed over tokens afterwards.
#[cube(launch)]
fn rms_norm_backward_kernel<F: Float>(
    x: &Array<F>,
    weight: &Array<F>,
    grad: &Array<F>,
    eps: f32,
    grad_x: &mut Array<F>,
    weight_shares: &mut Array<F>,
) {
    let eps = F::cast_from(eps);
    let hidden = weight.len();
    let start = CUBE_POS * hidden;
    if start < x.len() {
        let mut squares = F::new(0.0);
        let mut dot = F::new(0.0);
        let mut i = UNIT_POS as usize;
        while i < hidden {
            let value = x[start + i];
            squares += value * value;
            dot += grad[start + i] * weight[i] * value;
            i += ROW_UNITS as usize;
        }
        let width = F::cast_from(hidden);
        let inverse = F::new(1.0) / F::sqrt(cube_sum::<F>(squares) / width + eps);
        // mean(grad · weight · x̂) over the row.
        let projection = cube_sum::<F>(dot) * inverse / width;
        let mut i = UNIT_POS as usize;
        while i < hidden {
            let normalised = x[start + i] * inverse;
            let g = grad[start + i];
            grad_x[start + i] = (g * weight[i] - normalised * projection) * inverse;
            weight_shares[start + i] = g * normalised;
            i += ROW_UNITS as usize;
        }
    }
}

/// The rotary embedding for one element of `[batch, heads, seq, dim]` per unit, the tables
/// `[batch, 1, seq, dim]` shared by the heads: `x · cos + rotate_half(x) · sin`.
#[cube(launch)]
fn rotary_kernel<F: Float>(
    x: &KernelTensor<F>,
    cos: &KernelTensor<F>,
    sin: &KernelTensor<F>,
    output: &mut KernelTensor<F>,
) {
    let pos = ABSOLUTE_POS;
    if pos < x.len() {
        let dim = x.shape(3);
        let half = dim / 2;
        let per_batch = x.shape(1) * x.shape(2) * dim;
        let per_table = x.shape(2) * dim;
        // The same position and lane of this row's table, whichever head.
        let t = (pos / per_batch) * per_table + pos % per_table;
        let value = x[pos] * cos[t];
        if pos % dim < half {
            output[pos] = value - x[pos + half] * sin[t];
        } else {
            output[pos] = value + x[pos - half] * sin[t];
        }
    }
}

/// A float tensor as a contiguous CubeCL tensor.
fn primitive<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<CubeBackend<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    into_contiguous(t.into_primitive().tensor())
}

/// An element-wise launch over a tensor's elements: the client, cube count and dimension, and
/// a maker of float32 outputs shaped like it.
struct Elementwise<R: CubeRuntime> {
    client: ComputeClient<R>,
    device: R::Device,
    shape: burn::tensor::Shape,
    count: CubeCount,
    dim: CubeDim,
}

impl<R: CubeRuntime> Elementwise<R> {
    fn over(like: &CubeTensor<R>) -> Self {
        let elements = like.meta.shape().num_elements();
        Self::with_dim(like, CubeDim::new(&like.client, elements), elements)
    }

    /// One cube of [`ROW_UNITS`] per row of the last dimension.
    fn over_rows(like: &CubeTensor<R>) -> Self {
        let shape = like.meta.shape();
        let rows = shape.num_elements() / shape[shape.num_dims() - 1].max(1);
        let dim = CubeDim::new_1d(ROW_UNITS);
        Self::with_dim(like, dim, rows * ROW_UNITS as usize)
    }

    /// `units` units in cubes of `dim`.
    fn with_dim(like: &CubeTensor<R>, dim: CubeDim, units: usize) -> Self {
        let client = like.client.clone();
        let shape = like.meta.shape().clone();
        let count = calculate_cube_count_elemwise(&client, units, dim);
        Self {
            device: like.device.clone(),
            client,
            shape,
            count,
            dim,
        }
    }

    fn output(&self) -> CubeTensor<R> {
        empty_device_dtype(
            self.client.clone(),
            self.device.clone(),
            self.shape.clone(),
            DType::F32,
        )
    }
}

/// Whether every operand is float32: the kernels are written for float32 (the master weights
/// and activations of CPU-equivalence runs); other dtypes take the composition.
fn all_f32(dtypes: &[DType]) -> bool {
    dtypes.iter().all(|&dtype| dtype == DType::F32)
}

/// A tensor of `B` from its float primitive.
fn float<B: burn::tensor::backend::Backend, const D: usize>(
    t: B::FloatTensorPrimitive,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Kernels
    for CubeBackend<R, F, I, BT>
{
    fn adamw_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        m: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        step: &AdamWStep,
    ) -> AdamWResult<Self> {
        if !all_f32(&[param.dtype(), grad.dtype(), m.dtype(), v.dtype()]) {
            return adamw_composed(param, grad, m, v, step);
        }
        let [param, grad, m, v] = [param, grad, m, v].map(primitive);
        let launch = Elementwise::over(&param);
        let coefficients = step.coefficients().map(|c| c as f32);
        let coefficients = launch
            .client
            .create_from_slice(f32::as_bytes(&coefficients));
        let outputs = [launch.output(), launch.output(), launch.output()];
        adamw_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            param.into_array_arg(),
            grad.into_array_arg(),
            m.into_array_arg(),
            v.into_array_arg(),
            // Safety: the handle holds exactly the eight coefficients.
            unsafe { ArrayArg::from_raw_parts(coefficients, 8) },
            outputs[0].clone().into_array_arg(),
            outputs[1].clone().into_array_arg(),
            outputs[2].clone().into_array_arg(),
        );
        outputs.map(float::<Self, 2>)
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        if !all_f32(&[gate.dtype(), up.dtype()]) {
            return super::swiglu::forward(gate, up);
        }
        let [gate, up] = [gate, up].map(primitive);
        let launch = Elementwise::over(&gate);
        let output = launch.output();
        swiglu_forward_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            gate.into_array_arg(),
            up.into_array_arg(),
            output.clone().into_array_arg(),
        );
        float(output)
    }

    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        grad: Tensor<Self, 3>,
    ) -> [Tensor<Self, 3>; 2] {
        if !all_f32(&[gate.dtype(), up.dtype(), grad.dtype()]) {
            return super::swiglu::backward(gate, up, grad);
        }
        let [gate, up, grad] = [gate, up, grad].map(primitive);
        let launch = Elementwise::over(&gate);
        let outputs = [launch.output(), launch.output()];
        swiglu_backward_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            gate.into_array_arg(),
            up.into_array_arg(),
            grad.into_array_arg(),
            outputs[0].clone().into_array_arg(),
            outputs[1].clone().into_array_arg(),
        );
        outputs.map(float::<Self, 3>)
    }

    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        if !all_f32(&[x.dtype(), weight.dtype()]) {
            return super::norm::forward(x, weight, eps);
        }
        let (x, weight) = (primitive(x), primitive(weight));
        let launch = Elementwise::over_rows(&x);
        let output = launch.output();
        rms_norm_forward_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            x.into_array_arg(),
            weight.into_array_arg(),
            eps as f32,
            output.clone().into_array_arg(),
        );
        float(output)
    }

    fn rms_norm_backward(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 1>) {
        if !all_f32(&[x.dtype(), weight.dtype(), grad.dtype()]) {
            return super::norm::backward(x, weight, eps, grad);
        }
        let [batch, seq, hidden] = x.dims();
        let (x, weight, grad) = (primitive(x), primitive(weight), primitive(grad));
        let launch = Elementwise::over_rows(&x);
        let [grad_x, shares] = [launch.output(), launch.output()];
        rms_norm_backward_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            x.into_array_arg(),
            weight.into_array_arg(),
            grad.into_array_arg(),
            eps as f32,
            grad_x.clone().into_array_arg(),
            shares.clone().into_array_arg(),
        );
        let grad_weight = float::<Self, 3>(shares)
            .reshape([batch * seq, hidden])
            .sum_dim(0)
            .reshape([hidden]);
        (float(grad_x), grad_weight)
    }

    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        if !all_f32(&[x.dtype(), cos.dtype(), sin.dtype()]) {
            return super::rotary::forward(x, cos, sin);
        }
        let [x, cos, sin] = [x, cos, sin].map(primitive);
        let launch = Elementwise::over(&x);
        let output = launch.output();
        rotary_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            x.into_tensor_arg(),
            cos.into_tensor_arg(),
            sin.into_tensor_arg(),
            output.clone().into_tensor_arg(),
        );
        float(output)
    }

    fn adafactor_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        moment: SecondMoment<Self>,
        step: &AdafactorStep,
    ) -> (Tensor<Self, 2>, SecondMoment<Self>) {
        // Vectors (norm scales) are small: their unfactored moment takes the composition.
        let factored = matches!(moment, SecondMoment::Factored { .. });
        if !factored || !all_f32(&[param.dtype(), grad.dtype()]) {
            return adafactor_composed(param, grad, moment, step);
        }
        let moment = moment.updated(&grad, step);
        let SecondMoment::Factored { rows, cols } = &moment else {
            unreachable!("a factored moment stays factored")
        };
        let row_mean = rows.clone().mean();
        let grad = primitive(grad);
        let launch = Elementwise::over(&grad);
        let update = launch.output();
        adafactor_direction_kernel::launch::<f32, R>(
            &launch.client,
            launch.count.clone(),
            launch.dim,
            grad.into_tensor_arg(),
            primitive(rows.clone()).into_array_arg(),
            primitive(cols.clone()).into_array_arg(),
            primitive(row_mean).into_array_arg(),
            update.clone().into_tensor_arg(),
        );
        let update = float::<Self, 2>(update);
        let divisor = adafactor_clip_divisor(&update, step.clip_threshold);
        let output = launch.output();
        adafactor_apply_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            primitive(param).into_array_arg(),
            primitive(update).into_array_arg(),
            primitive(divisor).into_array_arg(),
            (1.0 - step.weight_decay * step.lr) as f32,
            step.lr as f32,
            output.clone().into_array_arg(),
        );
        (float(output), moment)
    }

    fn sgd_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        buffer: Option<Tensor<Self, 2>>,
        step: &SgdStep,
    ) -> (Tensor<Self, 2>, Option<Tensor<Self, 2>>) {
        // Plain SGD is one multiply-add already; the kernel is for the momentum update.
        if step.momentum == 0.0 || !all_f32(&[param.dtype(), grad.dtype()]) {
            return sgd_composed(param, grad, buffer, step);
        }
        // A zero buffer makes the first step's buffer the gradient, as torch's does.
        let buffer = buffer.unwrap_or_else(|| grad.zeros_like());
        let [param, grad, buffer] = [param, grad, buffer].map(primitive);
        let launch = Elementwise::over(&param);
        let outputs = [launch.output(), launch.output()];
        sgd_momentum_kernel::launch::<f32, R>(
            &launch.client,
            launch.count,
            launch.dim,
            param.into_array_arg(),
            grad.into_array_arg(),
            buffer.into_array_arg(),
            step.lr as f32,
            step.momentum as f32,
            step.weight_decay as f32,
            outputs[0].clone().into_array_arg(),
            outputs[1].clone().into_array_arg(),
        );
        let [param, buffer] = outputs.map(float::<Self, 2>);
        (param, Some(buffer))
    }
}
