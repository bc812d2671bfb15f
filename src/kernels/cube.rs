//! pp's own CubeCL kernels for Burn's CubeCL backends (CUDA, wgpu): one source compiled for
//! each device at run time.

use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;

use super::optimizer::{adamw_composed, AdamWResult, AdamWStep};
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
        let client = like.client.clone();
        let shape = like.meta.shape().clone();
        let elements = shape.num_elements();
        let dim = CubeDim::new(&client, elements);
        let count = calculate_cube_count_elemwise(&client, elements, dim);
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
        // The kernel is written for float32 state and weights (the master weights); other
        // dtypes take the composition.
        if [&param, &grad, &m, &v]
            .iter()
            .any(|t| t.dtype() != DType::F32)
        {
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

    fn swiglu_forward(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        if gate.dtype() != DType::F32 || up.dtype() != DType::F32 {
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
        if [&gate, &up, &grad].iter().any(|t| t.dtype() != DType::F32) {
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
}
