//! The plain compositions the kernels replace, as autodiff records them: the whole score matrix
//! with repeated keys and values, and whole logits. Tests check the kernels against these and
//! benchmarks measure what the kernels save.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor};

use super::attention::MASKED_SCORE;
use crate::model::loss::{cross_entropy_sum, Targets};

/// Softmax attention of `q` `[batch, heads, seq, dim]` over `k`, `v` `[batch, kv_heads, seq,
/// dim]`, with `blocked` `[batch, 1, seq, seq]` true where a query may not see a key.
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    blocked: Tensor<B, 4, Bool>,
    scale: f64,
) -> Tensor<B, 4> {
    let [batch, heads, seq, dim] = q.dims();
    let kv_heads = k.dims()[1];
    let groups = heads / kv_heads;
    let repeat = |t: Tensor<B, 4>| {
        t.reshape([batch, kv_heads, 1, seq, dim])
            .repeat_dim(2, groups)
            .reshape([batch, heads, seq, dim])
    };
    let scores = q.matmul(repeat(k).swap_dims(2, 3)) * scale;
    let blocked = blocked.expand([batch, heads, seq, seq]);
    softmax(scores.mask_fill(blocked, MASKED_SCORE), 3).matmul(repeat(v))
}

/// Summed cross-entropy `[1]` of the logits `hidden · weightᵀ` for `[batch, seq]` tokens.
pub fn head_loss<B: Backend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: &Targets,
    batch: usize,
    seq: usize,
) -> Tensor<B, 1> {
    let vocab = weight.dims()[0];
    let logits = hidden
        .matmul(weight.transpose())
        .reshape([batch, seq, vocab]);
    cross_entropy_sum(logits, targets)
}
