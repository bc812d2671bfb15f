//! Conversion speed and memory on a synthetic checkpoint larger than 2 GB, next to a plain copy
//! of the same bytes: `cargo bench --bench convert`.
//!
//! The checkpoint is a Llama-architecture model with random bfloat16 weights (hidden 2048,
//! 24 layers, vocabulary 32000: 1.21B parameters, 2.4 GB) in 1 GB safetensors shards. Every run
//! starts from the same state (see `settle`) with the source in the page cache, and ends with its
//! output synced to disk, the copy included; each operation runs `ROUNDS` times, interleaved,
//! and the median is reported. Peak resident memory is the child process's `ru_maxrss`.
//! `PP_BENCH_DIR` chooses where the files go (default: the system temporary directory).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use pp::checkpoint::hf_writer::{plan_shards, write_index, SafetensorsWriter};
use pp::checkpoint::{TensorSink, TensorSpec};
use pp::dtype::DType;

const HIDDEN: usize = 2048;
const INTERMEDIATE: usize = 5632;
const LAYERS: usize = 24;
const HEADS: usize = 16;
const KV_HEADS: usize = 4;
const VOCAB: usize = 32000;

fn main() {
    let root = std::env::var_os("PP_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let work = tempfile::tempdir_in(root).expect("temporary directory");
    let source = work.path().join("hf");
    let bytes = write_synthetic_checkpoint(&source);
    println!(
        "synthetic checkpoint: {:.2} GB in {}",
        bytes as f64 / 1e9,
        source.display()
    );
    // The VM's disk is noisy (write-back at the host), so every operation runs ROUNDS times,
    // interleaved with the others, and the median is reported.
    // The input of the native → * runs, made once.
    let native = work.path().join("native");
    run_pp(&args(&source, &native, &["--stages", "4", "--no-verify"]));
    let copy = work.path().join("copy");
    let ops: [(&str, Option<Vec<String>>); 6] = [
        ("plain copy (std::fs::copy + fsync)", None),
        (
            "HF → native, 4 stages, --no-verify",
            Some(args(
                &source,
                &work.path().join("four"),
                &["--stages", "4", "--no-verify"],
            )),
        ),
        (
            "native → native, re-partition to 2 stages",
            Some(args(
                &native,
                &work.path().join("two"),
                &["--stages", "2", "--no-verify"],
            )),
        ),
        (
            "native → HF, --no-verify",
            Some(args(
                &native,
                &work.path().join("back"),
                &["--to", "hf", "--no-verify"],
            )),
        ),
        (
            "HF → native, cast bf16 → f16, --no-verify",
            Some(args(
                &source,
                &work.path().join("f16"),
                &["--dtype", "f16", "--no-verify"],
            )),
        ),
        (
            "HF → native, 4 stages, with self-check",
            Some(args(
                &source,
                &work.path().join("checked"),
                &["--stages", "4"],
            )),
        ),
    ];
    let mut seconds = vec![Vec::new(); ops.len()];
    let mut peak_rss = vec![0u64; ops.len()];
    for _ in 0..ROUNDS {
        for (i, (_, pp_args)) in ops.iter().enumerate() {
            match pp_args {
                None => {
                    remove(&copy);
                    settle(&[&source]);
                    seconds[i].push(timed(|| plain_copy(&source, &copy)));
                }
                Some(args) => {
                    remove(Path::new(&args[2]));
                    settle(&[Path::new(&args[1])]);
                    let (time, rss) = run_pp(args);
                    seconds[i].push(time);
                    peak_rss[i] = peak_rss[i].max(rss);
                }
            }
        }
    }
    let median = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    let copy_seconds = median(&mut seconds[0].clone());
    println!(
        "| operation | median time ({ROUNDS} runs) | min – max | throughput | speed vs copy | peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, (what, _)) in ops.iter().enumerate() {
        let time = median(&mut seconds[i]);
        let (fastest, slowest) = (seconds[i][0], seconds[i][ROUNDS - 1]);
        println!(
            "| {what} | {time:.2} s | {fastest:.2} – {slowest:.2} s | {:.2} GB/s | {:.2}× | {} |",
            bytes as f64 / 1e9 / time,
            copy_seconds / time,
            if i == 0 {
                "—".to_string()
            } else {
                format!("{} MiB", peak_rss[i] / 1024)
            },
        );
    }
}

const ROUNDS: usize = 5;

fn remove(dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

fn args(from: &Path, to: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "convert".to_string(),
        from.display().to_string(),
        to.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `pp` and returns its wall time and peak resident memory in KiB.
// The child is reaped by `wait4`, which also reports its own peak RSS; `Child::wait` cannot.
#[allow(clippy::zombie_processes)]
fn run_pp(args: &[String]) -> (f64, u64) {
    let start = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_pp"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("pp starts");
    let mut status = 0;
    // SAFETY: plain FFI call on our own child's pid with valid out-pointers; the child is
    // reaped here and never waited on again through `Child`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    assert!(pid > 0 && status == 0, "pp {args:?} failed");
    (seconds, usage.ru_maxrss as u64)
}

fn timed(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn plain_copy(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        std::fs::copy(entry.path(), &target).unwrap();
        std::fs::File::open(&target).unwrap().sync_all().unwrap();
    }
}

/// Puts the machine in the same state before every run: earlier runs' dirty pages flushed (their
/// write-back would slow the next run), the page cache emptied where we may (as root; otherwise
/// reclaiming earlier outputs' pages lands on whichever run comes next), and the run's input
/// read once so that every run starts with it, and only it, cached. (On the development VM,
/// caching 2.4 GB more than the input made a conversion 2-4× slower: the host backs guest
/// memory lazily, so comparisons are only fair with equal amounts cached.)
fn settle(dirs: &[&Path]) {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                let mut file = std::fs::File::open(&path).unwrap();
                std::io::copy(&mut file, &mut std::io::sink()).unwrap();
            }
        }
    }
}

