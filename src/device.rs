//! Which device a command computes on, chosen at run time in one binary: `auto`, `cpu`,
//! `cuda[:N]` or `wgpu[:N]`. A [`DeviceSpec`] is what the user asked for; [`Device::resolve`]
//! checks that it is usable (driver present, index in range) and names it; [`with_backend!`]
//! runs generic code on the matching Burn backend.
//!
//! [`with_backend!`]: crate::with_backend

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// The CPU backend: Burn's `ndarray`, which trains about 1.5× faster than `flex` on a small Llama
/// here (benches/cpu_backends.rs, docs/performance.md).
pub type Cpu = burn::backend::NdArray;

/// The CPU backend with automatic differentiation, for training and gradient checks.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// NVIDIA GPUs through CubeCL's CUDA runtime.
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// Any GPU wgpu drives (Vulkan, Metal, DirectX 12), or Mesa's software Vulkan in CI.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;

/// A device as the user names it on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The first usable NVIDIA GPU, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
    /// wgpu adapter N (in the graphics API's enumeration order).
    Wgpu(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let (kind, index) = match text.split_once(':') {
            Some((kind, index)) => {
                let index = index
                    .parse::<usize>()
                    .map_err(|_| format!("bad device index in `{text}`"))?;
                (kind, Some(index))
            }
            None => (text, None),
        };
        match (kind, index) {
            ("auto", None) => Ok(Self::Auto),
            ("cpu", None) => Ok(Self::Cpu),
            ("cuda", index) => Ok(Self::Cuda(index.unwrap_or(0))),
            ("wgpu", index) => Ok(Self::Wgpu(index.unwrap_or(0))),
            _ => Err(format!(
                "unknown device `{text}` (expected auto, cpu, cuda[:N] or wgpu[:N])"
            )),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Wgpu(i) => write!(f, "wgpu:{i}"),
        }
    }
}

/// Where the work goes, once resolved: the backend and the Burn device to use with it.
#[derive(Debug, Clone)]
pub enum Target {
    /// `ndarray` on the CPU.
    Cpu,
    /// CUDA device by ordinal.
    #[cfg(feature = "cuda")]
    Cuda(usize),
    /// A wgpu adapter.
    #[cfg(feature = "wgpu")]
    Wgpu(burn::backend::wgpu::WgpuDevice),
}

/// A usable device: what it is called and how much memory it has.
#[derive(Debug, Clone)]
pub struct Device {
    /// `cpu`, `cuda:N` or `wgpu:N`.
    pub spec: DeviceSpec,
    /// The hardware's name (`NVIDIA H100 80GB HBM3`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Device memory in bytes, where the driver reports it.
    pub memory: Option<u64>,
    /// The backend and Burn device.
    pub target: Target,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}", self.spec, self.name)?;
        if let Some(bytes) = self.memory {
            write!(f, ", {:.1} GiB", bytes as f64 / (1u64 << 30) as f64)?;
        }
        write!(f, ")")
    }
}

impl Device {
    /// Checks that `spec` can be used here and names it; `auto` becomes the first CUDA GPU when
    /// one is usable, else the CPU.
    pub fn resolve(spec: DeviceSpec) -> Result<Self> {
        match spec {
            DeviceSpec::Auto => Ok(Self::first_cuda().unwrap_or_else(Self::cpu)),
            DeviceSpec::Cpu => Ok(Self::cpu()),
            DeviceSpec::Cuda(index) => Self::cuda(index),
            DeviceSpec::Wgpu(index) => Self::wgpu(index),
        }
    }

    /// What `auto` means for pipeline worker `rank`: CUDA device `rank` modulo their count, so
    /// that the workers of one machine spread over its GPUs, else the CPU.
    pub fn auto_for_rank(rank: usize) -> DeviceSpec {
        match cuda_devices() {
            Ok(count) if count > 0 => DeviceSpec::Cuda(rank % count),
            _ => DeviceSpec::Cpu,
        }
    }

