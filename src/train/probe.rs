//! How fast a device trains the run's model: one decoder layer and the head, forward and
//! backward, on one row of the run's sequence length, through the same stage runtime, dtype and
//! memory savers as training, with random weights of the model's shapes. A group of machines
//! places its layers by these numbers (`crate::cluster::placement`).

use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use pp_stages::StageSlice;
use serde::{Deserialize, Serialize};

use super::runtime::{StageOutput, StageRunner};
use super::trainer::{pad_token, TrainOptions};
use crate::checkpoint::OwnedWeights;
use crate::data::{MicroBatch, Sequence};
use crate::error::Result;
use crate::kernels::TrainBackend;
use crate::model::{ModelConfig, StageModel};

/// Timed passes after one untimed pass (kernel compilation, autotuning, allocator warm-up).
const TIMED_PASSES: usize = 3;

/// Seconds per row of the run's sequence length, the median of [`TIMED_PASSES`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageSpeed {
    /// One decoder layer's forward.
    pub layer_forward: f64,
    /// One decoder layer's backward (with its recomputed forward under activation
    /// checkpointing).
    pub layer_backward: f64,
    /// The head's forward: final norm, output projection and loss.
    pub head_forward: f64,
    /// The head's backward.
    pub head_backward: f64,
}

/// Measures `options`' model on `device`.
pub fn measure<B: TrainBackend>(options: &TrainOptions, device: &B::Device) -> Result<StageSpeed> {
    let config = crate::checkpoint::describe(&options.model_dir)?.config;
    let seq = options.sequences.max_len;
    let input_ids: Vec<u32> = (0..seq)
        .map(|i| (i * 7919 % config.vocab_size) as u32)
        .collect();
    let row = Sequence {
        labels: input_ids.iter().map(|&id| i64::from(id)).collect(),
        input_ids,
        documents: vec![seq],
    };
    let batch = MicroBatch::new(&[&row], pad_token(&config));
    let layer = StageSlice {
        embedding: false,
        layers: 0..1,
        head: false,
    };
    let head = StageSlice {
        embedding: false,
        layers: 0..0,
        head: true,
    };
    let (layer_forward, layer_backward) = time_stage::<B>(options, &config, layer, &batch, device)?;
    let (head_forward, head_backward) = time_stage::<B>(options, &config, head, &batch, device)?;
    Ok(StageSpeed {
        layer_forward,
        layer_backward,
        head_forward,
        head_backward,
    })
}

/// Median seconds of `slice`'s forward and backward on `batch`. Each pass ends when its output
/// reaches host memory, as a pipeline stage's does before it is sent.
fn time_stage<B: TrainBackend>(
    options: &TrainOptions,
    config: &ModelConfig,
    slice: StageSlice,
    batch: &MicroBatch,
    device: &B::Device,
) -> Result<(f64, f64)> {
    let weights = OwnedWeights::synthetic(config, &slice, 0);
    let model = StageModel::<B>::load(config, slice, &weights, device)?;
    let mut runner = StageRunner::new(
        model,
        options.optimizer.clone(),
        options.savers,
        options.precision(),
        device.clone(),
    );
    let shape = [batch.layout.batch, batch.layout.seq, config.hidden_size];
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i % 97) as f32 - 48.0) / 48.0)
        .collect();
    let hidden = || Tensor::from_data(TensorData::new(values.clone(), shape), device);
    let (mut forwards, mut backwards) = (Vec::new(), Vec::new());
    for pass in 0..=TIMED_PASSES {
        let started = Instant::now();
        let (grad_output, loss_scale) = match runner.forward(pass, batch, Some(hidden())) {
            StageOutput::Hidden(out) => {
                let _ = out.into_data();
                (Some(hidden()), 1.0)
            }
            StageOutput::Loss { tokens, .. } => (None, 1.0 / tokens.max(1) as f64),
        };
        let forward = started.elapsed().as_secs_f64();
        let started = Instant::now();
        if let Some(grad_input) = runner.backward(pass, grad_output, loss_scale, false) {
            let _ = grad_input.into_data();
        }
        let backward = started.elapsed().as_secs_f64();
        if pass > 0 {
            forwards.push(forward);
            backwards.push(backward);
        }
    }
    Ok((median(forwards), median(backwards)))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
