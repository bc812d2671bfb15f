//! Weights held in memory: made up on the spot (a deterministic pseudo-random model of any shape,
//! for benchmarks at real model shapes without a download) or copied out of another source.

use std::collections::BTreeMap;
use std::path::Path;

use pp_stages::StageSlice;

use super::{TensorView, WeightSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// Tensors held in memory.
#[derive(Default)]
pub struct OwnedWeights {
    tensors: BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>,
}

impl OwnedWeights {
    /// Adds (or replaces) a tensor.
    pub fn insert(&mut self, name: &str, dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) {
        self.tensors.insert(name.to_string(), (dtype, shape, bytes));
    }

    /// Adds every tensor of `other` (a tensor already here is replaced).
    pub fn extend(&mut self, other: OwnedWeights) {
        self.tensors.extend(other.tensors);
    }

    /// Copies the tensors `names` out of `source`, converted to `cast` if given.
    pub fn copy_from(
        source: &dyn WeightSource,
        names: &[String],
        cast: Option<DType>,
    ) -> Result<Self> {
        let mut copy = Self::default();
        for name in names {
            let view = source.tensor(name)?;
            let dtype = cast.unwrap_or(view.dtype);
            let mut bytes = Vec::with_capacity(view.bytes.len() / view.dtype.size() * dtype.size());
            view.dtype.cast(view.bytes, dtype, &mut bytes);
            copy.insert(name, dtype, view.shape.to_vec(), bytes);
            source.release(name, 0..view.bytes.len());
        }
        Ok(copy)
    }

    /// The tensors of `slice` of a random model: small random matrices (uniform, std 0.02 like
    /// transformers' initializer) and unit norms, float32.
    pub fn synthetic(cfg: &ModelConfig, slice: &StageSlice, seed: u64) -> Self {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // xorshift64*: fast, deterministic, good enough for initial weights.
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545F4914F6CDD1D) >> 40;
            // Uniform on [-0.0346, 0.0346): standard deviation 0.02.
            (bits as f32 / (1u64 << 24) as f32 - 0.5) * 0.0693
        };
        let (v, h, i) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
        );
        let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
        // A last stage without the embedding holds its own copy of a tied output matrix.
        if slice.embedding || (slice.head && cfg.tie_word_embeddings) {
            shapes.push(("model.embed_tokens.weight".into(), vec![v, h]));
        }
        for l in slice.layers.clone() {
            let p = format!("model.layers.{l}");
            shapes.extend([
                (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            ]);
        }
        if slice.head {
            shapes.push(("model.norm.weight".into(), vec![h]));
            if !cfg.tie_word_embeddings {
                shapes.push(("lm_head.weight".into(), vec![v, h]));
            }
        }
        let tensors = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let is_norm = shape.len() == 1;
                let bytes = (0..n)
                    .flat_map(|_| if is_norm { 1.0f32 } else { next() }.to_le_bytes())
                    .collect();
                (name, (DType::F32, shape, bytes))
            })
            .collect();
        Self { tensors }
    }
}

impl WeightSource for OwnedWeights {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let (dtype, shape, bytes) = self.tensors.get(name).ok_or_else(|| Error::Checkpoint {
            path: "<memory>".into(),
            message: format!("tensor `{name}` is missing"),
        })?;
        Ok(TensorView {
            dtype: *dtype,
            shape,
            bytes,
        })
    }

    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn file_of(&self, _name: &str) -> &Path {
        Path::new("<memory>")
    }
}
