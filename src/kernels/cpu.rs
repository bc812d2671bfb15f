//! The CPU backend's kernels: every matmul of the step (the linear maps', the head's and
//! attention's) through the `gemm` crate.
//!
//! burn-ndarray's matmul goes through matrixmultiply, copies a transposed operand to make it
//! contiguous, and runs a single matrix on one thread; `gemm` takes both operands with any
//! strides (so `weightᵀ`, `gradᵀ` and `Kᵀ` are views, never copies) and has AVX-512 kernels.
//! One matrix is split over every core; a batch of them (attention's heads) is spread one
//! matrix per core. AdamW's update is one pass over the parameter on every core, where the
//! composition is a dozen single-threaded passes. The rest of the step stays on burn-ndarray.

use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_ndarray::NdArrayTensor;
use rayon::prelude::*;

use super::optimizer::adamw_composed;
use super::{AdamWResult, AdamWStep, Kernels};
use crate::device::Cpu;
use crate::model::layers::in_dtype;

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

    fn adamw_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        m: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        step: &AdamWStep,
    ) -> AdamWResult<Self> {
        let (device, dims) = (param.device(), param.dims());
        let inputs = [&param, &grad, &m, &v].map(|t| native((*t).clone()));
        let [NdArrayTensor::F32(p), NdArrayTensor::F32(g), NdArrayTensor::F32(mo), NdArrayTensor::F32(ve)] =
            &inputs
        else {
            return adamw_composed(param, grad, m, v, step);
        };
        let views = [p.view(), g.view(), mo.view(), ve.view()];
        let Some([p, g, mo, ve]) = views
            .iter()
            .map(|view| view.as_slice())
            .collect::<Option<Vec<_>>>()
            .and_then(|slices| <[&[f32]; 4]>::try_from(slices).ok())
        else {
            return adamw_composed(param, grad, m, v, step);
        };
        let c = step.coefficients().map(|c| c as f32);
        let n = p.len();
        let [mut p_out, mut m_out, mut v_out] = [(); 3].map(|_| vec![0.0f32; n]);
        p_out
            .par_chunks_mut(ELEMENTWISE_CHUNK)
            .zip(m_out.par_chunks_mut(ELEMENTWISE_CHUNK))
            .zip(v_out.par_chunks_mut(ELEMENTWISE_CHUNK))
            .enumerate()
            .for_each(|(chunk, ((p_out, m_out), v_out))| {
                let start = chunk * ELEMENTWISE_CHUNK;
                for i in 0..p_out.len() {
                    let at = start + i;
                    // As `adamw_composed`, in float32 like the GPU kernel.
                    let g = g[at];
                    let m_new = mo[at] * c[1] + g * c[2];
                    let v_new = ve[at] * c[3] + g * g * c[4];
                    let denom = v_new.sqrt() / c[5] + c[6];
                    p_out[i] = p[at] * c[0] - m_new / denom * c[7];
                    m_out[i] = m_new;
                    v_out[i] = v_new;
                }
            });
        [p_out, m_out, v_out]
            .map(|values| Tensor::from_data(TensorData::new(values, dims), &device))
    }
}

/// Elements per task of a parallel element-wise pass: large enough to amortise scheduling.
const ELEMENTWISE_CHUNK: usize = 1 << 16;

/// `lhs · rhs` over the last two dimensions, the leading ones matched (not broadcast), in
/// float32 with `gemm`, each operand read through its strides; other dtypes take
/// burn-ndarray's matmul.
fn matmul<const D: usize>(lhs: Tensor<Cpu, D>, rhs: Tensor<Cpu, D>) -> Tensor<Cpu, D> {
    let device = lhs.device();
    let (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) = (native(lhs.clone()), native(rhs.clone()))
    else {
        return lhs.matmul(rhs);
    };
    let (a, b) = (a.view(), b.view());
    let (a_shape, b_shape) = (a.shape(), b.shape());
    let lead = &a_shape[..D - 2];
    let [m, k] = [a_shape[D - 2], a_shape[D - 1]];
    let n = b_shape[D - 1];
    if lead != &b_shape[..D - 2] {
        // Broadcast leading dimensions: none of pp's matmuls have them.
        return lhs.matmul(rhs);
    }
    assert_eq!(k, b_shape[D - 2], "matmul of {a_shape:?} by {b_shape:?}");
    let a_layout = Layout::of(a.as_ptr(), a.strides());
    let b_layout = Layout::of(b.as_ptr(), b.strides());
    let count: usize = lead.iter().product();
    let mut out = vec![0.0f32; count * m * n];
    // One matrix uses every core; several go one per core.
    let parallelism = if count == 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    out.par_chunks_mut((m * n).max(1))
        .enumerate()
        .for_each(|(index, dst)| {
            let (a_at, b_at) = (a_layout.matrix(index, lead), b_layout.matrix(index, lead));
            // Safety: `dst` holds the m·n elements of one row-major output matrix; `a_at` and
            // `b_at` point into live views whose strides (in elements) describe an m×k and a
            // k×n matrix there.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    dst.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a_at,
                    a_layout.col_stride,
                    a_layout.row_stride,
                    b_at,
                    b_layout.col_stride,
                    b_layout.row_stride,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        });
    let mut shape = lead.to_vec();
    shape.extend([m, n]);
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// Where an operand's matrices lie: its first element and its strides, in elements.
struct Layout {
    /// The address of the first element (shared with the worker threads, which only read).
    start: usize,
    /// Strides of the leading (batch) dimensions.
    lead_strides: Vec<isize>,
    row_stride: isize,
    col_stride: isize,
}

impl Layout {
    fn of(start: *const f32, strides: &[isize]) -> Self {
        let d = strides.len();
        Self {
            start: start as usize,
            lead_strides: strides[..d - 2].to_vec(),
            row_stride: strides[d - 2],
            col_stride: strides[d - 1],
        }
    }

    /// The first element of matrix `index` in row-major order over the leading dimensions
    /// `lead`.
    fn matrix(&self, mut index: usize, lead: &[usize]) -> *const f32 {
        let mut offset = 0isize;
        for (&size, &stride) in lead.iter().zip(&self.lead_strides).rev() {
            offset += (index % size) as isize * stride;
            index /= size;
        }
        (self.start as *const f32).wrapping_offset(offset)
    }
}

/// The burn-ndarray tensor behind `t`.
fn native<const D: usize>(t: Tensor<Cpu, D>) -> NdArrayTensor {
    match t.into_primitive() {
        TensorPrimitive::Float(tensor) => tensor,
        TensorPrimitive::QFloat(_) => unreachable!("pp's CPU tensors are not quantized"),
    }
}
