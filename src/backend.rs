//! The Burn backends `pp` runs on.

/// The CPU backend: Burn's `ndarray`, which trains about 1.5× faster than `flex` on a small Llama
/// here (benches/cpu_backends.rs, docs/performance.md).
pub type Cpu = burn::backend::NdArray;

/// The CPU backend with automatic differentiation, for training and gradient checks.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
