//! The output projection and cross-entropy fused over chunks of tokens: each chunk's logits
//! `[rows, vocab]` exist only while that chunk is scored (forward) or differentiated
//! (backward), so no `[tokens, vocab]` tensor is ever made. The loss follows Hugging Face: the
//! logits are scored in float32, ignored positions weigh 0, the sum is returned (divide by the
//! scored count for the token-weighted mean).

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::Kernels;
use crate::model::layers::in_dtype;

/// Each token's target and weight on the device, and the chunk sizes.
#[derive(Debug, Clone)]
pub struct LossTargets<B: Backend> {
    /// `[tokens, 1]` target ids (any id where the weight is 0).
    ids: Tensor<B, 2, Int>,
    /// `[tokens, 1]` float32: 1 where the token is scored, 0 where ignored.
    weights: Tensor<B, 2>,
    /// Tokens per chunk of the forward pass (each chunk spans the vocabulary).
    token_chunk: usize,
    /// Vocabulary entries per chunk of the backward pass (each chunk spans the tokens).
    vocab_chunk: usize,
}

impl<A: AutodiffBackend> LossTargets<A> {
    /// The same targets on the backend under autodiff.
    pub fn to_inner(&self) -> LossTargets<A::InnerBackend> {
        LossTargets {
            ids: self.ids.clone().inner(),
            weights: self.weights.clone().inner(),
            token_chunk: self.token_chunk,
            vocab_chunk: self.vocab_chunk,
        }
    }
}

impl<B: Backend> LossTargets<B> {
    /// Targets for `ids` with `weights`, chunked for a vocabulary of `vocab`.
    pub fn new(ids: Vec<i64>, weights: Vec<f32>, vocab: usize, device: &B::Device) -> Self {
        let tokens = ids.len();
        Self {
            ids: Tensor::from_data(TensorData::new(ids, [tokens, 1]), device),
            weights: Tensor::from_data(TensorData::new(weights, [tokens, 1]), device),
            token_chunk: super::tile_rows(tokens, vocab, 1),
            vocab_chunk: super::tile_rows(vocab, tokens, 1),
        }
    }

    /// The same targets with chunks of `chunk` tokens and vocabulary entries (tests use small
    /// chunks to cover tails).
    pub fn with_chunk(self, chunk: usize) -> Self {
        Self {
            token_chunk: chunk.max(1),
            vocab_chunk: chunk.max(1),
            ..self
        }
    }

    /// The same targets on the autodiff backend over `B`.
    pub fn to_autodiff<A: AutodiffBackend<InnerBackend = B>>(&self) -> LossTargets<A> {
        LossTargets {
            ids: Tensor::from_inner(self.ids.clone()),
            weights: Tensor::from_inner(self.weights.clone()),
            token_chunk: self.token_chunk,
            vocab_chunk: self.vocab_chunk,
        }
    }

    /// `[tokens, 1]` target ids.
    pub(super) fn target_ids(&self) -> &Tensor<B, 2, Int> {
        &self.ids
    }

    /// `[tokens, 1]` weights.
    pub(super) fn target_weights(&self) -> &Tensor<B, 2> {
        &self.weights
    }

    /// The most tokens (forward) or vocabulary entries (backward) per chunk.
    pub(super) fn max_chunk(&self) -> usize {
        self.token_chunk.min(self.vocab_chunk)
    }

    /// The forward pass's chunks: `(first token, tokens)`.
    fn token_chunks(&self) -> impl Iterator<Item = (usize, usize)> {
        chunks(self.ids.dims()[0], self.token_chunk)
    }

    fn ids(&self, start: usize, rows: usize) -> Tensor<B, 2, Int> {
        self.ids.clone().narrow(0, start, rows)
    }

    fn weights(&self, start: usize, rows: usize) -> Tensor<B, 2> {
        self.weights.clone().narrow(0, start, rows)
    }
}

/// The summed loss and what backward needs.
#[derive(Debug, Clone)]
pub struct HeadLossForward<B: Backend> {
    /// `[1]` float32.
    pub loss: Tensor<B, 1>,
    /// `[tokens, 1]` float32: each token's log-sum-exp over the vocabulary.
    pub log_sum_exp: Tensor<B, 2>,
}

