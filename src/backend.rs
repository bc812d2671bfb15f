//! The Burn backends `pp` runs on.

/// The CPU backend: Burn's `flex` (faster than `ndarray` here; see docs/performance.md).
pub type Cpu = burn::backend::Flex;

/// The CPU backend with automatic differentiation, for training and gradient checks.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;
