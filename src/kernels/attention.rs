//! Tiled softmax attention (FlashAttention-2's algorithm over tiles of query rows): the forward
//! pass keeps the output and each row's log-sum-exp; the backward pass recomputes each tile's
//! probabilities from them. Grouped-query attention views a tile's `groups` query heads as
//! extra rows of their key/value head, so keys and values are never repeated.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, DType, Int, Tensor};

use super::Kernels;
use crate::model::layers::in_dtype;

/// Put in place of masked scores (in float32): far below any real score, yet finite, so a
/// masked probability is exactly zero.
pub const MASKED_SCORE: f32 = -1.0e9;

/// Which keys each query may see, the score scale, and the tile size.
#[derive(Debug, Clone)]
pub struct AttentionSpec<B: Backend> {
    /// `[batch, seq]` document id of every token: a query sees earlier keys of its own
    /// document only (packed rows keep their documents apart).
    documents: Tensor<B, 2, Int>,
    /// Mistral's sliding window: a query sees itself and the `window - 1` keys before it.
    window: Option<usize>,
    /// Multiplies the scores (`1/√head_dim`).
    scale: f64,
    /// Query rows per tile.
    tile: usize,
}

impl<A: AutodiffBackend> AttentionSpec<A> {
    /// The same spec on the backend under autodiff.
    pub fn to_inner(&self) -> AttentionSpec<A::InnerBackend> {
        AttentionSpec {
            documents: self.documents.clone().inner(),
            window: self.window,
            scale: self.scale,
            tile: self.tile,
        }
    }
}

impl<B: Backend> AttentionSpec<B> {
    /// A causal mask per document (and window), with a tile sized for `heads` query heads.
    pub fn new(
        documents: Tensor<B, 2, Int>,
        window: Option<usize>,
        scale: f64,
        heads: usize,
    ) -> Self {
        let [batch, seq] = documents.dims();
        let tile = super::tile_rows(seq, seq, batch * heads);
        Self {
            documents,
            window,
            scale,
            tile,
        }
    }

    /// The same mask with `tile` query rows per tile (tests use small tiles to cover tails).
    pub fn with_tile(self, tile: usize) -> Self {
        Self {
            tile: tile.max(1),
            ..self
        }
    }

    /// The same spec on the autodiff backend over `B`.
    pub fn to_autodiff<A: AutodiffBackend<InnerBackend = B>>(&self) -> AttentionSpec<A> {
        AttentionSpec {
            documents: Tensor::from_inner(self.documents.clone()),
            window: self.window,
            scale: self.scale,
            tile: self.tile,
        }
    }

    /// `[batch, seq]` document ids.
    pub(super) fn documents(&self) -> &Tensor<B, 2, Int> {
        &self.documents
    }

    pub(super) fn window(&self) -> Option<usize> {
        self.window
    }

    pub(super) fn scale(&self) -> f64 {
        self.scale
    }

    /// Query rows per tile.
    pub(super) fn tile(&self) -> usize {
        self.tile
    }

    /// The query tiles: `(first row, rows)`.
    fn tiles(&self, seq: usize) -> impl Iterator<Item = (usize, usize)> {
        tiles(seq, self.tile)
    }

    /// `[batch, 1, 1, rows, seq]`, true where query `start + r` may not see key `k`.
    pub fn blocked(&self, start: usize, rows: usize) -> Tensor<B, 5, Bool> {
        let [batch, seq] = self.documents.dims();
        let device = self.documents.device();
        let index = |range: std::ops::Range<usize>| {
            Tensor::<B, 1, Int>::arange(range.start as i64..range.end as i64, &device)
        };
        let query = index(start..start + rows)
            .reshape([rows, 1])
            .expand([rows, seq]);
        let key = index(0..seq).reshape([1, seq]).expand([rows, seq]);
        let mut blocked = key.clone().greater(query.clone());
        if let Some(window) = self.window {
            blocked = blocked.bool_or((query - key).greater_equal_elem(window as i64));
        }
        let own_document = self
            .documents
            .clone()
            .narrow(1, start, rows)
            .reshape([batch, rows, 1])
            .expand([batch, rows, seq]);
        let key_document = self
            .documents
            .clone()
            .reshape([batch, 1, seq])
            .expand([batch, rows, seq]);
        blocked
            .unsqueeze::<3>()
            .expand([batch, rows, seq])
            .bool_or(own_document.not_equal(key_document))
            .reshape([batch, 1, 1, rows, seq])
    }
}

