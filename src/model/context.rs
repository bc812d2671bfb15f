//! What every layer of one forward pass shares: rotary tables for each token's position and
//! the attention mask. Built once per micro-batch from a [`TokenLayout`] and reused by all layers.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::config::ModelConfig;
use super::layers::in_dtype;
use super::rope::RotaryEmbedding;
use crate::kernels::{AttentionSpec, Kernels};

/// Where each token of a `[batch, seq]` block sits: its position id and the document it belongs
/// to. Tokens attend only to earlier tokens of the same document (packing keeps documents apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLayout {
    /// Rows in the block.
    pub batch: usize,
    /// Tokens per row.
    pub seq: usize,
    /// Position id of every token, row-major `[batch, seq]`.
    pub positions: Vec<usize>,
    /// Document id of every token, row-major `[batch, seq]`.
    pub documents: Vec<u32>,
}

impl TokenLayout {
    /// One document per row, positions `0..seq`.
    pub fn contiguous(batch: usize, seq: usize) -> Self {
        Self {
            batch,
            seq,
            positions: (0..batch).flat_map(|_| 0..seq).collect(),
            documents: vec![0; batch * seq],
        }
    }
}

/// Rotary tables and mask for one block, on the device, and the dtype the block computes in.
#[derive(Debug, Clone)]
pub struct AttentionInputs<B: Backend> {
    /// `[batch, 1, seq, head_dim]`, in the compute dtype.
    cos: Tensor<B, 4>,
    /// `[batch, 1, seq, head_dim]`, in the compute dtype.
    sin: Tensor<B, 4>,
    /// Which keys each query sees (causal, per document, sliding window).
    spec: AttentionSpec<B>,
    /// Matmuls and activations run in this dtype: float32, or bfloat16 under mixed precision.
    compute: DType,
}

impl<B: Backend> AttentionInputs<B> {
    /// Builds the tables and mask for `layout` under `cfg` (causal, per document, and Mistral's
    /// sliding window).
    pub fn new(cfg: &ModelConfig, layout: &TokenLayout, device: &B::Device) -> Self {
        let TokenLayout { batch, seq, .. } = *layout;
        let dim = cfg.head_dim;
        let longest = layout.positions.iter().max().map_or(0, |p| p + 1);
        let (cos, sin) = RotaryEmbedding::new(cfg).tables(&layout.positions, longest);
        let table = |values: Vec<f32>| {
            Tensor::<B, 4>::from_data(TensorData::new(values, [batch, 1, seq, dim]), device)
        };
        // Ids are only compared for equality; as i32 they fit every backend's integers (wgpu's
        // are 32-bit) and stay distinct (padding's u32::MAX becomes -1).
        let documents: Vec<i64> = layout
            .documents
            .iter()
            .map(|&d| i64::from(d as i32))
            .collect();
        let documents =
            Tensor::<B, 2, Int>::from_data(TensorData::new(documents, [batch, seq]), device);
        Self {
            cos: table(cos),
            sin: table(sin),
            spec: AttentionSpec::new(
                documents,
                cfg.sliding_window,
                (dim as f64).powf(-0.5),
                cfg.num_heads,
            ),
            compute: DType::F32,
        }
    }

    /// The same block computed in `dtype` (mixed precision): the rotary tables, computed in
    /// float32, are cast once, as transformers casts them to the activations' dtype.
    pub fn computing_in(self, dtype: DType) -> Self {
        Self {
            cos: in_dtype(self.cos, dtype),
            sin: in_dtype(self.sin, dtype),
            spec: self.spec,
            compute: dtype,
        }
    }

    /// `x` in the block's compute dtype.
    pub fn compute<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        in_dtype(x, self.compute)
    }

    /// The same tables on the autodiff backend over `B` (constants: nothing flows back to them).
    pub fn to_autodiff<A: AutodiffBackend<InnerBackend = B>>(&self) -> AttentionInputs<A> {
        AttentionInputs {
            cos: Tensor::from_inner(self.cos.clone()),
            sin: Tensor::from_inner(self.sin.clone()),
            spec: self.spec.to_autodiff(),
            compute: self.compute,
        }
    }

    /// Which keys each query sees.
    pub fn spec(&self) -> &AttentionSpec<B> {
        &self.spec
    }
}

impl<B: Kernels> AttentionInputs<B> {
    /// Applies the rotation to `[batch, heads, seq, head_dim]` queries or keys.
    pub fn rotate(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        B::rotary(x, self.cos.clone(), self.sin.clone())
    }
}
