//! Helpers shared by the integration tests: fixture paths and reading reference tensors.
#![allow(dead_code)]

pub mod cli;
pub mod nodes;
pub mod pipeline;
pub mod processes;
pub mod training;

use std::path::PathBuf;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

/// The three reference checkpoints written by transformers.
pub const FIXTURES: [&str; 3] = [
    "llama3-tiny",
    "llama32-tied-bf16-sharded",
    "mistral-tiny-swa",
];

/// How close a device's results must be to the reference: the CPU within 1e-5; wgpu (a GPU,
/// or Mesa's software Vulkan in CI) within 1e-4, since its kernels sum in other orders.
pub fn tolerance(device: pp::device::DeviceSpec) -> f64 {
    match device {
        pp::device::DeviceSpec::Cpu => 1e-5,
        _ => 1e-4,
    }
}

/// Defines each test once per device: `cpu::NAME` always, `wgpu::NAME` when the `wgpu`
/// feature is built (CI runs it on Mesa's software Vulkan driver). Each body is a function of
/// the `DeviceSpec`.
#[macro_export]
macro_rules! on_devices {
    ($($name:ident => $body:expr;)*) => {
        mod cpu {
            #[allow(unused_imports)]
            use super::*;
            $(#[test] fn $name() { ($body)(pp::device::DeviceSpec::Cpu) })*
        }
        #[cfg(feature = "wgpu")]
        mod wgpu {
            #[allow(unused_imports)]
            use super::*;
            $(#[test] fn $name() { ($body)(pp::device::DeviceSpec::Wgpu(0)) })*
        }
    };
}

/// `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The resolved configuration of a fixture.
pub fn config(name: &str) -> pp::model::ModelConfig {
    pp::model::ModelConfig::from_hf_file(&fixture(name).join("hf/config.json")).unwrap()
}

/// The reference outputs of one fixture (`expected.safetensors`).
pub struct Expected {
    bytes: Vec<u8>,
}

/// A reference tensor: shape and values.
pub struct Reference<T> {
    pub shape: Vec<usize>,
    pub values: Vec<T>,
}

impl Expected {
    pub fn load(name: &str) -> Self {
        let path = fixture(name).join("expected.safetensors");
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid expected.safetensors")
    }

    pub fn names(&self) -> Vec<String> {
        self.view().names().into_iter().map(String::from).collect()
    }

    pub fn f32(&self, name: &str) -> Reference<f32> {
        let view = self.view();
        let t = view.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        Reference {
            shape: t.shape().to_vec(),
            values: t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        }
    }

    pub fn i64(&self, name: &str) -> Reference<i64> {
        let view = self.view();
        let t = view.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        Reference {
            shape: t.shape().to_vec(),
            values: t
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        }
    }
}

/// Largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest magnitude in a slice.
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().map(|x| x.abs()).fold(0.0, f32::max)
}
