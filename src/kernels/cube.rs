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

fn primitive<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    t: Tensor<CubeBackend<R, F, I, BT>, 2>,
) -> CubeTensor<R> {
    into_contiguous(t.into_primitive().tensor())
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
        let (client, device) = (param.client.clone(), param.device.clone());
        let shape = param.meta.shape().clone();
        let elements = shape.num_elements();
        let coefficients = step.coefficients().map(|c| c as f32);
        let coefficients = client.create_from_slice(f32::as_bytes(&coefficients));
        let output =
            || empty_device_dtype(client.clone(), device.clone(), shape.clone(), DType::F32);
        let outputs = [output(), output(), output()];
        let cube_dim = CubeDim::new(&client, elements);
        let cube_count = calculate_cube_count_elemwise(&client, elements, cube_dim);
        adamw_kernel::launch::<f32, R>(
            &client,
            cube_count,
            cube_dim,
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
        outputs.map(|o| Tensor::from_primitive(TensorPrimitive::Float(o)))
    }
}
