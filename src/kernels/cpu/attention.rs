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

/// Query rows per tile at most (a spec may ask for fewer).
const TILE: usize = 64;

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub dim: usize,
    /// Query rows per tile.
    pub tile: usize,
}

impl Shape {
    /// From the dims of the queries and the keys, and the spec's tile.
    pub fn of([batch, heads, seq, dim]: [usize; 4], k: [usize; 4], tile: usize) -> Self {
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
            tile: tile.clamp(1, TILE),
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
        let (seq, tile) = (self.seq, self.tile);
        (0..seq)
            .step_by(tile)
            .map(move |start| (start, tile.min(seq - start)))
    }
}

/// Which keys each query sees (as `AttentionSpec::blocked`): with documents packed as
/// contiguous runs, as the batcher packs them, a query sees the keys from the start of its
/// document's run (or of its window) up to itself, a range.
pub struct Mask {
    /// `[batch, seq]`: the first key each query sees.
    first_key: Vec<usize>,
    seq: usize,
    scale: f32,
}

impl Mask {
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

    /// Query `query`'s visible keys within a tile's `keys`, counted from the tile's first.
    fn visible_in(&self, row: usize, query: usize, keys: &Range<usize>) -> Range<usize> {
        let visible = self.visible(row, query);
        visible.start - keys.start..visible.end - keys.start
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
            let mut scores = vec![0.0f32; shape.tile * shape.seq];
            for group in 0..groups {
                let queries =
                    Matrix::row_major(&q[(task * groups + group) * head..], shape.seq, shape.dim);
                let output = &mut output[group * head..][..head];
                let log_sum_exp = &mut log_sum_exp[group * shape.seq..][..shape.seq];
                for (start, rows) in shape.tiles() {
                    let seen = mask.keys(row, start..start + rows);
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
                        let visible = mask.visible_in(row, query, &seen);
                        log_sum_exp[query] = softmax(scores, visible, mask.scale);
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

/// One row of raw scores in place to probabilities: scaled and normalised over the `visible`
/// keys, exactly 0 elsewhere. Returns the row's log-sum-exp.
fn softmax(scores: &mut [f32], visible: Range<usize>, scale: f32) -> f32 {
    let row = masked(scores, visible);
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

/// `scores` zeroed outside `visible`; the `visible` part.
fn masked(scores: &mut [f32], visible: Range<usize>) -> &mut [f32] {
    let (before, rest) = scores.split_at_mut(visible.start);
    let (row, after) = rest.split_at_mut(visible.len());
    before.fill(0.0);
    after.fill(0.0);
    row
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
            let mut probs = vec![0.0f32; shape.tile * seq];
            let mut grad_scores = vec![0.0f32; shape.tile * seq];
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
                    let seen = mask.keys(row, start..start + rows);
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
                        let visible = mask.visible_in(row, query, &seen);
                        for score in masked(scores, visible) {
                            *score = (*score * mask.scale - log_sum_exp[query]).exp();
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