/// The forward pass's inputs and results that its backward reuses.
#[derive(Debug, Clone)]
pub struct Saved<B: Backend> {
    /// `[tokens, dim]`.
    pub hidden: Tensor<B, 2>,
    /// `[vocab, dim]`.
    pub weight: Tensor<B, 2>,
    /// `[tokens, 1]` float32.
    pub log_sum_exp: Tensor<B, 2>,
}

/// Gradients of the hidden states and the output weight, in their dtypes.
#[derive(Debug)]
pub struct HeadLossGrads<B: Backend> {
    /// `[tokens, dim]`.
    pub hidden: Tensor<B, 2>,
    /// `[vocab, dim]`.
    pub weight: Tensor<B, 2>,
}

/// `(start, size)` of the chunks of `size` that cover `0..total`.
fn chunks(total: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..total)
        .step_by(size)
        .map(move |start| (start, size.min(total - start)))
}

/// The chunked forward pass: `Σ weight·(logsumexp(logits) − logits[target])`.
pub fn forward<B: Kernels>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: &LossTargets<B>,
) -> HeadLossForward<B> {
    let mut loss = Tensor::<B, 1>::zeros([1], &hidden.device());
    let mut sums = Vec::new();
    for (start, rows) in targets.token_chunks() {
        let hidden = hidden.clone().narrow(0, start, rows);
        let logits = in_dtype(<B as Kernels>::linear(hidden, weight.clone()), DType::F32);
        let max = logits.clone().max_dim(1);
        let log_sum_exp = max.clone() + (logits.clone() - max).exp().sum_dim(1).log();
        let picked = logits.gather(1, targets.ids(start, rows));
        loss = loss
            + ((log_sum_exp.clone() - picked) * targets.weights(start, rows))
                .sum()
                .reshape([1]);
        sums.push(log_sum_exp);
    }
    HeadLossForward {
        loss,
        log_sum_exp: Tensor::cat(sums, 0),
    }
}

/// The chunked backward pass, a chunk of the vocabulary at a time so that each chunk of the
/// weight's gradient is made once: `dlogits = g·w·(softmax − onehot(target))` over the chunk's
/// columns, then `dW[chunk] = dlogitsᵀ·hidden` and `dhidden += dlogits·W[chunk]`.
pub fn backward<B: Kernels>(
    saved: Saved<B>,
    grad_loss: Tensor<B, 1>,
    targets: &LossTargets<B>,
) -> HeadLossGrads<B> {
    let Saved {
        hidden,
        weight,
        log_sum_exp,
    } = saved;
    let (hidden_dtype, weight_dtype) = (hidden.dtype(), weight.dtype());
    let vocab = weight.dims()[0];
    let mut grad_hidden = Tensor::<B, 2>::zeros(hidden.dims(), &hidden.device());
    let mut grad_weight = Vec::new();
    // Each token's share of the upstream gradient: g·w, `[tokens, 1]`.
    let scale = targets.weights.clone() * in_dtype(grad_loss, DType::F32).reshape([1, 1]);
    for (start, columns) in chunks(vocab, targets.vocab_chunk) {
        let weight_chunk = weight.clone().narrow(0, start, columns);
        let logits = in_dtype(
            <B as Kernels>::linear(hidden.clone(), weight_chunk.clone()),
            DType::F32,
        );
        let probs = (logits - log_sum_exp.clone()).exp();
        // The target's column within this chunk; tokens whose target lies elsewhere subtract 0.
        let local = targets.ids.clone() - start as i64;
        let outside = local
            .clone()
            .lower_elem(0)
            .bool_or(local.clone().greater_equal_elem(columns as i64));
        let hit = scale.clone().mask_fill(outside, 0.0);
        let grad_logits = (probs * scale.clone()).scatter(
            1,
            local.clamp(0, columns as i64 - 1),
            hit.neg(),
            IndexingUpdateOp::Add,
        );
        let grad_logits = in_dtype(grad_logits, hidden_dtype);
        let grad_input = B::linear_backward_input(grad_logits.clone(), weight_chunk);
        grad_hidden = grad_hidden + in_dtype(grad_input, DType::F32);
        grad_weight.push(in_dtype(
            B::linear_backward_weight(hidden.clone(), grad_logits),
            weight_dtype,
        ));
    }
    HeadLossGrads {
        hidden: in_dtype(grad_hidden, hidden_dtype),
        weight: Tensor::cat(grad_weight, 0),
    }
}
