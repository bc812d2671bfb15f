//! Matmuls through the `gemm` crate, reading both operands through their strides (so `weightᵀ`,
//! `gradᵀ` and `Kᵀ` are views, never copies) with its AVX-512 kernels.
//!
//! burn-ndarray's matmul goes through matrixmultiply, copies a transposed operand to make it
//! contiguous, and runs a single matrix on one thread. Here one matrix is split over every core
//! and a batch of them (attention's heads) is spread one matrix per core.

use burn::tensor::{Tensor, TensorData};
use burn_ndarray::NdArrayTensor;
use rayon::prelude::*;

use super::native;
use crate::device::Cpu;

/// `lhs · rhs` over the last two dimensions, the leading ones matched (not broadcast), in
/// float32; other dtypes take burn-ndarray's matmul.
pub(super) fn matmul<const D: usize>(lhs: Tensor<Cpu, D>, rhs: Tensor<Cpu, D>) -> Tensor<Cpu, D> {
    let device = lhs.device();
    let (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) = (native(&lhs), native(&rhs)) else {
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
            let lhs = a_layout.matrix(index, lead);
            let rhs = b_layout.matrix(index, lead);
            // Safety: `dst` holds the m·n elements of one row-major output matrix; `lhs` and
            // `rhs` point into live views whose strides describe an m×k and a k×n matrix.
            unsafe { gemm_raw([m, n, k], dst.as_mut_ptr(), lhs, rhs, false, parallelism) }
        });
    let mut shape = lead.to_vec();
    shape.extend([m, n]);
    Tensor::from_data(TensorData::new(out, shape), &device)
}

/// A matrix inside a float32 slice: element `(r, c)` at `r·row_stride + c·col_stride`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Matrix<'a> {
    /// The first `rows · cols` elements of `data`, row by row.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(
            data.len() >= rows * cols,
            "{rows}x{cols} matrix in {}",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// Rows `start..start + count`.
    pub fn rows(self, start: usize, count: usize) -> Self {
        assert!(
            start + count <= self.rows,
            "rows {start}+{count} of {}",
            self.rows
        );
        let offset = (start * self.row_stride).min(self.data.len());
        Self {
            data: &self.data[offset..],
            rows: count,
            ..self
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn raw(&self) -> Strided {
        Strided {
            start: self.data.as_ptr(),
            row_stride: self.row_stride as isize,
            col_stride: self.col_stride as isize,
        }
    }
}

/// `dst` (row-major `lhs.rows × rhs.cols`) = `lhs · rhs`, or `dst + lhs · rhs` when
/// `accumulate`, on the calling thread.
pub(super) fn matmul_into(dst: &mut [f32], lhs: Matrix, rhs: Matrix, accumulate: bool) {
    let [m, k, n] = [lhs.rows, lhs.cols, rhs.cols];
    assert_eq!(k, rhs.rows, "{m}x{k} by {}x{n}", rhs.rows);
    assert_eq!(dst.len(), m * n, "{m}x{n} result in {}", dst.len());
    if m == 0 || n == 0 {
        return;
    }
    // Safety: `dst` holds the m·n row-major results, and `Matrix::row_major` and `rows` keep
    // every element of `lhs` and `rhs` inside their slices.
    unsafe {
        gemm_raw(
            [m, n, k],
            dst.as_mut_ptr(),
            lhs.raw(),
            rhs.raw(),
            accumulate,
            gemm::Parallelism::None,
        )
    }
}

/// An operand as `gemm` takes it.
#[derive(Clone, Copy)]
struct Strided {
    start: *const f32,
    row_stride: isize,
    col_stride: isize,
}

/// `dst = lhs · rhs` (`+=` when `accumulate`) for an `m × k` `lhs`, a `k × n` `rhs` and a
/// contiguous row-major `dst`.
///
/// # Safety
/// Every element the shapes and strides address must lie in live memory, `dst`'s writable and
/// not aliased.
unsafe fn gemm_raw(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    lhs: Strided,
    rhs: Strided,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let kept = if accumulate { 1.0 } else { 0.0 };
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        n as isize,
        accumulate,
        lhs.start,
        lhs.col_stride,
        lhs.row_stride,
        rhs.start,
        rhs.col_stride,
        rhs.row_stride,
        kept,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// Where a tensor's matrices lie: its first element and its strides, in elements.
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

    /// Matrix `index` in row-major order over the leading dimensions `lead`.
    fn matrix(&self, mut index: usize, lead: &[usize]) -> Strided {
        let mut offset = 0isize;
        for (&size, &stride) in lead.iter().zip(&self.lead_strides).rev() {
            offset += (index % size) as isize * stride;
            index /= size;
        }
        Strided {
            start: (self.start as *const f32).wrapping_offset(offset),
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}
