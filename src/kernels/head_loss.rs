//! The output projection and cross-entropy fused over chunks of tokens: each chunk's logits
//! `[rows, vocab]` exist only while that chunk is scored (forward) or differentiated
//! (backward), so no `[tokens, vocab]` tensor is ever made. The loss follows Hugging Face: the
//! logits are scored in float32, ignored positions weigh 0, the sum is returned (divide by the
//! scored count for the token-weighted mean).

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

use crate::model::layers::in_dtype;

/// Each token's target and weight on the device, and the chunk size.
#[derive(Debug, Clone)]
pub struct LossTargets<B: Backend> {
    /// `[tokens, 1]` target ids (any id where the weight is 0).
    ids: Tensor<B, 2, Int>,
    /// `[tokens, 1]` float32: 1 where the token is scored, 0 where ignored.
    weights: Tensor<B, 2>,
    /// Tokens per chunk.
    chunk: usize,
}

impl<A: AutodiffBackend> LossTargets<A> {
    /// The same targets on the backend under autodiff.
    pub fn to_inner(&self) -> LossTargets<A::InnerBackend> {
        LossTargets {
            ids: self.ids.clone().inner(),
            weights: self.weights.clone().inner(),
            chunk: self.chunk,
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
            chunk: super::tile_rows(tokens, vocab, 1),
        }
    }

    /// The same targets with `chunk` tokens per chunk (tests use small chunks to cover tails).
    pub fn with_chunk(self, chunk: usize) -> Self {
        Self {
            chunk: chunk.max(1),
            ..self
        }
    }

    /// The same targets on the autodiff backend over `B`.
    pub fn to_autodiff<A: AutodiffBackend<InnerBackend = B>>(&self) -> LossTargets<A> {
        LossTargets {
            ids: Tensor::from_inner(self.ids.clone()),
            weights: Tensor::from_inner(self.weights.clone()),
            chunk: self.chunk,
        }
    }

    /// The chunks: `(first token, tokens)`.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let tokens = self.ids.dims()[0];
        (0..tokens)
            .step_by(self.chunk)
            .map(move |start| (start, self.chunk.min(tokens - start)))
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

/// One chunk's float32 logits `[rows, vocab]`.
fn chunk_logits<B: Backend>(
    hidden: &Tensor<B, 2>,
    weight_transposed: &Tensor<B, 2>,
    start: usize,
    rows: usize,
) -> Tensor<B, 2> {
    let hidden = hidden.clone().narrow(0, start, rows);
    in_dtype(hidden.matmul(weight_transposed.clone()), DType::F32)
}

/// The chunked forward pass: `Σ weight·(logsumexp(logits) − logits[target])`.
pub fn forward<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: &LossTargets<B>,
) -> HeadLossForward<B> {
    let weight_transposed = weight.transpose();
    let mut loss = Tensor::<B, 1>::zeros([1], &hidden.device());
    let mut sums = Vec::new();
    for (start, rows) in targets.chunks() {
        let logits = chunk_logits(&hidden, &weight_transposed, start, rows);
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

/// The chunked backward pass: per chunk, `dlogits = g·w·(softmax − onehot(target))`, then
/// `dhidden = dlogits·W` and `dW += dlogitsᵀ·hidden`.
pub fn backward<B: Backend>(
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
    let weight_transposed = weight.clone().transpose();
    let mut grad_weight = Tensor::<B, 2>::zeros(weight.dims(), &weight.device());
    let mut grad_hidden = Vec::new();
    let grad_loss = in_dtype(grad_loss, DType::F32).reshape([1, 1]);
    for (start, rows) in targets.chunks() {
        let logits = chunk_logits(&hidden, &weight_transposed, start, rows);
        let probs = (logits - log_sum_exp.clone().narrow(0, start, rows)).exp();
        let scale = targets.weights(start, rows) * grad_loss.clone();
        let grad_logits = (probs * scale.clone()).scatter(
            1,
            targets.ids(start, rows),
            scale.neg(),
            IndexingUpdateOp::Add,
        );
        let grad_logits = in_dtype(grad_logits, hidden_dtype);
        grad_hidden.push(grad_logits.clone().matmul(weight.clone()));
        let hidden_chunk = hidden.clone().narrow(0, start, rows);
        grad_weight = grad_weight
            + in_dtype(grad_logits.transpose().matmul(hidden_chunk), DType::F32);
    }
    HeadLossGrads {
        hidden: Tensor::cat(grad_hidden, 0),
        weight: in_dtype(grad_weight, weight_dtype),
    }
}
