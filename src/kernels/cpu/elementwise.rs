//! Element-wise and row-wise kernels as one pass over every core. Each computes what its
//! composition (`kernels::swiglu`, `kernels::norm`, `kernels::rotary`) computes, in the same
//! float32 order of operations.

use rayon::prelude::*;

/// Elements per task of a parallel pass: large enough to amortise scheduling.
const CHUNK: usize = 1 << 16;

/// `M` outputs of `f` applied at each index of `inputs` (all of one length).
pub fn map<const N: usize, const M: usize>(
    inputs: &[&[f32]; N],
    f: impl Fn([f32; N]) -> [f32; M] + Sync,
) -> [Vec<f32>; M] {
    let len = inputs.first().map_or(0, |first| first.len());
    assert!(
        inputs.iter().all(|input| input.len() == len),
        "lengths differ"
    );
    let mut outputs: [Vec<f32>; M] = std::array::from_fn(|_| vec![0.0; len]);
    // Task `t` gets chunk `t` of every output.
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..len.div_ceil(CHUNK)).map(|_| Vec::new()).collect();
    for output in &mut outputs {
        for (task, chunk) in tasks.iter_mut().zip(output.chunks_mut(CHUNK)) {
            task.push(chunk);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .for_each(|(task, mut out)| {
            let start = task * CHUNK;
            for i in 0..out[0].len() {
                let results = f(inputs.map(|input| input[start + i]));
                for (out, result) in out.iter_mut().zip(results) {
                    out[i] = result;
                }
            }
        });
    outputs
}

/// `x · σ(x)`, as Burn's `silu`.
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// SwiGLU's `[d gate, d up]` at one element (as `kernels::swiglu::backward`).
pub fn swiglu_backward([gate, up, grad]: [f32; 3]) -> [f32; 2] {
    let s = sigmoid(gate);
    let grad_up = grad * gate * s;
    let slope = s * ((1.0 - s) * gate + 1.0);
    [grad * up * slope, grad_up]
}

/// Rows of `width` per task so that a task holds about [`CHUNK`] elements.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// `1 / √(mean(x²) + ε)` of one row.
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean = row.iter().map(|x| x * x).sum::<f32>() / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

/// RMSNorm of rows of `weight.len()` elements of `x`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    let mut out = vec![0.0; x.len()];
    let task = rows_per_task(width) * width;
    out.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .for_each(|(out, x)| {
            for (out, x) in out.chunks_mut(width).zip(x.chunks(width)) {
                let inverse = inverse_rms(x, eps);
                for ((out, x), w) in out.iter_mut().zip(x).zip(weight) {
                    *out = x * inverse * w;
                }
            }
        });
    out
}

/// RMSNorm's `(d x, d weight)` for `grad` of its output (as `kernels::norm::backward`).
pub fn rms_norm_backward(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let width = weight.len();
    let mut grad_x = vec![0.0; x.len()];
    let task = rows_per_task(width) * width;
    let grad_weight = grad_x
        .par_chunks_mut(task)
        .zip(x.par_chunks(task).zip(grad.par_chunks(task)))
        .map(|(grad_x, (x, grad))| {
            let mut grad_weight = vec![0.0f32; width];
            let mut scaled = vec![0.0f32; width];
            for ((grad_x, x), grad) in grad_x
                .chunks_mut(width)
                .zip(x.chunks(width))
                .zip(grad.chunks(width))
            {
                let inverse = inverse_rms(x, eps);
                let mut projection = 0.0f32;
                for i in 0..width {
                    let normalised = x[i] * inverse;
                    grad_weight[i] += grad[i] * normalised;
                    scaled[i] = grad[i] * weight[i];
                    projection += scaled[i] * normalised;
                }
                let projection = projection / width as f32;
                for i in 0..width {
                    grad_x[i] = (scaled[i] - x[i] * inverse * projection) * inverse;
                }
            }
            grad_weight
        })
        .reduce(
            || vec![0.0; width],
            |mut total, part| {
                total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
                total
            },
        );
    (grad_x, grad_weight)
}

/// The rotary embedding of `x` `[batch, heads, seq, dim]` by `cos`, `sin` `[batch, 1, seq,
/// dim]`: `x · cos + rotate_half(x) · sin`.
pub fn rotary(x: &[f32], cos: &[f32], sin: &[f32], [_, heads, seq, dim]: [usize; 4]) -> Vec<f32> {
    let half = dim / 2;
    let mut out = vec![0.0; x.len()];
    let task = rows_per_task(dim) * dim;
    out.par_chunks_mut(task)
        .zip(x.par_chunks(task))
        .enumerate()
        .for_each(|(index, (out, x))| {
            let first_row = index * task / dim;
            for (r, (out, x)) in out.chunks_mut(dim).zip(x.chunks(dim)).enumerate() {
                // Row `(b, h, s)` of x reads row `(b, s)` of the tables.
                let row = first_row + r;
                let table = (row / (heads * seq)) * seq + row % seq;
                let (cos, sin) = (&cos[table * dim..][..dim], &sin[table * dim..][..dim]);
                for i in 0..dim {
                    let rotated = if i < half { -x[i + half] } else { x[i - half] };
                    out[i] = x[i] * cos[i] + rotated * sin[i];
                }
            }
        });
    out
}
