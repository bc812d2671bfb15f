//! Mixed precision: under a 16-bit compute dtype the model computes its matmuls and activations
//! in it while the weights, their gradients and the optimizer stay float32. bf16 compute needs
//! CUDA (WGSL has no bf16); the same code path runs here in float16 on wgpu where the adapter
//! has it (Mesa's software Vulkan does), and is checked against float32 training.

mod common;

use pp::device::{Device, DeviceSpec};

#[test]
fn the_cpu_emulates_bf16() {
    let cpu = Device::resolve(DeviceSpec::Cpu).unwrap();
    assert!(!cpu.supports_bf16(), "ndarray computes in float32 only");
}

#[cfg(feature = "wgpu")]
#[test]
fn half_precision_compute_trains_close_to_float32() {
    use common::training::{relative_l2, train_steps, Setup};
    use pp::dtype::DType;
    use pp::train::optim::Optimizer;
    use pp::train::runtime::Precision;

    let adamw = || Optimizer::AdamW {
        betas: (0.9, 0.999),
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let device = Device::resolve(DeviceSpec::Wgpu(0)).unwrap();
    let half = pp::with_backend!(device, |B, dev| {
        <B as burn::tensor::backend::Backend>::supports_dtype(&dev, burn::tensor::DType::F16)
    });
    if !half {
        eprintln!("{device} has no float16 compute: nothing to check here");
        return;
    }
    let float32 = Setup {
        device: DeviceSpec::Wgpu(0),
        ..Setup::default()
    };
    let mixed = Setup {
        precision: Precision {
            master: DType::F32,
            compute: DType::F16,
        },
        ..float32
    };
    // One fixture: the tied one, whose head reuses the embedding (software Vulkan is slow).
    for name in ["llama32-tied-bf16-sharded"] {
        let want = train_steps(name, &adamw(), 1e-3, 2, float32);
        let got = train_steps(name, &adamw(), 1e-3, 2, mixed);
        for (step, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
            let relative = (a - b).abs() / b.abs();
            // Float16 keeps 11 bits: a percent at most over these few layers and steps.
            assert!(
                relative < 1e-2,
                "{name}: loss before step {step}: {a} vs {b}"
            );
        }
        // The compute really was float16: the first loss is not float32's to the last bit.
        assert_ne!(
            got.losses[0], want.losses[0],
            "{name}: no float16 arithmetic happened"
        );
        for (param, values) in &want.params {
            let relative = relative_l2(&got.params[param], values);
            assert!(relative < 1e-2, "{name}: {param} off by {relative:e}");
        }
    }
}