/// Tiles of `tile` rows over `0..seq`: `(first row, rows)`.
pub(super) fn tiles(seq: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..seq)
        .step_by(tile)
        .map(move |start| (start, tile.min(seq - start)))
}

/// The attention output and what backward needs.
#[derive(Debug, Clone)]
pub struct AttentionForward<B: Backend> {
    /// `[batch, heads, seq, dim]`, in the inputs' dtype.
    pub output: Tensor<B, 4>,
    /// `[batch, heads, seq, 1]` float32: each query row's log-sum-exp of its scores.
    pub log_sum_exp: Tensor<B, 4>,
}

/// The forward pass's inputs and results that its backward reuses.
#[derive(Debug, Clone)]
pub struct Saved<B: Backend> {
    /// Queries `[batch, heads, seq, dim]`.
    pub q: Tensor<B, 4>,
    /// Keys `[batch, kv_heads, seq, dim]`.
    pub k: Tensor<B, 4>,
    /// Values `[batch, kv_heads, seq, dim]`.
    pub v: Tensor<B, 4>,
    /// The forward results.
    pub forward: AttentionForward<B>,
}

/// Gradients of the queries, keys and values, in their dtypes.
#[derive(Debug)]
pub struct AttentionGrads<B: Backend> {
    /// `[batch, heads, seq, dim]`.
    pub q: Tensor<B, 4>,
    /// `[batch, kv_heads, seq, dim]`.
    pub k: Tensor<B, 4>,
    /// `[batch, kv_heads, seq, dim]`.
    pub v: Tensor<B, 4>,
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub dim: usize,
}

impl Shape {
    fn of<B: Backend>(q: &Tensor<B, 4>, k: &Tensor<B, 4>) -> Self {
        Self::from_dims(q.dims(), k.dims())
    }

    /// From the dims of the queries and the keys.
    pub(super) fn from_dims([batch, heads, seq, dim]: [usize; 4], k: [usize; 4]) -> Self {
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

    pub(super) fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Rows `start..start + rows` of `[batch, heads, seq, x]` as `[batch, kv_heads, groups *
    /// rows, x]`: each key/value head's query heads stacked as rows.
    fn grouped<B4: Backend>(&self, t: &Tensor<B4, 4>, start: usize, rows: usize) -> Tensor<B4, 4> {
        let last = t.dims()[3];
        t.clone().narrow(2, start, rows).reshape([
            self.batch,
            self.kv_heads,
            self.groups() * rows,
            last,
        ])
    }

    /// `[batch, kv_heads, groups * rows, x]` back to `[batch, heads, rows, x]`.
    fn ungrouped<B4: Backend>(&self, t: Tensor<B4, 4>, rows: usize) -> Tensor<B4, 4> {
        let last = t.dims()[3];
        t.reshape([self.batch, self.heads, rows, last])
    }

    /// `[batch, kv_heads, groups * rows, seq]` as `[batch, kv_heads, groups, rows, seq]`.
    fn split_groups<B4: Backend>(&self, t: Tensor<B4, 4>, rows: usize) -> Tensor<B4, 5> {
        t.reshape([self.batch, self.kv_heads, self.groups(), rows, self.seq])
    }

    fn merge_groups<B4: Backend>(&self, t: Tensor<B4, 5>, rows: usize) -> Tensor<B4, 4> {
        t.reshape([self.batch, self.kv_heads, self.groups() * rows, self.seq])
    }
}

/// One tile's masked float32 scores `[batch, kv_heads, groups, rows, seq]`.
fn tile_scores<B: Kernels>(
    shape: &Shape,
    spec: &AttentionSpec<B>,
    q_tile: Tensor<B, 4>,
    k_transposed: Tensor<B, 4>,
    start: usize,
    rows: usize,
) -> Tensor<B, 5> {
    let scores = in_dtype(
        B::batched_matmul(q_tile, k_transposed) * spec.scale,
        DType::F32,
    );
    let scores = shape.split_groups(scores, rows);
    let dims = scores.dims();
    scores.mask_fill(spec.blocked(start, rows).expand(dims), MASKED_SCORE)
}

/// The tiled forward pass.
pub fn forward<B: Kernels>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    spec: &AttentionSpec<B>,
) -> AttentionForward<B> {
    let shape = Shape::of(&q, &k);
    let dtype = q.dtype();
    let k_transposed = k.swap_dims(2, 3);
    let (mut outputs, mut sums) = (Vec::new(), Vec::new());
    for (start, rows) in spec.tiles(shape.seq) {
        let scores = tile_scores(
            &shape,
            spec,
            shape.grouped(&q, start, rows),
            k_transposed.clone(),
            start,
            rows,
        );
        let max = scores.clone().max_dim(4);
        let exp = (scores - max.clone()).exp();
        let total = exp.clone().sum_dim(4);
        let probs = in_dtype(shape.merge_groups(exp / total.clone(), rows), dtype);
        outputs.push(shape.ungrouped(B::batched_matmul(probs, v.clone()), rows));
        sums.push(shape.ungrouped(
            (max + total.log()).reshape([shape.batch, shape.kv_heads, shape.groups() * rows, 1]),
            rows,
        ));
    }
    AttentionForward {
        output: Tensor::cat(outputs, 2),
        log_sum_exp: Tensor::cat(sums, 2),
    }
}

