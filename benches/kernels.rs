//! Peak memory and time of each kernel's forward + backward against the plain composition it
//! replaces (`pp::kernels::reference` for attention and the head loss, the modules' own
//! compositions for RMSNorm, the rotary embedding and SwiGLU), at shapes where the
//! composition's whole score matrix or logits dominate. Each measurement runs in a child process so that allocator pools start
//! empty: the device's reserved bytes (wgpu, CUDA) or the process's peak resident memory (CPU)
//! after the run, less the same figure once the inputs exist.
//!
//! Run: `cargo bench --bench kernels -- [--device cpu|wgpu|cuda] [--seq 1024] [--vocab 32000]
//! [--only attention,head_loss,rms_norm,rotary,swiglu]`

use std::process::Command;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::{Bool, Distribution, Int, Tensor};
use pp::device::{Device, DeviceSpec};
use pp::kernels::{reference, AttentionSpec, Kernels};
use pp::model::loss::Targets;

/// Attention: one row, Llama-style heads (8 query, 2 key/value, 64 wide).
const HEADS: usize = 8;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
/// Head loss: hidden size.
const HIDDEN: usize = 512;
/// RMSNorm and SwiGLU: Llama-2-7B's hidden and intermediate sizes.
const NORM_HIDDEN: usize = 4096;
const INTERMEDIATE: usize = 11008;
/// Timed repetitions after one warm-up (which also compiles the device's kernels).
const REPEATS: usize = 3;

/// Every kernel the benchmark measures.
const KERNELS: [&str; 5] = ["attention", "head_loss", "rms_norm", "rotary", "swiglu"];

struct Args {
    device: DeviceSpec,
    seq: usize,
    vocab: usize,
    only: Vec<String>,
}

fn parse(args: &[String]) -> Args {
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    Args {
        device: value("--device")
            .map(|d| d.parse().expect("--device cpu|wgpu[:N]|cuda[:N]"))
            .unwrap_or(DeviceSpec::Wgpu(0)),
        seq: value("--seq").map_or(1024, |s| s.parse().expect("--seq N")),
        vocab: value("--vocab").map_or(32000, |s| s.parse().expect("--vocab N")),
        only: value("--only").map_or_else(
            || KERNELS.map(String::from).to_vec(),
            |list| list.split(',').map(String::from).collect(),
        ),
    }
}

/// Bytes in use: the allocator's reserve on a GPU, the peak resident set on the CPU.
fn memory(device: &Device) -> u64 {
    device.memory_reserved().unwrap_or_else(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    })
}

/// Runs one measurement and prints `bytes milliseconds`.
fn child(kernel: &str, fused: bool, args: &Args) {
    let device = Device::resolve(args.device).expect("device");
    let (bytes, ms) = pp::with_backend!(device, |B, dev| match kernel {
        "attention" => attention::<B>(fused, args.seq, &dev, &device),
        "head_loss" => head_loss::<B>(fused, args.seq, args.vocab, &dev, &device),
        "rms_norm" => rms_norm::<B>(fused, args.seq, &dev, &device),
        "rotary" => rotary::<B>(fused, args.seq, &dev, &device),
        "swiglu" => swiglu::<B>(fused, args.seq, &dev, &device),
        other => panic!("unknown kernel {other}"),
    });
    println!("{bytes} {ms}");
}

