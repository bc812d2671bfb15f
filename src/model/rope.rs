//! Rotary position embeddings, computed the way transformers computes them (float32, the
//! `rotate_half` layout in which a head's first and second halves form the rotated pairs).

use super::config::{ModelConfig, RopeScaling};
use crate::dtype::DType;

/// Inverse frequencies for one head, and how they change with sequence length.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    head_dim: usize,
    theta: f64,
    scaling: RopeScaling,
    max_position_embeddings: usize,
    /// transformers keeps the inverse frequencies in a buffer that is cast with the model, so a
    /// bfloat16 or float16 model computes RoPE from frequencies rounded to that dtype (and a
    /// model upcast afterwards keeps the rounded values). `pp` rounds them the same way.
    buffer_dtype: DType,
}

impl RotaryEmbedding {
    /// Rotary embedding for `cfg`'s heads.
    pub fn new(cfg: &ModelConfig) -> Self {
        Self {
            head_dim: cfg.head_dim,
            theta: cfg.rope.theta,
            scaling: cfg.rope.scaling.clone(),
            max_position_embeddings: cfg.max_position_embeddings,
            buffer_dtype: cfg.dtype,
        }
    }

    /// The `head_dim / 2` inverse frequencies used for a sequence of `seq_len` tokens
    /// (only `dynamic` scaling depends on it).
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let dim = self.head_dim;
        let base = match self.scaling {
            // transformers' dynamic NTK: grow the base once the sequence outgrows the context.
            RopeScaling::Dynamic { factor } if seq_len > self.max_position_embeddings => {
                let ratio = factor * seq_len as f64 / self.max_position_embeddings as f64;
                self.theta * (ratio - (factor - 1.0)).powf(dim as f64 / (dim as f64 - 2.0))
            }
            _ => self.theta,
        };
        let base = base as f32;
        let plain: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        let scaled: Vec<f32> = match self.scaling {
            RopeScaling::Default | RopeScaling::Dynamic { .. } => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                );
                let context = original_max_position_embeddings as f32;
                let low_freq_wavelen = context / low;
                let high_freq_wavelen = context / high;
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (context / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled
            .into_iter()
            .map(|f| self.buffer_dtype.round(f))
            .collect()
    }

    /// Cosine and sine tables `[positions.len(), head_dim]`, row-major, for the given positions
    /// of a sequence of `seq_len` tokens.
    pub fn tables(&self, positions: &[usize], seq_len: usize) -> (Vec<f32>, Vec<f32>) {
        let inv_freq = self.inv_freq(seq_len);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * 2 * half);
        let mut sin = Vec::with_capacity(positions.len() * 2 * half);
        for &pos in positions {
            // Each frequency appears twice: once for each half of the head.
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = pos as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(scaling: RopeScaling) -> RotaryEmbedding {
        RotaryEmbedding {
            head_dim: 8,
            theta: 10_000.0,
            scaling,
            max_position_embeddings: 16,
            buffer_dtype: DType::F32,
        }
    }

    #[test]
    fn default_frequencies_are_geometric() {
        let f = rope(RopeScaling::Default).inv_freq(4);
        assert_eq!(f.len(), 4);
        assert_eq!(f[0], 1.0);
        assert!((f[1] - 0.1).abs() < 1e-7);
        assert!((f[3] - 1e-3).abs() < 1e-9);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = rope(RopeScaling::Default).inv_freq(4);
        let scaled = rope(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        })
        .inv_freq(4);
        // Wavelength 2π < 64/4: untouched. Wavelength 2π·1000 > 64/1: divided by the factor.
        // Wavelength 2π·10 lies between: smoothly interpolated.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[3] - plain[3] / 8.0).abs() < 1e-12);
        assert!(scaled[1] < plain[1] && scaled[1] > plain[1] / 8.0);
    }

    #[test]
    fn dynamic_scaling_only_changes_long_sequences() {
        let r = rope(RopeScaling::Dynamic { factor: 2.0 });
        assert_eq!(r.inv_freq(16), rope(RopeScaling::Default).inv_freq(16));
        assert!(r.inv_freq(64)[3] < r.inv_freq(16)[3]);
    }

    #[test]
    fn half_precision_models_round_frequencies_like_their_buffer() {
        let f32_freqs = rope(RopeScaling::Default).inv_freq(4);
        let bf16_freqs = RotaryEmbedding {
            buffer_dtype: DType::BF16,
            ..rope(RopeScaling::Default)
        }
        .inv_freq(4);
        for (a, b) in f32_freqs.iter().zip(&bf16_freqs) {
            assert_eq!(*b, half::bf16::from_f32(*a).to_f32());
        }
        assert_ne!(f32_freqs, bf16_freqs);
    }

    #[test]
    fn tables_repeat_frequencies_for_both_halves() {
        let (cos, sin) = rope(RopeScaling::Default).tables(&[0, 3], 4);
        assert_eq!(cos.len(), 16);
        assert!(cos[..8].iter().all(|&c| c == 1.0));
        assert_eq!(sin[8..12], sin[12..16]);
        assert!((sin[8] - 3f32.sin()).abs() < 1e-7);
    }
}
