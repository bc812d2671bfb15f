//! Each memory saver, backward split into I and W passes, and any split of a step into
//! micro-batches must train to the same weights as a plain run (float32, within 1e-5 relative L2
//! per tensor on the CPU, 1e-4 on wgpu), on every fixture and every device.

mod common;

use common::training::{relative_l2, train_steps, Run, Setup};
use common::FIXTURES;
use pp::device::DeviceSpec;
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

fn sgd() -> Optimizer {
    Optimizer::Sgd {
        momentum: 0.0,
        weight_decay: 0.0,
    }
}

fn savers(device: DeviceSpec, checkpoint: bool, offload: bool, in_backward: bool) -> Setup {
    Setup {
        device,
        savers: MemorySavers {
            checkpoint_activations: checkpoint,
            offload_activations: offload,
            optimizer_in_backward: in_backward,
        },
        ..Setup::default()
    }
}

fn assert_same(what: &str, got: &Run, want: &Run, tolerance: f64) {
    for (step, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        assert!(
            (a - b).abs() <= tolerance * b.abs(),
            "{what}: loss before step {step}: {a} vs {b}"
        );
    }
    assert_eq!(got.params.len(), want.params.len(), "{what}: parameters");
    for (name, values) in &want.params {
        let relative = relative_l2(&got.params[name], values);
        assert!(relative <= tolerance, "{what}: {name} off by {relative:e}");
    }
}

fn check_against_plain(optimizer: &Optimizer, lr: f64, setup: Setup) {
    let plain_setup = Setup {
        device: setup.device,
        ..Setup::default()
    };
    for name in FIXTURES {
        let plain = train_steps(name, optimizer, lr, STEPS, plain_setup);
        let run = train_steps(name, optimizer, lr, STEPS, setup);
        let tolerance = common::tolerance(setup.device);
        assert_same(&format!("{name} {setup:?}"), &run, &plain, tolerance);
        // The run moved: the comparison is between trained weights, not two copies of the start.
        let start = train_steps(name, optimizer, 0.0, 1, plain_setup);
        let moved = plain
            .params
            .iter()
            .any(|(n, v)| relative_l2(&start.params[n], v) > 1e-3);
        assert!(moved, "{name}: training changed the weights");
    }
}

crate::on_devices! {
    checkpointed_activations_train_the_same_weights => |device| {
        check_against_plain(&adamw(), 1e-3, savers(device, true, false, false));
    };
    offloaded_activations_train_the_same_weights => |device| {
        check_against_plain(&adamw(), 1e-3, savers(device, true, true, false));
    };
    optimizer_in_backward_trains_the_same_weights => |device| {
        check_against_plain(&adafactor(), 1e-2, savers(device, false, false, true));
        check_against_plain(&adamw(), 1e-3, savers(device, false, false, true));
    };
    all_savers_together_train_the_same_weights => |device| {
        check_against_plain(&adafactor(), 1e-2, savers(device, true, true, true));
    };
    // The loss is the token-weighted mean over the whole step, so splitting the rows changes
    // nothing (rows have different numbers of scored tokens in the fixtures' batches).
    micro_batches_give_the_same_step_as_one_batch => |device| {
        let setup = Setup {
            device,
            micro_batch: 1,
            ..Setup::default()
        };
        check_against_plain(&adamw(), 1e-3, setup);
    };
    split_input_and_weight_passes_train_the_same_weights => |device| {
        let setup = Setup {
            device,
            split_backward: true,
            micro_batch: 1,
            ..Setup::default()
        };
        check_against_plain(&adamw(), 1e-3, setup);
    };
}

#[test]
fn global_norm_clipping_scales_the_whole_step() {
    for name in FIXTURES {
        let clipped = Setup {
            max_grad_norm: Some(1e-3),
            ..Setup::default()
        };
        let clipped = train_steps(name, &sgd(), 1.0, 1, clipped);
        let unclipped = train_steps(name, &sgd(), 1.0, 1, Setup::default());
        let start = train_steps(name, &sgd(), 0.0, 1, Setup::default());
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
        assert!(
            norm_of(&unclipped) > 1e-2,
            "{name}: the unclipped step is larger"
        );
    }
}
