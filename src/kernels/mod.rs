//! The operations that decide a training step's memory and time, as backend operations with
//! their own backward: tiled attention ([`Kernels::flash_attention`]) and the fused output projection + cross-entropy
//! ([`Kernels::head_loss`]).
//!
//! Burn's autodiff would keep every intermediate of the plain compositions for backward — the
//! `[batch, heads, seq, seq]` scores and probabilities of every layer, and the `[tokens, vocab]`
//! logits, log-probabilities and their gradient. Here the forward pass works one tile of rows
//! at a time and keeps only what backward needs to recompute a tile (attention: the output and
//! each row's log-sum-exp; the head: each token's log-sum-exp), so those transients are one
//! tile's worth whatever the sequence length.
//!
//! SwiGLU's gating and RMSNorm are single operations that keep only their inputs
//! ([`Kernels::swiglu`], [`Kernels::rms_norm`]); the rotary embedding is one pass
//! ([`Kernels::rotary`]). Every projection is one linear-map node ([`Kernels::linear`]) whose
//! weight gradient can be deferred to zero-bubble's W pass ([`DeferredWeightGrads`]).
//! The optimizers' updates are one operation per parameter tensor ([`Kernels::adamw_step`],
//! [`Kernels::adafactor_step`], [`Kernels::sgd_step`]), CubeCL kernels on the GPU backends
//! (`cube`). On the CPU the matmuls go through the `gemm` crate and AdamW is one parallel
//! pass (`cpu`).
//!
//! [`Kernels`] is the extension point: every backend gets the tiled compositions of tensor
//! operations, and `Autodiff<B>` registers them as single graph nodes whose backward is the
//! tiled backward. A backend with its own fused kernels overrides the `*_forward` and
//! `*_backward` methods.

pub mod attention;
mod autodiff;
mod cpu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod cube;
pub mod head_loss;
pub mod linear;
pub mod norm;
pub mod optimizer;
pub mod reference;
pub mod rotary;
pub mod swiglu;

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::model::layers::in_dtype;

pub use attention::{AttentionForward, AttentionGrads, AttentionSpec};
pub use head_loss::{HeadLossForward, HeadLossGrads, LossTargets};
pub use linear::{DeferredWeightGrads, LinearWeightGrad};
pub use optimizer::{AdafactorStep, AdamWResult, AdamWStep, SecondMoment, SgdStep};

/// A backend that runs pp's model: tensor operations plus the kernels above.
pub trait Kernels: Backend {
    /// Softmax attention of queries `[batch, heads, seq, dim]` over keys and values
    /// `[batch, kv_heads, seq, dim]` (grouped-query attention: `heads / kv_heads` consecutive
    /// query heads share one key/value head), masked as `spec` says.
    fn flash_attention(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        spec: &AttentionSpec<Self>,
    ) -> Tensor<Self, 4> {
        Self::flash_attention_forward(q, k, v, spec).output
    }

    /// The attention output and each query row's log-sum-exp, a tile of queries at a time.
    fn flash_attention_forward(
        q: Tensor<Self, 4>,
        k: Tensor<Self, 4>,
        v: Tensor<Self, 4>,
        spec: &AttentionSpec<Self>,
    ) -> AttentionForward<Self> {
        attention::forward(q, k, v, spec)
    }

    /// Gradients of queries, keys and values, recomputing each tile's probabilities from the
    /// saved log-sum-exp.
    fn flash_attention_backward(
        saved: AttentionSaved<Self>,
        grad_output: Tensor<Self, 4>,
        spec: &AttentionSpec<Self>,
    ) -> AttentionGrads<Self> {
        attention::backward(saved, grad_output, spec)
    }

    /// Summed cross-entropy `[1]` of the logits `hidden · weightᵀ` (`hidden` `[tokens, dim]`,
    /// `weight` `[vocab, dim]`) against `targets`, without a whole logits tensor.
    fn head_loss(
        hidden: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        targets: &LossTargets<Self>,
    ) -> Tensor<Self, 1> {
        Self::head_loss_forward(hidden, weight, targets).loss
    }

    /// The summed loss and each token's log-sum-exp, a chunk of tokens at a time.
    fn head_loss_forward(
        hidden: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        targets: &LossTargets<Self>,
    ) -> HeadLossForward<Self> {
        head_loss::forward(hidden, weight, targets)
    }

    /// Gradients of `hidden` and `weight` for an upstream gradient `grad_loss` `[1]`,
    /// recomputing each chunk's logits.
    fn head_loss_backward(
        saved: HeadLossSaved<Self>,
        grad_loss: Tensor<Self, 1>,
        targets: &LossTargets<Self>,
    ) -> HeadLossGrads<Self> {
        head_loss::backward(saved, grad_loss, targets)
    }

    /// The linear map `x · weightᵀ` of `x` `[tokens, in]` by `weight` `[out, in]`, computed in
    /// `x`'s dtype whatever the weight's (float32 master weights under bf16 compute).
    fn linear(x: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let weight = in_dtype(weight, x.dtype());
        linear::forward(x, weight)
    }

    /// The gradient of the linear map's input for `grad` `[tokens, out]` of its output, with
    /// `weight` in `grad`'s dtype.
    fn linear_backward_input(grad: Tensor<Self, 2>, weight: Tensor<Self, 2>) -> Tensor<Self, 2> {
        linear::backward_input(grad, weight)
    }

