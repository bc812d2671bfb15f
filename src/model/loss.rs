//! Causal-LM cross-entropy with the Hugging Face conventions: the logits at position `t` are
//! scored against `labels[t + 1]`, and label `-100` marks positions without loss.

use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::kernels::LossTargets;

/// The label that marks a position without loss.
pub const IGNORE_INDEX: i64 = -100;

/// Shifted targets of a `[batch, seq]` block: which token each position must predict.
#[derive(Debug, Clone)]
pub struct Targets {
    /// `[batch * seq]` target ids (0 where ignored).
    ids: Vec<i64>,
    /// `[batch * seq]` 1.0 where the position is scored, else 0.0.
    weights: Vec<f32>,
    /// Number of scored positions.
    pub count: usize,
}

impl Targets {
    /// Shifts `labels` (row-major `[batch, seq]`) by one position within each row.
    pub fn from_labels(labels: &[i64], batch: usize, seq: usize) -> Self {
        let mut ids = Vec::with_capacity(batch * seq);
        let mut weights = Vec::with_capacity(batch * seq);
        for row in labels.chunks(seq).take(batch) {
            for t in 0..seq {
                let next = row.get(t + 1).copied().unwrap_or(IGNORE_INDEX);
                let scored = next != IGNORE_INDEX;
                ids.push(if scored { next } else { 0 });
                weights.push(if scored { 1.0 } else { 0.0 });
            }
        }
        let count = weights.iter().filter(|&&w| w > 0.0).count();
        Self {
            ids,
            weights,
            count,
        }
    }
}

impl Targets {
    /// The targets on `device`, chunked for a vocabulary of `vocab` (for
    /// [`Kernels::head_loss`](crate::kernels::Kernels::head_loss)).
    pub fn to_device<B: Backend>(&self, vocab: usize, device: &B::Device) -> LossTargets<B> {
        LossTargets::new(self.ids.clone(), self.weights.clone(), vocab, device)
    }
}

/// Summed cross-entropy `[1]` of `logits` `[batch, seq, vocab]` against `targets`, the plain
/// composition that the fused [`head_loss`](crate::kernels::Kernels::head_loss) is tested
/// against. Divide
/// by [`Targets::count`] (or by the count of a whole step) for the token-weighted mean.
pub fn cross_entropy_sum<B: Backend>(logits: Tensor<B, 3>, targets: &Targets) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let device = logits.device();
    let n = batch * seq;
    // In float32 whatever the compute dtype, as transformers' loss upcasts the logits.
    let logits = crate::model::layers::in_dtype(logits.reshape([n, vocab]), DType::F32);
    let log_probs = log_softmax(logits, 1);
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(targets.ids.clone(), [n, 1]), &device);
    let weights = Tensor::<B, 1>::from_data(TensorData::new(targets.weights.clone(), [n]), &device);
    let picked = log_probs.gather(1, ids).reshape([n]);
    (picked * weights).sum().neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_shift_by_one_and_skip_ignored() {
        let t = Targets::from_labels(&[5, -100, 7, 8, 9, 10], 2, 3);
        assert_eq!(t.ids, vec![0, 7, 0, 9, 10, 0]);
        assert_eq!(t.weights, vec![0.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
        assert_eq!(t.count, 3);
    }
}