/// Times `step` (forward + backward, read back) and measures the memory it adds to `base`.
fn measure(device: &Device, base: u64, mut step: impl FnMut()) -> (u64, f64) {
    step();
    let start = Instant::now();
    for _ in 0..REPEATS {
        step();
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / REPEATS as f64;
    (memory(device).saturating_sub(base), ms)
}

fn attention<B: Kernels>(fused: bool, seq: usize, dev: &B::Device, device: &Device) -> (u64, f64) {
    type A<X> = Autodiff<X>;
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let q = Tensor::<B, 4>::random([1, HEADS, seq, HEAD_DIM], uniform, dev);
    let k = Tensor::<B, 4>::random([1, KV_HEADS, seq, HEAD_DIM], uniform, dev);
    let v = Tensor::<B, 4>::random([1, KV_HEADS, seq, HEAD_DIM], uniform, dev);
    let documents = Tensor::<B, 2, Int>::zeros([1, seq], dev);
    let scale = (HEAD_DIM as f64).powf(-0.5);
    let spec = AttentionSpec::new(documents, None, scale, HEADS);
    // The composition's dense mask is one of its inputs, made before the baseline.
    let blocked = (!fused).then(|| {
        Tensor::<A<B>, 4, Bool>::from_inner(spec.blocked(0, seq).reshape([1, 1, seq, seq]))
    });
    let spec = spec.to_autodiff::<A<B>>();
    let base = memory(device);
    measure(device, base, || {
        let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
        let out = match &blocked {
            None => A::<B>::flash_attention(ql.clone(), kl, vl, &spec),
            Some(mask) => reference::attention(ql.clone(), kl, vl, mask.clone(), scale),
        };
        let grads = out.sum().backward();
        let _ = ql.grad(&grads).unwrap().into_data();
    })
}

fn head_loss<B: Kernels>(
    fused: bool,
    tokens: usize,
    vocab: usize,
    dev: &B::Device,
    device: &Device,
) -> (u64, f64) {
    type A<X> = Autodiff<X>;
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let hidden = Tensor::<B, 2>::random([tokens, HIDDEN], uniform, dev);
    let weight = Tensor::<B, 2>::random([vocab, HIDDEN], uniform, dev) * 0.05;
    let labels: Vec<i64> = (0..tokens).map(|i| (i * 7919 % vocab) as i64).collect();
    let targets = Targets::from_labels(&labels, 1, tokens);
    let device_targets = targets.to_device::<B>(vocab, dev).to_autodiff::<A<B>>();
    let base = memory(device);
    measure(device, base, || {
        let (h, w) = (leaf(&hidden), leaf(&weight));
        let loss = if fused {
            A::<B>::head_loss(h.clone(), w.clone(), &device_targets)
        } else {
            reference::head_loss(h.clone(), w.clone(), &targets, 1, tokens)
        };
        let grads = loss.backward();
        let _ = h.grad(&grads).unwrap().into_data();
        let _ = w.grad(&grads).unwrap().into_data();
    })
}

/// A float leaf of the autodiff graph that wants a gradient.
fn leaf<B: Kernels, const D: usize>(t: &Tensor<B, D>) -> Tensor<Autodiff<B>, D> {
    Tensor::from_inner(t.clone()).require_grad()
}

fn rms_norm<B: Kernels>(fused: bool, seq: usize, dev: &B::Device, device: &Device) -> (u64, f64) {
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let x = Tensor::<B, 3>::random([1, seq, NORM_HIDDEN], uniform, dev);
    let weight = Tensor::<B, 1>::random([NORM_HIDDEN], uniform, dev);
    let base = memory(device);
    measure(device, base, || {
        let (xl, wl) = (leaf(&x), leaf(&weight));
        let out = if fused {
            Autodiff::<B>::rms_norm(xl.clone(), wl.clone(), 1e-5)
        } else {
            pp::kernels::norm::forward(xl.clone(), wl.clone(), 1e-5)
        };
        let grads = out.sum().backward();
        let _ = xl.grad(&grads).unwrap().into_data();
        let _ = wl.grad(&grads).unwrap().into_data();
    })
}

fn rotary<B: Kernels>(fused: bool, seq: usize, dev: &B::Device, device: &Device) -> (u64, f64) {
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let q = Tensor::<B, 4>::random([1, HEADS, seq, HEAD_DIM], uniform, dev);
    let angles = Tensor::<B, 4>::random([1, 1, seq, HEAD_DIM / 2], uniform, dev);
    let angles = Tensor::cat(vec![angles.clone(), angles], 3);
    let cos = Tensor::<Autodiff<B>, 4>::from_inner(angles.clone().cos());
    let sin = Tensor::<Autodiff<B>, 4>::from_inner(angles.sin());
    let base = memory(device);
    measure(device, base, || {
        let ql = leaf(&q);
        let out = if fused {
            Autodiff::<B>::rotary(ql.clone(), cos.clone(), sin.clone())
        } else {
            pp::kernels::rotary::forward(ql.clone(), cos.clone(), sin.clone())
        };
        let grads = out.sum().backward();
        let _ = ql.grad(&grads).unwrap().into_data();
    })
}

fn swiglu<B: Kernels>(fused: bool, seq: usize, dev: &B::Device, device: &Device) -> (u64, f64) {
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let gate = Tensor::<B, 3>::random([1, seq, INTERMEDIATE], uniform, dev);
    let up = Tensor::<B, 3>::random([1, seq, INTERMEDIATE], uniform, dev);
    let base = memory(device);
    measure(device, base, || {
        let (gl, ul) = (leaf(&gate), leaf(&up));
        let out = if fused {
            Autodiff::<B>::swiglu(gl.clone(), ul.clone())
        } else {
            pp::kernels::swiglu::forward(gl.clone(), ul.clone())
        };
        let grads = out.sum().backward();
        let _ = gl.grad(&grads).unwrap().into_data();
        let _ = ul.grad(&grads).unwrap().into_data();
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = parse(&args);
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], args[i + 2] == "fused", &parsed);
        return;
    }
    let device = Device::resolve(parsed.device).expect("device");
    println!(
        "device {device}; attention: 1 x {HEADS} heads ({KV_HEADS} kv) x {} tokens x {HEAD_DIM}; \
         head loss: {} tokens x {HIDDEN} -> vocab {}; rms_norm: {} x {NORM_HIDDEN}; rotary: \
         the attention's queries; swiglu: {} x {INTERMEDIATE}; forward + backward, mean of \
         {REPEATS}",
        parsed.seq, parsed.seq, parsed.vocab, parsed.seq, parsed.seq
    );
    println!("| kernel | variant | memory added | ms |");
    println!("| --- | --- | ---: | ---: |");
    let exe = std::env::current_exe().expect("own path");
    for kernel in parsed.only.iter().map(String::as_str) {
        for variant in ["composition", "fused"] {
            let out = Command::new(&exe)
                .args(&args)
                .args(["--child", kernel, variant])
                .output()
                .expect("child run");
            let text = String::from_utf8_lossy(&out.stdout);
            let mut fields = text.split_whitespace();
            let (Some(bytes), Some(ms)) = (fields.next(), fields.next()) else {
                eprintln!(
                    "{kernel} {variant} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                continue;
            };
            let bytes: u64 = bytes.parse().unwrap_or(0);
            let ms: f64 = ms.parse().unwrap_or(f64::NAN);
            println!(
                "| {kernel} | {variant} | {} | {ms:.1} |",
                pp::plan::human_bytes(bytes)
            );
        }
    }
}