    /// The gradient `[out, in]` of the linear map's weight, from its input and `grad` of its
    /// output.
    fn linear_backward_weight(x: Tensor<Self, 2>, grad: Tensor<Self, 2>) -> Tensor<Self, 2> {
        linear::backward_weight(x, grad)
    }

    /// `lhs · rhs` over the last two dimensions of `[batch, heads, m, k]` and
    /// `[batch, heads, k, n]`: attention's tiles.
    fn batched_matmul(lhs: Tensor<Self, 4>, rhs: Tensor<Self, 4>) -> Tensor<Self, 4> {
        lhs.matmul(rhs)
    }

    /// SwiGLU's gating `silu(gate) · up` of `[batch, seq, intermediate]` tensors.
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        swiglu::forward(gate, up)
    }

    /// Gradients `[d gate, d up]` of the gating for `grad` of its output.
    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        grad: Tensor<Self, 3>,
    ) -> [Tensor<Self, 3>; 2] {
        swiglu::backward(gate, up, grad)
    }

    /// RMSNorm of `x` `[batch, seq, hidden]` with the learned scale `weight` `[hidden]`.
    fn rms_norm(x: Tensor<Self, 3>, weight: Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        norm::forward(x, weight, eps)
    }

    /// Gradients `(d x, d weight)` of RMSNorm for `grad` of its output.
    fn rms_norm_backward(
        x: Tensor<Self, 3>,
        weight: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 1>) {
        norm::backward(x, weight, eps, grad)
    }

    /// Rotary position embedding of `x` `[batch, heads, seq, head_dim]` by the tables `cos`
    /// and `sin` `[batch, 1, seq, head_dim]`. Its backward is itself with `−sin`.
    fn rotary(x: Tensor<Self, 4>, cos: Tensor<Self, 4>, sin: Tensor<Self, 4>) -> Tensor<Self, 4> {
        rotary::forward(x, cos, sin)
    }

    /// One AdamW update of `param` `[rows, cols]` with `grad` and the moments `m`, `v`:
    /// `[param, m, v]` after the step.
    fn adamw_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        m: Tensor<Self, 2>,
        v: Tensor<Self, 2>,
        step: &AdamWStep,
    ) -> AdamWResult<Self> {
        optimizer::adamw_composed(param, grad, m, v, step)
    }

    /// One Adafactor update of `param` `[rows, cols]` with `grad`: the parameter and the
    /// second moment after the step.
    fn adafactor_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        moment: SecondMoment<Self>,
        step: &AdafactorStep,
    ) -> (Tensor<Self, 2>, SecondMoment<Self>) {
        optimizer::adafactor_composed(param, grad, moment, step)
    }

    /// One SGD update of `param` with `grad` and the momentum `buffer` (none before the first
    /// step, and none without momentum): the parameter and the buffer after the step.
    fn sgd_step(
        param: Tensor<Self, 2>,
        grad: Tensor<Self, 2>,
        buffer: Option<Tensor<Self, 2>>,
        step: &SgdStep,
    ) -> (Tensor<Self, 2>, Option<Tensor<Self, 2>>) {
        optimizer::sgd_composed(param, grad, buffer, step)
    }
}

/// What attention's backward needs from its forward.
pub use attention::Saved as AttentionSaved;
/// What the head loss's backward needs from its forward.
pub use head_loss::Saved as HeadLossSaved;

/// A backend that trains pp's model: autodiff over a backend with the kernels.
pub trait TrainBackend: AutodiffBackend<InnerBackend: Kernels> + Kernels {
    /// The graph node of `t`: how a deferred weight gradient ([`LinearWeightGrad`]) finds
    /// its parameter.
    fn node_id<const D: usize>(t: &Tensor<Self, D>) -> NodeId;
}

impl<B: Kernels, C: CheckpointStrategy> TrainBackend for Autodiff<B, C> {
    fn node_id<const D: usize>(t: &Tensor<Self, D>) -> NodeId {
        t.clone().into_primitive().tensor().node.id
    }
}

/// Burn's other CPU backend, compared with ndarray in `benches/cpu_backends.rs`.
#[cfg(feature = "flex")]
impl Kernels for burn::backend::Flex {}

/// Rows per tile so that a tile of `columns`-wide float32 scores over `parallel` independent
/// rows (batch × heads) stays near [`TILE_ELEMENTS`]; at least one row, at most `rows`.
pub(crate) fn tile_rows(rows: usize, columns: usize, parallel: usize) -> usize {
    (TILE_ELEMENTS / (columns * parallel).max(1)).clamp(1, rows.max(1))
}

/// Float32 elements of one attention tile's scores for `batch` rows of `seq` tokens.
pub fn attention_tile_elements(batch: usize, heads: usize, seq: usize) -> usize {
    batch * heads * seq * tile_rows(seq, seq, batch * heads)
}

/// Float32 elements of the head loss's largest chunk of logits for `tokens` tokens.
pub fn head_tile_elements(tokens: usize, vocab: usize) -> usize {
    (tile_rows(tokens, vocab, 1) * vocab).max(tile_rows(vocab, tokens, 1) * tokens)
}

/// The size of one tile's float32 transient: 2²⁴ elements (64 MiB), large enough that each
/// tile's matmuls fill a GPU, small next to the `[seq, seq]` or `[tokens, vocab]` whole.
pub const TILE_ELEMENTS: usize = 1 << 24;
