//! A model cut into stage slices computes what the whole model computes: forward through each
//! slice in turn, then backward through each slice with the gradient of its output arriving from
//! the next one — the way pipeline stages on different devices will run.

mod common;

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use common::{max_abs, max_abs_diff, Expected};
use pp::backend::{Cpu, CpuAutodiff};
use pp::checkpoint::SafetensorsWeights;
use pp::model::loss::{cross_entropy_sum, Targets};
use pp::model::{token_tensor, AttentionInputs, ModelConfig, StageModel, TokenLayout};
use pp_stages::StageSlice;

type B = CpuAutodiff;

fn grads_by_name(model: &StageModel<B>, grads: &mut GradientsParams) -> Vec<(String, Vec<f32>)> {
    let take = |grads: &mut GradientsParams, id: ParamId| {
        grads
            .remove::<Cpu, 2>(id)
            .map(|g| g.into_data().to_vec::<f32>().unwrap())
            .or_else(|| {
                grads
                    .remove::<Cpu, 1>(id)
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

/// Runs `slices` as a pipeline on the fixture's batch and returns logits and per-name
/// gradients (summed over stages, as tied weights on two stages must be).
fn run_pipeline(name: &str, slices: &[StageSlice]) -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
    let dir = common::fixture(name).join("hf");
    let config = ModelConfig::from_hf_file(&dir.join("config.json")).unwrap();
    let weights = SafetensorsWeights::open(&dir).unwrap();
    let device = Default::default();
    let stages: Vec<StageModel<B>> = slices
        .iter()
        .map(|s| StageModel::load(&config, s.clone(), &weights, &device).unwrap())
        .collect();
    let expected = Expected::load(name);
    let (ids, labels) = (expected.i64("input_ids"), expected.i64("labels"));
    let [batch, seq] = [ids.shape[0], ids.shape[1]];
    let ids: Vec<u32> = ids.values.iter().map(|&i| i as u32).collect();
    let inputs = AttentionInputs::new(&config, &TokenLayout::contiguous(batch, seq), &device);
    let targets = Targets::from_labels(&labels.values, batch, seq);

    // Forward: each stage receives a detached copy of the previous stage's output, as if it had
    // come over the network, and marks it as requiring a gradient.
    let mut stage_inputs: Vec<Option<Tensor<B, 3>>> = Vec::new();
    let mut stage_outputs: Vec<Tensor<B, 3>> = Vec::new();
    let mut hidden: Option<Tensor<B, 3>> = None;
    for stage in &stages {
        let input = hidden.take().map(|h| h.detach().require_grad());
        let start = match &input {
            Some(h) => h.clone(),
            None => stage.embed(token_tensor(&ids, batch, seq, &device)),
        };
        let out = stage.run_layers(start, &inputs);
        stage_inputs.push(input);
        hidden = Some(out.clone());
        stage_outputs.push(out);
    }
    let last = stages.last().unwrap();
    let logits = last.logits(stage_outputs.pop().unwrap());
    let loss = cross_entropy_sum(logits.clone(), &targets) / targets.count as f64;

    // Backward: the last stage from the loss, every earlier stage from the gradient of the next
    // stage's input.
    let mut all: Vec<(String, Vec<f32>)> = Vec::new();
    let mut backward_from = Some(loss);
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
        for (name, grad) in grads_by_name(stage, &mut by_id) {
            match all.iter_mut().find(|(n, _)| *n == name) {
                Some((_, sum)) => sum.iter_mut().zip(&grad).for_each(|(s, g)| *s += g),
                None => all.push((name, grad)),
            }
        }
    }
    (logits.into_data().to_vec::<f32>().unwrap(), all)
}

fn slice(embedding: bool, layers: std::ops::Range<usize>, head: bool) -> StageSlice {
    StageSlice {
        embedding,
        layers,
        head,
    }
}

fn check(name: &str, slices: &[StageSlice]) {
    let expected = Expected::load(name);
    let (logits, grads) = run_pipeline(name, slices);
    let err = max_abs_diff(&logits, &expected.f32("logits").values);
    assert!(err < 1e-4, "{name} {slices:?}: logits off by {err}");
    let expected_count = expected
        .names()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count();
    assert_eq!(
        grads.len(),
        expected_count,
        "{name}: every parameter has a gradient"
    );
    for (param, grad) in grads {
        let reference = expected.f32(&format!("grad.{param}")).values;
        let err = max_abs_diff(&grad, &reference);
        assert!(
            err <= 1e-4 * max_abs(&reference),
            "{name} {slices:?}: grad of {param} off by {err}"
        );
    }
}

#[test]
fn two_and_three_stage_slices_match_transformers() {
    check(
        "llama3-tiny",
        &[slice(true, 0..2, false), slice(false, 2..4, true)],
    );
    check(
        "mistral-tiny-swa",
        &[
            slice(true, 0..1, false),
            slice(false, 1..2, false),
            slice(false, 2..3, true),
        ],
    );
}

#[test]
fn tied_embedding_split_across_stages_sums_both_gradients() {
    // The embedding on the first stage, the (tied) output projection on the last, which keeps its
    // own copy of the weight: the two gradients add up to transformers' gradient.
    check(
        "llama32-tied-bf16-sharded",
        &[slice(true, 0..1, false), slice(false, 1..3, true)],
    );
    // Stages that own only the embedding, or only the head.
    check(
        "llama32-tied-bf16-sharded",
        &[
            slice(true, 0..0, false),
            slice(false, 0..3, false),
            slice(false, 3..3, true),
        ],
    );
}
