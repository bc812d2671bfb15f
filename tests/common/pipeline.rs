//! Runs a fixture's reference batch through a model cut into stage slices, the way pipeline
//! stages on different devices run it. One slice that owns everything is the whole model.

use burn::backend::Autodiff;
use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{ElementConversion, Int, Tensor};
use pp::checkpoint::SafetensorsWeights;
use pp::data::Sequence;
use pp::device::{Device, DeviceSpec};
use pp::kernels::Kernels;
use pp::model::loss::Targets;
use pp::model::{token_tensor, AttentionInputs, ModelConfig, StageModel, TokenLayout};
use pp_stages::StageSlice;

use super::Expected;

/// A fixture's configuration and weights.
pub fn fixture_model(name: &str) -> (ModelConfig, SafetensorsWeights) {
    let dir = super::fixture(name).join("hf");
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    (config, SafetensorsWeights::open(&dir).unwrap())
}

/// A fixture's reference batch (`expected.safetensors`), ready to feed to a model.
pub struct ReferenceBatch {
    pub batch: usize,
    pub seq: usize,
    ids: Vec<u32>,
    labels: Vec<i64>,
    layout: TokenLayout,
    config: ModelConfig,
    pub targets: Targets,
}

impl ReferenceBatch {
    pub fn load(name: &str, config: &ModelConfig) -> Self {
        let expected = Expected::load(name);
        let (ids, labels) = (expected.i64("input_ids"), expected.i64("labels"));
        let [batch, seq] = [ids.shape[0], ids.shape[1]];
        let layout = TokenLayout::contiguous(batch, seq);
        Self {
            batch,
            seq,
            ids: ids.values.iter().map(|&i| i as u32).collect(),
            labels: labels.values.clone(),
            layout,
            config: config.clone(),
            targets: Targets::from_labels(&labels.values, batch, seq),
        }
    }

    /// The batch's rows as training sequences.
    pub fn sequences(&self) -> Vec<Sequence> {
        self.ids
            .chunks(self.seq)
            .zip(self.labels.chunks(self.seq))
            .map(|(ids, labels)| Sequence {
                input_ids: ids.to_vec(),
                labels: labels.to_vec(),
                documents: vec![self.seq],
            })
            .collect()
    }

    /// The token ids as a `[batch, seq]` tensor.
    pub fn tokens<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        token_tensor(&self.ids, self.batch, self.seq, device)
    }

    /// The batch's rotary tables and mask.
    pub fn inputs<B: Backend>(&self, device: &B::Device) -> AttentionInputs<B> {
        AttentionInputs::new(&self.config, &self.layout, device)
    }
}

fn grads_by_name<B: Backend>(
    model: &StageModel<Autodiff<B>>,
    grads: &mut GradientsParams,
) -> Vec<(String, Vec<f32>)> {
    let take = |grads: &mut GradientsParams, id: ParamId| {
        grads
            .remove::<B, 2>(id)
            .map(|g| g.into_data().to_vec::<f32>().unwrap())
            .or_else(|| {
                grads
                    .remove::<B, 1>(id)
                    .map(|g| g.into_data().to_vec::<f32>().unwrap())
            })
    };
    model
        .named_params()
        .into_iter()
        .map(|(name, id)| {
            let grad = take(grads, id).unwrap_or_else(|| panic!("no gradient for {name}"));
            (name, grad)
        })
        .collect()
}

/// What a run of the fixture's reference batch produced.
pub struct PipelineRun {
    /// `[batch, seq, vocab]` logits, row-major.
    pub logits: Vec<f32>,
    /// Mean cross-entropy.
    pub loss: f32,
    /// Gradient of every parameter by Hugging Face name (summed over stages).
    pub grads: Vec<(String, Vec<f32>)>,
}

/// Runs `slices` as a pipeline on the fixture's reference batch: forward through each stage in
/// turn, each receiving a detached copy of the previous output as if over the network; backward
/// from the loss on the last stage, then through each earlier stage with the gradient of the next
/// stage's input. Gradients of a parameter held by two stages (tied embeddings) are summed.
pub fn run_pipeline(name: &str, slices: &[StageSlice], device: DeviceSpec) -> PipelineRun {
    let device = Device::resolve(device).unwrap();
    pp::with_backend!(device, |B, dev| run_pipeline_on::<B>(name, slices, &dev))
}

fn run_pipeline_on<I: Kernels>(
    name: &str,
    slices: &[StageSlice],
    device: &I::Device,
) -> PipelineRun {
    type B<X> = Autodiff<X>;
    let (config, weights) = fixture_model(name);
    let stages: Vec<StageModel<B<I>>> = slices
        .iter()
        .map(|s| StageModel::load(&config, s.clone(), &weights, device).unwrap())
        .collect();
    let reference = ReferenceBatch::load(name, &config);
    let (inputs, targets) = (&reference.inputs::<B<I>>(device), &reference.targets);

    // Forward: each stage receives a detached copy of the previous stage's output, as if it had
    // come over the network, and marks it as requiring a gradient.
    let mut stage_inputs: Vec<Option<Tensor<B<I>, 3>>> = Vec::new();
    let mut stage_outputs: Vec<Tensor<B<I>, 3>> = Vec::new();
    let mut hidden: Option<Tensor<B<I>, 3>> = None;
    for stage in &stages {
        let input = hidden.take().map(|h| h.detach().require_grad());
        let start = match &input {
            Some(h) => h.clone(),
            None => stage.embed(reference.tokens(device), inputs),
        };
        let out = stage.run_layers(start, inputs);
        stage_inputs.push(input);
        hidden = Some(out.clone());
        stage_outputs.push(out);
    }
    let last = stages.last().unwrap();
    let last_hidden = stage_outputs.pop().unwrap();
    let logits = last.logits(last_hidden.clone(), inputs);
    // The loss, and so every gradient, comes from the fused head loss.
    let device_targets = targets.to_device(config.vocab_size, device);
    let loss_tensor = last.head_loss(last_hidden, inputs, &device_targets) / targets.count as f64;
    let loss = loss_tensor.clone().into_scalar().elem::<f32>();

    // Backward: the last stage from the loss, every earlier stage from the gradient of the next
    // stage's input.
    let mut all: Vec<(String, Vec<f32>)> = Vec::new();
    let mut backward_from = Some(loss_tensor);
    for (index, stage) in stages.iter().enumerate().rev() {
        let grads = backward_from
            .take()
            .expect("set by the later stage")
            .backward();
        if index > 0 {
            let incoming = stage_inputs[index].as_ref().unwrap().grad(&grads).unwrap();
            let previous_output = stage_outputs.pop().unwrap();
            backward_from = Some((previous_output * Tensor::from_inner(incoming)).sum());
        }
        let mut by_id = GradientsParams::from_grads(grads, stage);
        for (name, grad) in grads_by_name::<I>(stage, &mut by_id) {
            match all.iter_mut().find(|(n, _)| *n == name) {
                Some((_, sum)) => sum.iter_mut().zip(&grad).for_each(|(s, g)| *s += g),
                None => all.push((name, grad)),
            }
        }
    }
    PipelineRun {
        logits: logits.into_data().to_vec::<f32>().unwrap(),
        loss,
        grads: all,
    }
}
