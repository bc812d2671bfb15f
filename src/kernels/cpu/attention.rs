//! Attention on the CPU: FlashAttention-2's algorithm (`kernels::attention`) with one task per
//! (row, key/value head), which owns its query heads' outputs and its keys' and values'
//! gradients, so tasks run on every core without sharing a write. Each works a tile of query
//! rows at a time, scores only the keys the tile's mask can reach (causal: none after the
//! tile), and masks, exponentiates and normalises each row in one pass where the composition
//! builds a mask tensor and runs a pass per step.

use rayon::prelude::*;
use std::ops::Range;

use super::matmul::{matmul_into, Matrix};
use super::Cpu;
use crate::kernels::AttentionSpec;

/// Query rows per tile.
const TILE: usize = 64;

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub dim: usize,
}

impl Shape {
    /// From the dims of the queries and the keys.
    pub fn of([batch, heads, seq, dim]: [usize; 4], k: [usize; 4]) -> Self {
        let kv_heads = k[1];
        assert_eq!(
            heads % kv_heads,
            0,
            "query heads are a multiple of kv heads"
        );
        Self {
            batch,
            heads,
            kv_heads,
            seq,
            dim,
        }
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Elements of one head's `[seq, dim]` matrix.
    fn head(&self) -> usize {
        self.seq * self.dim
    }

    /// Query tiles: `(first row, rows)`.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> {
        let seq = self.seq;
        (0..seq)
            .step_by(TILE)
            .map(move |start| (start, TILE.min(seq - start)))
    }
}

/// Which keys each query sees (as `AttentionSpec::blocked`), and the score scale.
pub struct Mask {
    /// `[batch, seq]` document ids.
    documents: Vec<i64>,
    seq: usize,
    window: Option<usize>,
    scale: f32,
}

impl Mask {
    pub fn of(spec: &AttentionSpec<Cpu>) -> Self {
        let documents = spec.documents();
        let seq = documents.dims()[1];
        Self {
            documents: documents
                .clone()
                .into_data()
                .convert::<i64>()
                .into_vec()
                .expect("document ids are integers"),
            seq,
            window: spec.window(),
            scale: spec.scale() as f32,
        }
    }

    /// The keys any of queries `queries` may see: none after the last, none a window before
    /// the first.
    fn keys(&self, queries: Range<usize>) -> Range<usize> {
        let first = self
            .window
            .map_or(0, |window| (queries.start + 1).saturating_sub(window));
        first..queries.end
    }

    fn visible(&self, row: usize, query: usize, key: usize) -> bool {
        let documents = &self.documents[row * self.seq..][..self.seq];
        key <= query
            && documents[key] == documents[query]
            && self.window.is_none_or(|window| query - key < window)
    }
}

/// The output `[batch, heads, seq, dim]` and each query row's log-sum-exp `[batch, heads,
/// seq]` of float32 `q`, `k`, `v` in row-major order.
pub fn forward(shape: Shape, mask: &Mask, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (groups, head) = (shape.groups(), shape.head());
    let mut output = vec![0.0; shape.batch * shape.heads * head];
    let mut log_sum_exp = vec![0.0; shape.batch * shape.heads * shape.seq];
    // Task (row, kv head) owns the outputs of its `groups` query heads, which lie together.
    output
        .par_chunks_mut(groups * head)
        .zip(log_sum_exp.par_chunks_mut(groups * shape.seq))
        .enumerate()
        .for_each(|(task, (output, log_sum_exp))| {
            let row = task / shape.kv_heads;
            let keys = Matrix::row_major(&k[task * head..], shape.seq, shape.dim);
            let values = Matrix::row_major(&v[task * head..], shape.seq, shape.dim);
            let mut scores = vec![0.0f32; TILE * shape.seq];
            for group in 0..groups {
                let queries =
                    Matrix::row_major(&q[(task * groups + group) * head..], shape.seq, shape.dim);
                let output = &mut output[group * head..][..head];
                let log_sum_exp = &mut log_sum_exp[group * shape.seq..][..shape.seq];
                for (start, rows) in shape.tiles() {
                    let seen = mask.keys(start..start + rows);
                    let width = seen.len();
                    let probs = &mut scores[..rows * width];
                    matmul_into(
                        probs,
                        queries.rows(start, rows),
                        keys.rows(seen.start, width).t(),
                        false,
                    );
                    for (r, scores) in probs.chunks_mut(width).enumerate() {
                        let query = start + r;
                        let visible = |j: usize| mask.visible(row, query, seen.start + j);
                        log_sum_exp[query] = softmax(scores, mask.scale, visible);
                    }
                    matmul_into(
                        &mut output[start * shape.dim..(start + rows) * shape.dim],
                        Matrix::row_major(probs, rows, width),
                        values.rows(seen.start, width),
                        false,
                    );
                }
            }
        });
    (output, log_sum_exp)
}

