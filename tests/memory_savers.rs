//! Each memory saver, and any split of a step into micro-batches, must train to the same weights
//! as a plain run (float32, within 1e-5 relative L2 per tensor), on every fixture.

mod common;

use common::training::{relative_l2, train_steps, Run};
use common::FIXTURES;
use pp::train::optim::Optimizer;
use pp::train::runtime::MemorySavers;

const STEPS: usize = 3;

fn adamw() -> Optimizer {
    Optimizer::AdamW {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.01,
    }
}

fn adafactor() -> Optimizer {
    Optimizer::Adafactor {
        eps: (1e-30, 1e-3),
        clip_threshold: 1.0,
        decay_rate: -0.8,
        weight_decay: 0.0,
    }
}

fn assert_same(what: &str, got: &Run, want: &Run) {
    for (step, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "{what}: loss before step {step}: {a} vs {b}"
        );
    }
    assert_eq!(got.params.len(), want.params.len(), "{what}: parameters");
    for (name, values) in &want.params {
        let relative = relative_l2(&got.params[name], values);
        assert!(relative <= 1e-5, "{what}: {name} off by {relative:e}");
    }
}

fn check_against_plain(optimizer: &Optimizer, lr: f64, savers: MemorySavers, micro: usize) {
    for name in FIXTURES {
        let plain = train_steps(
            name,
            optimizer,
            lr,
            STEPS,
            usize::MAX,
            MemorySavers::default(),
            None,
        );
        let run = train_steps(name, optimizer, lr, STEPS, micro, savers, None);
        assert_same(
            &format!("{name} {savers:?} micro-batch {micro}"),
            &run,
            &plain,
        );
        // The run moved: the comparison is between trained weights, not two copies of the start.
        let start = train_steps(
            name,
            optimizer,
            0.0,
            1,
            usize::MAX,
            MemorySavers::default(),
            None,
        );
        let moved = plain
            .params
            .iter()
            .any(|(n, v)| relative_l2(&start.params[n], v) > 1e-3);
        assert!(moved, "{name}: training changed the weights");
    }
}

#[test]
fn checkpointed_activations_train_the_same_weights() {
    let savers = MemorySavers {
        checkpoint_activations: true,
        ..Default::default()
    };
    check_against_plain(&adamw(), 1e-3, savers, usize::MAX);
}

#[test]
fn offloaded_activations_train_the_same_weights() {
    let savers = MemorySavers {
        checkpoint_activations: true,
        offload_activations: true,
        ..Default::default()
    };
    check_against_plain(&adamw(), 1e-3, savers, usize::MAX);
}

#[test]
fn optimizer_in_backward_trains_the_same_weights() {
    let savers = MemorySavers {
        optimizer_in_backward: true,
        ..Default::default()
    };
    check_against_plain(&adafactor(), 1e-2, savers, usize::MAX);
    check_against_plain(&adamw(), 1e-3, savers, usize::MAX);
}

#[test]
fn all_savers_together_train_the_same_weights() {
    let savers = MemorySavers {
        checkpoint_activations: true,
        offload_activations: true,
        optimizer_in_backward: true,
    };
    check_against_plain(&adafactor(), 1e-2, savers, usize::MAX);
}

#[test]
fn micro_batches_give_the_same_step_as_one_batch() {
    // The loss is the token-weighted mean over the whole step, so splitting the rows changes
    // nothing (rows have different numbers of scored tokens in the fixtures' batches).
    check_against_plain(&adamw(), 1e-3, MemorySavers::default(), 1);
}

#[test]
fn global_norm_clipping_scales_the_whole_step() {
    for name in FIXTURES {
        let clipped = train_steps(
            name,
            &Optimizer::Sgd {
                momentum: 0.0,
                weight_decay: 0.0,
            },
            1.0,
            1,
            usize::MAX,
            MemorySavers::default(),
            Some(1e-3),
        );
        let sgd = train_steps(
            name,
            &Optimizer::Sgd {
                momentum: 0.0,
                weight_decay: 0.0,
            },
            1.0,
            1,
            usize::MAX,
            MemorySavers::default(),
            None,
        );
        let start = train_steps(
            name,
            &adamw(),
            0.0,
            1,
            usize::MAX,
            MemorySavers::default(),
            None,
        );
        // With SGD, the clipped update is the plain update scaled to a global norm of 1e-3.
        let norm_of = |run: &Run| -> f64 {
            run.params
                .iter()
                .map(|(n, v)| {
                    v.iter()
                        .zip(&start.params[n])
                        .map(|(a, b)| f64::from(a - b).powi(2))
                        .sum::<f64>()
                })
                .sum::<f64>()
                .sqrt()
        };
        let clipped_norm = norm_of(&clipped);
        assert!(
            (clipped_norm - 1e-3).abs() < 2e-5,
            "{name}: clipped update norm {clipped_norm}"
        );
        assert!(norm_of(&sgd) > 1e-2, "{name}: the unclipped step is larger");
    }
}
