//! Running `pp` as processes: training data, reading checkpoints back, and watching (and
//! cleaning up) the processes a test starts.

use std::path::Path;

use pp::checkpoint::read_f32;

use super::cli::{pp, stdout};

/// The settings every multi-process training test shares: steps small enough to compare
/// exactly with one device (clipping on, the file's order); float32 unless a test gives
/// `--dtype` ([`DTYPE_DEFAULT`]).
pub const TRAINING_FLAGS: [&str; 5] = ["--lr", "1e-3", "--max-grad-norm", "0.05", "--no-shuffle"];

/// The training dtype when a test gives none.
pub const DTYPE_DEFAULT: (&str, &str) = ("--dtype", "f32");

/// `args`, then each `(flag, value)` of `defaults` that `args` does not set itself.
pub fn with_defaults(mut args: Vec<String>, defaults: &[(&str, &str)]) -> Vec<String> {
    for (flag, value) in defaults {
        if !args.iter().any(|arg| arg == flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args
}

/// `pp train MODEL` on `data` into `out` with [`TRAINING_FLAGS`], 6 rows a step and 3 steps
/// unless `extra` says otherwise; fails the test if training fails.
pub fn train(model: &str, data: &str, out: &Path, extra: &[&str]) {
    let out = out.display().to_string();
    let mut args: Vec<String> = ["train", model, "--data", data, "--out", &out]
        .into_iter()
        .chain(TRAINING_FLAGS)
        .chain(extra.iter().copied())
        .map(str::to_string)
        .collect();
    args = with_defaults(
        args,
        &[("--batch-size", "6"), ("--steps", "3"), DTYPE_DEFAULT],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stdout(&pp(&args));
}

/// 24 short text rows: every tokenizer in the fixtures can read them.
pub fn text_data(dir: &Path) -> String {
    let rows: String = (0..24)
        .map(|i| format!("{{\"text\": \"row {i}: pipelines move activations forward\"}}\n"))
        .collect();
    let path = dir.join("text.jsonl");
    std::fs::write(&path, rows).unwrap();
    path.display().to_string()
}

/// Every tensor of the checkpoint in `dir`, as float32.
pub fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let files = pp::checkpoint::open(dir).unwrap();
    files
        .weights
        .names()
        .into_iter()
        .map(|name| {
            let shape = files.weights.tensor(&name).unwrap().shape.to_vec();
            let values = read_f32(files.weights.as_ref(), &name, &shape).unwrap();
            (name, values)
        })
        .collect()
}

/// The worker processes the launcher `pid` started, whichever of its threads started them.
pub fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .map(|task| std::fs::read_to_string(task.path().join("children")).unwrap_or_default())
        .collect::<Vec<_>>()
        .join(" ")
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// A launcher this test started: killed (and its workers with it) if the test fails first.
pub struct Launcher(pub Option<std::process::Child>);

impl Launcher {
    pub fn id(&self) -> u32 {
        self.0.as_ref().expect("running").id()
    }

    /// Whether the process has ended.
    pub fn has_exited(&mut self) -> bool {
        self.0
            .as_mut()
            .expect("running")
            .try_wait()
            .unwrap()
            .is_some()
    }

    /// The process, no longer killed on drop.
    pub fn take(&mut self) -> std::process::Child {
        self.0.take().expect("running")
    }

    pub fn wait_with_output(mut self) -> std::process::Output {
        self.0.take().expect("running").wait_with_output().unwrap()
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether process `pid` still runs (not gone, not a zombie).
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|status| !status.contains("zombie"))
}

/// Asserts that two checkpoints hold the same tensors, each within `bound` relative L2.
pub fn assert_same_weights(got: &Path, want: &Path, bound: f64, what: &str) {
    let (got, want) = (weights(got), weights(want));
    assert_eq!(got.len(), want.len(), "{what}");
    for ((n, g), (m, w)) in got.iter().zip(&want) {
        assert_eq!(n, m, "{what}");
        let relative = super::training::relative_l2(g, w);
        assert!(relative <= bound, "{what}: {n} off by {relative:e}");
    }
}