/// One row of raw scores in place to probabilities: scaled, masked where not `visible`
/// (probability exactly 0), normalised. Returns the row's log-sum-exp.
fn softmax(scores: &mut [f32], scale: f32, visible: impl Fn(usize) -> bool) -> f32 {
    let mut max = f32::NEG_INFINITY;
    for (j, score) in scores.iter_mut().enumerate() {
        if visible(j) {
            *score *= scale;
            max = max.max(*score);
        } else {
            *score = f32::NEG_INFINITY;
        }
    }
    let mut total = 0.0f32;
    for score in scores.iter_mut() {
        // exp(−∞) is 0: masked keys drop out.
        *score = (*score - max).exp();
        total += *score;
    }
    for score in scores.iter_mut() {
        *score /= total;
    }
    max + total.ln()
}

/// What the backward pass reads: the forward inputs and results, row-major float32.
pub struct Saved<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub output: &'a [f32],
    pub log_sum_exp: &'a [f32],
}

/// Gradients `[d q, d k, d v]` for `grad_output` of the output (FlashAttention-2's backward,
/// as `kernels::attention::backward`): per tile, probabilities from the saved log-sum-exp,
/// `dV += Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))·scale`, `dQ = dS·K`, `dK += dSᵀ·Q`.
pub fn backward(shape: Shape, mask: &Mask, saved: &Saved, grad_output: &[f32]) -> [Vec<f32>; 3] {
    let (groups, head, seq, dim) = (shape.groups(), shape.head(), shape.seq, shape.dim);
    let mut grad_q = vec![0.0; shape.batch * shape.heads * head];
    let mut grad_k = vec![0.0; shape.batch * shape.kv_heads * head];
    let mut grad_v = vec![0.0; grad_k.len()];
    grad_q
        .par_chunks_mut(groups * head)
        .zip(grad_k.par_chunks_mut(head).zip(grad_v.par_chunks_mut(head)))
        .enumerate()
        .for_each(|(task, (grad_q, (grad_k, grad_v)))| {
            let row = task / shape.kv_heads;
            let keys = Matrix::row_major(&saved.k[task * head..], seq, dim);
            let values = Matrix::row_major(&saved.v[task * head..], seq, dim);
            let mut probs = vec![0.0f32; TILE * seq];
            let mut grad_scores = vec![0.0f32; TILE * seq];
            for group in 0..groups {
                let at = (task * groups + group) * head;
                let queries = Matrix::row_major(&saved.q[at..], seq, dim);
                let grad_out = Matrix::row_major(&grad_output[at..], seq, dim);
                let log_sum_exp = &saved.log_sum_exp[(task * groups + group) * seq..][..seq];
                // rowsum(dO ∘ O) of every query row.
                let delta: Vec<f32> = grad_output[at..at + head]
                    .chunks(dim)
                    .zip(saved.output[at..at + head].chunks(dim))
                    .map(|(g, o)| g.iter().zip(o).map(|(g, o)| g * o).sum())
                    .collect();
                let grad_q = &mut grad_q[group * head..][..head];
                for (start, rows) in shape.tiles() {
                    let seen = mask.keys(start..start + rows);
                    let width = seen.len();
                    let probs = &mut probs[..rows * width];
                    let grad_scores = &mut grad_scores[..rows * width];
                    matmul_into(
                        probs,
                        queries.rows(start, rows),
                        keys.rows(seen.start, width).t(),
                        false,
                    );
                    for (r, scores) in probs.chunks_mut(width).enumerate() {
                        let query = start + r;
                        for (j, score) in scores.iter_mut().enumerate() {
                            *score = if mask.visible(row, query, seen.start + j) {
                                (*score * mask.scale - log_sum_exp[query]).exp()
                            } else {
                                0.0
                            };
                        }
                    }
                    let probs: &[f32] = probs;
                    let probs_matrix = Matrix::row_major(probs, rows, width);
                    let grad_out_tile = grad_out.rows(start, rows);
                    let kv_rows = seen.start * dim..seen.end * dim;
                    matmul_into(
                        &mut grad_v[kv_rows.clone()],
                        probs_matrix.t(),
                        grad_out_tile,
                        true,
                    );
                    matmul_into(
                        grad_scores,
                        grad_out_tile,
                        values.rows(seen.start, width).t(),
                        false,
                    );
                    for (r, (grad_scores, probs)) in grad_scores
                        .chunks_mut(width)
                        .zip(probs.chunks(width))
                        .enumerate()
                    {
                        let delta = delta[start + r];
                        for (grad, p) in grad_scores.iter_mut().zip(probs) {
                            *grad = p * (*grad - delta) * mask.scale;
                        }
                    }
                    let grad_scores = Matrix::row_major(grad_scores, rows, width);
                    matmul_into(
                        &mut grad_q[start * dim..(start + rows) * dim],
                        grad_scores,
                        keys.rows(seen.start, width),
                        false,
                    );
                    matmul_into(
                        &mut grad_k[kv_rows],
                        grad_scores.t(),
                        queries.rows(start, rows),
                        true,
                    );
                }
            }
        });
    [grad_q, grad_k, grad_v]
}