/// The tiled backward pass (FlashAttention-2's, over query tiles): per tile, probabilities
/// from the saved log-sum-exp, then `dV += Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − rowsum(dO ∘ O))`,
/// `dQ = scale·dS·K`, `dK += scale·dSᵀ·Q`.
pub fn backward<B: Kernels>(
    saved: Saved<B>,
    grad_output: Tensor<B, 4>,
    spec: &AttentionSpec<B>,
) -> AttentionGrads<B> {
    let Saved { q, k, v, forward } = saved;
    let shape = Shape::of(&q, &k);
    let (dtype, kv_dtype) = (q.dtype(), k.dtype());
    let grad_output = in_dtype(grad_output, dtype);
    // rowsum(dO ∘ O) `[batch, heads, seq, 1]`, float32.
    let delta = (in_dtype(grad_output.clone(), DType::F32) * in_dtype(forward.output, DType::F32))
        .sum_dim(3);
    let k_transposed = k.clone().swap_dims(2, 3);
    let v_transposed = v.clone().swap_dims(2, 3);
    let device = q.device();
    let kv_dims = [shape.batch, shape.kv_heads, shape.seq, shape.dim];
    let mut grad_k = Tensor::<B, 4>::zeros(kv_dims, &device);
    let mut grad_v = Tensor::<B, 4>::zeros(kv_dims, &device);
    let mut grad_q = Vec::new();
    for (start, rows) in spec.tiles(shape.seq) {
        let q_tile = shape.grouped(&q, start, rows);
        let grad_tile = shape.grouped(&grad_output, start, rows);
        let scores = tile_scores(
            &shape,
            spec,
            q_tile.clone(),
            k_transposed.clone(),
            start,
            rows,
        );
        let probs = (scores - split_last(&shape, &forward.log_sum_exp, start, rows)).exp();
        let probs_c = in_dtype(shape.merge_groups(probs.clone(), rows), dtype);
        grad_v = grad_v
            + in_dtype(
                B::batched_matmul(probs_c.swap_dims(2, 3), grad_tile.clone()),
                DType::F32,
            );
        let grad_probs = shape.split_groups(
            in_dtype(
                B::batched_matmul(grad_tile, v_transposed.clone()),
                DType::F32,
            ),
            rows,
        );
        let grad_scores = probs * (grad_probs - split_last(&shape, &delta, start, rows));
        let grad_scores = in_dtype(shape.merge_groups(grad_scores, rows) * spec.scale, dtype);
        grad_q.push(shape.ungrouped(B::batched_matmul(grad_scores.clone(), k.clone()), rows));
        let grad_k_tile = B::batched_matmul(grad_scores.swap_dims(2, 3), q_tile);
        grad_k = grad_k + in_dtype(grad_k_tile, DType::F32);
    }
    AttentionGrads {
        q: Tensor::cat(grad_q, 2),
        k: in_dtype(grad_k, kv_dtype),
        v: in_dtype(grad_v, kv_dtype),
    }
}

/// Rows `start..start + rows` of a per-row `[batch, heads, seq, 1]` tensor as `[batch,
/// kv_heads, groups, rows, 1]`, to broadcast over a tile's scores.
fn split_last<B: Backend>(
    shape: &Shape,
    t: &Tensor<B, 4>,
    start: usize,
    rows: usize,
) -> Tensor<B, 5> {
    t.clone()
        .narrow(2, start, rows)
        .reshape([shape.batch, shape.kv_heads, shape.groups(), rows, 1])
}
