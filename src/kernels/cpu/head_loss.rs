//! The fused output projection and cross-entropy on the CPU (as `kernels::head_loss`): the
//! forward pass scores chunks of tokens in parallel, the backward pass chunks of the
//! vocabulary, and each chunk's logits go through one pass per row (log-sum-exp and target
//! in the forward; softmax minus the one-hot target, scaled, in the backward) where the
//! composition runs a pass per step.

use rayon::prelude::*;

use super::matmul::{matmul_into, Matrix};

/// Float32 elements of one chunk's logits: a few per core stay in its cache.
const CHUNK_ELEMENTS: usize = 1 << 18;

/// What both passes read: `hidden` `[tokens, dim]`, `weight` `[vocab, dim]`, and each token's
/// target id and weight.
pub struct Problem<'a> {
    pub hidden: &'a [f32],
    pub weight: &'a [f32],
    pub ids: &'a [i64],
    pub weights: &'a [f32],
    pub dim: usize,
    /// The most tokens (forward) or vocabulary entries (backward) per chunk.
    pub max_chunk: usize,
}

impl Problem<'_> {
    fn tokens(&self) -> usize {
        self.ids.len()
    }

    fn vocab(&self) -> usize {
        self.weight.len() / self.dim.max(1)
    }

    /// Entries per chunk of `span`-wide rows.
    fn chunk(&self, span: usize) -> usize {
        (CHUNK_ELEMENTS / span.max(1)).clamp(1, self.max_chunk)
    }
}

/// The summed loss `Σ weight·(logsumexp(logits) − logits[target])` and each token's
/// log-sum-exp.
pub fn forward(problem: &Problem) -> (f32, Vec<f32>) {
    let (vocab, dim) = (problem.vocab(), problem.dim);
    let hidden = Matrix::row_major(problem.hidden, problem.tokens(), dim);
    let weight = Matrix::row_major(problem.weight, vocab, dim);
    let chunk = problem.chunk(vocab);
    let mut log_sum_exp = vec![0.0f32; problem.tokens()];
    let loss: f64 = log_sum_exp
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(index, log_sum_exp)| {
            let (start, rows) = (index * chunk, log_sum_exp.len());
            let mut logits = vec![0.0f32; rows * vocab];
            matmul_into(&mut logits, hidden.rows(start, rows), weight.t(), false);
            let mut loss = 0.0f64;
            for (r, logits) in logits.chunks(vocab).enumerate() {
                let token = start + r;
                let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let total: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
                log_sum_exp[r] = max + total.ln();
                if problem.weights[token] != 0.0 {
                    let picked = logits[problem.ids[token] as usize];
                    loss += f64::from((log_sum_exp[r] - picked) * problem.weights[token]);
                }
            }
            loss
        })
        .sum();
    (loss as f32, log_sum_exp)
}

/// Gradients `(d hidden, d weight)` for `grad_loss` of the summed loss:
/// `dlogits = g·w·(softmax − onehot(target))` a chunk of the vocabulary at a time, then
/// `dW[chunk] = dlogitsᵀ·hidden` and `dhidden += dlogits·W[chunk]` (one sum per worker).
pub fn backward(problem: &Problem, log_sum_exp: &[f32], grad_loss: f32) -> (Vec<f32>, Vec<f32>) {
    let (tokens, vocab, dim) = (problem.tokens(), problem.vocab(), problem.dim);
    let hidden = Matrix::row_major(problem.hidden, tokens, dim);
    let weight = Matrix::row_major(problem.weight, vocab, dim);
    let chunk = problem.chunk(tokens);
    let chunks = vocab.div_ceil(chunk);
    let mut grad_weight = vec![0.0f32; vocab * dim];
    let grad_hidden = grad_weight
        .par_chunks_mut(chunk * dim)
        .enumerate()
        // A few long runs per worker, so that few `[tokens, dim]` sums exist.
        .with_min_len(chunks.div_ceil(rayon::current_num_threads()))
        .fold(
            || vec![0.0f32; tokens * dim],
            |mut grad_hidden, (index, grad_weight)| {
                let (start, columns) = (index * chunk, grad_weight.len() / dim);
                let weight_chunk = weight.rows(start, columns);
                let mut grad_logits = vec![0.0f32; tokens * columns];
                matmul_into(&mut grad_logits, hidden, weight_chunk.t(), false);
                for (token, row) in grad_logits.chunks_mut(columns).enumerate() {
                    let scale = problem.weights[token] * grad_loss;
                    for logit in row.iter_mut() {
                        *logit = (*logit - log_sum_exp[token]).exp() * scale;
                    }
                    let target = problem.ids[token] as usize;
                    if (start..start + columns).contains(&target) {
                        row[target - start] -= scale;
                    }
                }
                let grad_logits = Matrix::row_major(&grad_logits, tokens, columns);
                matmul_into(grad_weight, grad_logits.t(), hidden, false);
                matmul_into(&mut grad_hidden, grad_logits, weight_chunk, true);
                grad_hidden
            },
        )
        .reduce_with(|mut total, part| {
            total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
            total
        })
        .unwrap_or_else(|| vec![0.0; tokens * dim]);
    (grad_hidden, grad_weight)
}
