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
use crate::kernels::attention::{tiles, Shape};
use crate::kernels::AttentionSpec;

/// Query rows per tile at most (a spec may ask for fewer).
const TILE: usize = 64;

/// An [`AttentionSpec`] as the CPU kernels read it. Which keys each query sees (as
/// `AttentionSpec::blocked`): with documents packed as contiguous runs, as the batcher packs
/// them, a query sees the keys from the start of its document's run (or of its window) up to
/// itself, a range.
pub struct Spec {
    /// `[batch, seq]`: the first key each query sees.
    first_key: Vec<usize>,
    seq: usize,
    scale: f32,
    /// Query rows per tile.
    tile: usize,
}

impl Spec {
    /// `None` when a document id comes back after another's run: then the keys a query sees
    /// are no range, and the composition masks them.
    pub fn of(spec: &AttentionSpec<Cpu>) -> Option<Self> {
        let documents = spec.documents();
        let seq = documents.dims()[1];
        let documents: Vec<i64> = documents
            .clone()
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("document ids are integers");
        let mut first_key = Vec::with_capacity(documents.len());
        for row in documents.chunks(seq.max(1)) {
            let mut ended = std::collections::HashSet::new();
            let mut run_start = 0;
            for (query, id) in row.iter().enumerate() {
                if query > 0 && *id != row[query - 1] {
                    ended.insert(row[query - 1]);
                    if ended.contains(id) {
                        return None;
                    }
                    run_start = query;
                }
                let window_start = spec
                    .window()
                    .map_or(0, |window| (query + 1).saturating_sub(window));
                first_key.push(run_start.max(window_start));
            }
        }
        Some(Self {
            first_key,
            seq,
            scale: spec.scale() as f32,
            tile: spec.tile().clamp(1, TILE),
        })
    }

    /// The keys query `query` of `row` sees.
    fn visible(&self, row: usize, query: usize) -> Range<usize> {
        self.first_key[row * self.seq + query]..query + 1
    }

    /// The keys any of `queries` sees (the first key only grows with the query).
    fn keys(&self, row: usize, queries: Range<usize>) -> Range<usize> {
        self.visible(row, queries.start).start..queries.end
    }

    /// Scores of query rows `start..start + rows` of `row` against the keys they can see
    /// (returned, `seen`), `rows × seen.len()` at the front of `buffer`: `finish` gets each
    /// query and its visible scores, still raw; the others are zeroed.
    fn score_tile<'b>(
        &self,
        buffer: &'b mut [f32],
        queries: Matrix,
        keys: Matrix,
        row: usize,
        (start, rows): (usize, usize),
        mut finish: impl FnMut(usize, &mut [f32]),
    ) -> (Range<usize>, &'b mut [f32]) {
        let seen = self.keys(row, start..start + rows);
        let width = seen.len();
        let scores = &mut buffer[..rows * width];
        matmul_into(
            scores,
            queries.rows(start, rows),
            keys.rows(seen.start, width).t(),
            false,
        );
        for (r, scores) in scores.chunks_mut(width).enumerate() {
            let query = start + r;
            let visible = self.visible(row, query);
            let (before, rest) = scores.split_at_mut(visible.start - seen.start);
            let (visible_scores, after) = rest.split_at_mut(visible.len());
            before.fill(0.0);
            after.fill(0.0);
            finish(query, visible_scores);
        }
        (seen, scores)
    }
}

/// The output `[batch, heads, seq, dim]` and each query row's log-sum-exp `[batch, heads,
/// seq]` of float32 `q`, `k`, `v` in row-major order.
pub fn forward(shape: Shape, spec: &Spec, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (groups, seq, dim) = (shape.groups(), shape.seq, shape.dim);
    let head = seq * dim;
    let mut output = vec![0.0; shape.batch * shape.heads * head];
    let mut log_sum_exp = vec![0.0; shape.batch * shape.heads * seq];
    // Task (row, kv head) owns the outputs of its `groups` query heads, which lie together.
    output
        .par_chunks_mut(groups * head)
        .zip(log_sum_exp.par_chunks_mut(groups * seq))
        .enumerate()
        .for_each(|(task, (output, log_sum_exp))| {
            let row = task / shape.kv_heads;
            let keys = Matrix::row_major(&k[task * head..], seq, dim);
            let values = Matrix::row_major(&v[task * head..], seq, dim);
            let mut buffer = vec![0.0f32; spec.tile * seq];
            for group in 0..groups {
                let queries = Matrix::row_major(&q[(task * groups + group) * head..], seq, dim);
                let output = &mut output[group * head..][..head];
                let log_sum_exp = &mut log_sum_exp[group * seq..][..seq];
                for (start, rows) in tiles(seq, spec.tile) {
                    let (seen, probs) =
                        spec.score_tile(&mut buffer, queries, keys, row, (start, rows), {
                            |query, scores| log_sum_exp[query] = softmax(scores, spec.scale)
                        });
                    matmul_into(
                        &mut output[start * dim..(start + rows) * dim],
                        Matrix::row_major(probs, rows, seen.len()),
                        values.rows(seen.start, seen.len()),
                        false,
                    );
                }
            }
        });
    (output, log_sum_exp)
}

/// One row's visible raw scores in place to probabilities: scaled and normalised. Returns the
/// row's log-sum-exp.
fn softmax(row: &mut [f32], scale: f32) -> f32 {
    row.iter_mut().for_each(|score| *score *= scale);
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut total = 0.0f32;
    for score in row.iter_mut() {
        *score = (*score - max).exp();
        total += *score;
    }
    row.iter_mut().for_each(|score| *score /= total);
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
pub fn backward(shape: Shape, spec: &Spec, saved: &Saved, grad_output: &[f32]) -> [Vec<f32>; 3] {
    let (groups, seq, dim) = (shape.groups(), shape.seq, shape.dim);
    let head = seq * dim;
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
            let mut buffer = vec![0.0f32; spec.tile * seq];
            let mut grad_scores = vec![0.0f32; spec.tile * seq];
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
                for (start, rows) in tiles(seq, spec.tile) {
                    let (seen, probs) =
                        spec.score_tile(&mut buffer, queries, keys, row, (start, rows), {
                            |query, scores| {
                                for score in scores {
                                    *score = (*score * spec.scale - log_sum_exp[query]).exp();
                                }
                            }
                        });
                    let (probs, width) = (&*probs, seen.len());
                    let grad_scores = &mut grad_scores[..rows * width];
                    let grad_out_tile = grad_out.rows(start, rows);
                    let kv_rows = seen.start * dim..seen.end * dim;
                    matmul_into(
                        &mut grad_v[kv_rows.clone()],
                        Matrix::row_major(probs, rows, width).t(),
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
                            *grad = p * (*grad - delta) * spec.scale;
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