/// Writes the synthetic model; returns its tensor bytes.
fn write_synthetic_checkpoint(dir: &Path) -> u64 {
    std::fs::create_dir(dir).unwrap();
    let (q, kv) = (HIDDEN, KV_HEADS * HIDDEN / HEADS);
    let spec = |name: String, shape: Vec<usize>| TensorSpec {
        name,
        dtype: DType::BF16,
        shape,
    };
    let mut tensors = vec![spec(
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
    )];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        tensors.extend([
            spec(format!("{p}.input_layernorm.weight"), vec![HIDDEN]),
            spec(format!("{p}.self_attn.q_proj.weight"), vec![q, HIDDEN]),
            spec(format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]),
            spec(format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]),
            spec(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, q]),
            spec(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]),
            spec(
                format!("{p}.mlp.gate_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
            ),
            spec(
                format!("{p}.mlp.up_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
            ),
            spec(
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, INTERMEDIATE],
            ),
        ]);
    }
    tensors.push(spec("model.norm.weight".into(), vec![HIDDEN]));
    tensors.push(spec("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    let total = tensors.iter().map(TensorSpec::bytes).sum();

    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut chunk = Vec::new();
    let shards = plan_shards(tensors, 1_000_000_000);
    for (file, layout) in &shards {
        let mut writer = SafetensorsWriter::create(&dir.join(file), layout.clone()).unwrap();
        for tensor in layout {
            writer.begin(&tensor.name).unwrap();
            let mut left = tensor.bytes() as usize / 2;
            while left > 0 {
                let n = left.min(1 << 20);
                chunk.clear();
                for _ in 0..n {
                    // xorshift64: small values, uniform in about ±0.03, never NaN.
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let value = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.06;
                    chunk.extend(half::bf16::from_f32(value).to_le_bytes());
                }
                writer.write(&chunk).unwrap();
                left -= n;
            }
            writer.end().unwrap();
        }
        writer.finish().unwrap();
    }
    write_index(dir, &shards).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    total
}