    /// How many CUDA devices this machine has usable (0 without a driver or CUDA support).
    pub fn cuda_count() -> usize {
        cuda_devices().unwrap_or(0)
    }

    fn cpu() -> Self {
        Self {
            spec: DeviceSpec::Cpu,
            name: format!(
                "ndarray, {} threads",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            memory: None,
            target: Target::Cpu,
        }
    }

    fn first_cuda() -> Option<Self> {
        Self::cuda(0).ok()
    }

    /// Whether this device computes on a GPU (device memory is measured there).
    pub fn is_gpu(&self) -> bool {
        !matches!(self.target, Target::Cpu)
    }

    /// Whether the backend computes in bfloat16 natively (else `--dtype bf16` is emulated:
    /// bf16 weights, float32 arithmetic).
    pub fn supports_bf16(&self) -> bool {
        crate::with_backend!(self, |B, device| {
            <B as burn::tensor::backend::Backend>::supports_dtype(
                &device,
                burn::tensor::DType::BF16,
            )
        })
    }

    /// The CUDA ordinal, when this is a CUDA device.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match &self.target {
            #[cfg(feature = "cuda")]
            Target::Cuda(index) => Some(*index),
            _ => None,
        }
    }

    /// Bytes the device's allocator holds now (its pools only grow within a step, so sampled
    /// after a step this is the step's peak, as `torch.cuda.max_memory_reserved` counts it);
    /// `None` on the CPU.
    pub fn memory_reserved(&self) -> Option<u64> {
        match &self.target {
            Target::Cpu => None,
            #[cfg(feature = "cuda")]
            Target::Cuda(index) => {
                use cubecl::Runtime;
                let device = cubecl::cuda::CudaDevice::new(*index);
                let usage = cubecl::cuda::CudaRuntime::client(&device).memory_usage();
                usage.ok().map(|u| u.bytes_reserved)
            }
            #[cfg(feature = "wgpu")]
            Target::Wgpu(device) => {
                use cubecl::Runtime;
                let usage = cubecl::wgpu::WgpuRuntime::client(device).memory_usage();
                usage.ok().map(|u| u.bytes_reserved)
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(index: usize) -> Result<Self> {
        let reason = cuda_devices().err().unwrap_or_default();
        Err(Error::Device(format!("cuda:{index}: {reason}")))
    }

    #[cfg(feature = "cuda")]
    fn cuda(index: usize) -> Result<Self> {
        use cudarc::driver::result as driver;
        let fail = |what: String| Error::Device(format!("cuda:{index}: {what}"));
        let count = cuda_devices().map_err(fail)?;
        if index >= count {
            return Err(fail(format!("there are {count} CUDA device(s)")));
        }
        let handle = driver::device::get(index as i32)
            .map_err(|e| fail(format!("cannot open the device: {e}")))?;
        let name = driver::device::get_name(handle).unwrap_or_else(|_| "NVIDIA GPU".into());
        // SAFETY: `handle` is a valid device from `get` above.
        let memory = unsafe { driver::device::total_mem(handle) }
            .ok()
            .map(|b| b as u64);
        Ok(Self {
            spec: DeviceSpec::Cuda(index),
            name,
            memory,
            target: Target::Cuda(index),
        })
    }

    #[cfg(not(feature = "wgpu"))]
    fn wgpu(index: usize) -> Result<Self> {
        Err(Error::Device(format!(
            "wgpu:{index}: this pp was built without wgpu support (cargo feature `wgpu`)"
        )))
    }

    /// Adapter `index` of the graphics API Burn uses here (Vulkan on Linux, Metal on macOS,
    /// DirectX 12 on Windows), mapped to Burn's device of the same kind and rank.
    #[cfg(feature = "wgpu")]
    fn wgpu(index: usize) -> Result<Self> {
        use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
        use burn::backend::wgpu::WgpuDevice;
        let backend = AutoGraphicsApi::backend();
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: backend.into(),
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let infos: Vec<wgpu::AdapterInfo> =
            futures_lite::future::block_on(instance.enumerate_adapters(backend.into()))
                .iter()
                .map(wgpu::Adapter::get_info)
                .collect();
        let Some(info) = infos.get(index) else {
            let hint = if infos.is_empty() {
                format!(
                    "no {backend:?} adapter found (on Linux without a GPU, Mesa's software \
                     driver provides one: apt-get install mesa-vulkan-drivers libvulkan1)"
                )
            } else {
                format!("there are {} {backend:?} adapter(s)", infos.len())
            };
            return Err(Error::Device(format!("wgpu:{index}: {hint}")));
        };
        // Burn selects adapters by kind and rank within the kind, in the same order.
        let rank = infos[..index]
            .iter()
            .filter(|other| other.device_type == info.device_type)
            .count();
        let device = match info.device_type {
            wgpu::DeviceType::DiscreteGpu => WgpuDevice::DiscreteGpu(rank),
            wgpu::DeviceType::IntegratedGpu => WgpuDevice::IntegratedGpu(rank),
            wgpu::DeviceType::VirtualGpu => WgpuDevice::VirtualGpu(rank),
            wgpu::DeviceType::Cpu => WgpuDevice::Cpu,
            wgpu::DeviceType::Other => WgpuDevice::DefaultDevice,
        };
        Ok(Self {
            spec: DeviceSpec::Wgpu(index),
            name: info.name.clone(),
            memory: None,
            target: Target::Wgpu(device),
        })
    }
}

/// How many CUDA devices there are, once the driver and NVRTC (which compiles pp's kernels)
/// are found and the driver has started; else why not.
#[cfg(feature = "cuda")]
fn cuda_devices() -> std::result::Result<usize, String> {
    use cudarc::driver::result as driver;
    // SAFETY: these only try to load the shared libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("no NVIDIA driver (libcuda) found".into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(
            "CUDA's runtime compiler (libnvrtc) not found; pp compiles its kernels with it".into(),
        );
    }
    // CubeCL's kernels include the CUDA runtime's headers, found as CubeCL finds them.
    let headers = cubecl::cuda::install::cuda_path()
        .map(|path| path.join("include"))
        .filter(|include| include.join("cuda_runtime.h").is_file());
    if headers.is_none() {
        return Err(
            "CUDA's headers (include/cuda_runtime.h) not found: install the CUDA toolkit, \
                    or set CUDA_PATH to it; pp compiles its kernels against them"
                .into(),
        );
    }
    driver::init().map_err(|e| format!("the driver did not start: {e}"))?;
    driver::device::get_count()
        .map(|n| n.max(0) as usize)
        .map_err(|e| format!("cannot count CUDA devices: {e}"))
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices() -> std::result::Result<usize, String> {
    Err("this pp was built without CUDA support (cargo feature `cuda`)".into())
}

/// Runs `$body` with `$B` bound to the Burn backend of `$device` (a [`Device`]) and `$dev` to
/// its Burn device: generic code is compiled once per backend built in, and the choice is made
/// at run time. `$B` is the plain backend; wrap it in `burn::backend::Autodiff` to train.
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$B:ident, $dev:ident| $body:expr) => {
        match &$device.target {
            $crate::device::Target::Cpu => {
                type $B = $crate::device::Cpu;
                let $dev: <$B as burn::tensor::backend::BackendTypes>::Device = Default::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::device::Target::Cuda(index) => {
                type $B = $crate::device::Cuda;
                let $dev = burn::backend::cuda::CudaDevice::new(*index);
                $body
            }
            #[cfg(feature = "wgpu")]
            $crate::device::Target::Wgpu(device) => {
                type $B = $crate::device::Wgpu;
                let $dev = device.clone();
                $body
            }
        }
    };
}
