//! A model cut into stage slices computes what the whole model computes: forward through each
//! slice in turn, then backward through each slice with the gradient of its output arriving from
//! the next one — the way pipeline stages on different devices will run.

mod common;

use common::pipeline::run_pipeline;
use common::{max_abs, max_abs_diff, Expected};
use pp_stages::StageSlice;

fn slice(embedding: bool, layers: std::ops::Range<usize>, head: bool) -> StageSlice {
    StageSlice {
        embedding,
        layers,
        head,
    }
}

fn check(name: &str, slices: &[StageSlice]) {
    let expected = Expected::load(name);
    let run = run_pipeline(name, slices, pp::device::DeviceSpec::Cpu);
    let err = max_abs_diff(&run.logits, &expected.f32("logits").values);
    assert!(err < 1e-4, "{name} {slices:?}: logits off by {err}");
    let expected_count = expected
        .names()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count();
    assert_eq!(
        run.grads.len(),
        expected_count,
        "{name}: every parameter has a gradient"
    );
    for (param, grad) in run.grads {
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
