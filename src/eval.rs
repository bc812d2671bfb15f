//! Mean token cross-entropy and perplexity of a model over a dataset.

use burn::tensor::ElementConversion;
use serde::Serialize;

use crate::data::Example;
use crate::kernels::Kernels;
use crate::model::loss::{Targets, IGNORE_INDEX};
use crate::model::{token_tensor, AttentionInputs, StageModel, TokenLayout};

/// What `pp eval` reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EvalResult {
    /// Token-weighted mean cross-entropy over every scored token (nats).
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Number of scored tokens.
    pub tokens: usize,
    /// Number of dataset rows.
    pub rows: usize,
    /// Number of model inputs the rows became (long rows are split into windows).
    pub sequences: usize,
}

/// A run of at most `max_len` tokens of one row.
struct Window<'a> {
    ids: &'a [u32],
    labels: &'a [i64],
}

/// Splits an example into windows of at most `max_len` tokens that overlap by one token, so that
/// every token after the first is predicted exactly once, with as much context as fits.
fn windows(example: &Example, max_len: usize) -> impl Iterator<Item = Window<'_>> {
    let n = example.input_ids.len();
    let stride = max_len.saturating_sub(1).max(1);
    (0..n.saturating_sub(1)).step_by(stride).map(move |start| {
        let end = (start + max_len).min(n);
        Window {
            ids: &example.input_ids[start..end],
            labels: &example.labels[start..end],
        }
    })
}

/// Evaluates `model` (a stage that owns the whole model) on `examples`, `batch_size` windows
/// at a time; `on_batch` is told how many scored tokens each batch had, for progress.
///
/// Returns `None` when no token is scored (every label is `-100`).
pub fn evaluate<B: Kernels>(
    model: &StageModel<B>,
    examples: &[Example],
    max_len: usize,
    batch_size: usize,
    pad_id: u32,
    device: &B::Device,
    mut on_batch: impl FnMut(usize),
) -> Option<EvalResult> {
    let mut all: Vec<Window<'_>> = examples
        .iter()
        .flat_map(|e| windows(e, max_len.max(2)))
        .collect();
    // Longest first, so each batch pads little and the slowest batch shows up early.
    all.sort_by_key(|w| std::cmp::Reverse(w.ids.len()));
    let mut loss_sum = 0.0f64;
    let mut tokens = 0usize;
    for batch in all.chunks(batch_size.max(1)) {
        let seq = batch[0].ids.len();
        let mut ids = Vec::with_capacity(batch.len() * seq);
        let mut labels = Vec::with_capacity(batch.len() * seq);
        for window in batch {
            let pad = seq - window.ids.len();
            ids.extend_from_slice(window.ids);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            labels.extend_from_slice(window.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        let targets = Targets::from_labels(&labels, batch.len(), seq);
        if targets.count == 0 {
            on_batch(0);
            continue;
        }
        // Right padding needs no attention mask: causal attention never looks ahead into it.
        let inputs = AttentionInputs::new(
            model.config(),
            &TokenLayout::contiguous(batch.len(), seq),
            device,
        );
        let sum: f32 = model
            .loss_sum(
                token_tensor(&ids, batch.len(), seq, device),
                &inputs,
                &targets.to_device(model.config().vocab_size, device),
            )
            .into_scalar()
            .elem();
        loss_sum += f64::from(sum);
        tokens += targets.count;
        on_batch(targets.count);
    }
    (tokens > 0).then(|| {
        let loss = loss_sum / tokens as f64;
        EvalResult {
            loss,
            perplexity: loss.exp(),
            tokens,
            rows: examples.len(),
            sequences: all.len(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(n: usize) -> Example {
        Example {
            input_ids: (0..n as u32).collect(),
            labels: (0..n as i64).collect(),
            line: 1,
        }
    }

    #[test]
    fn windows_score_every_token_once() {
        let e = example(10);
        let spans: Vec<Vec<u32>> = windows(&e, 4).map(|w| w.ids.to_vec()).collect();
        assert_eq!(
            spans,
            vec![vec![0, 1, 2, 3], vec![3, 4, 5, 6], vec![6, 7, 8, 9]]
        );
        // Each window scores all but its first token: 3 + 3 + 3 = 9 = every token but the first.
        let scored: usize = windows(&e, 4).map(|w| w.ids.len() - 1).sum();
        assert_eq!(scored, 9);
    }

    #[test]
    fn short_rows_are_one_window_and_single_tokens_none() {
        assert_eq!(windows(&example(3), 8).count(), 1);
        assert_eq!(windows(&example(1), 8).count(), 0);
    }
}
