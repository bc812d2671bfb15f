//! Running the `pp` binary and checking what it prints.

use std::path::PathBuf;
use std::process::{Command, Output};

use super::fixture;

pub fn pp(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pp"))
        .args(args)
        .output()
        .expect("pp runs")
}

pub fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "pp failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Asserts that `pp` failed with exactly one line on stderr that mentions every needle.
pub fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for needle in needles {
        assert!(
            lines[0].contains(needle),
            "`{needle}` missing from: {stderr}"
        );
    }
}

/// A writable copy of a fixture's `hf/` directory.
pub fn copy_model(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name).join("hf")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

/// `(step, value)` of every record of `key` (`train_loss`, `val_loss`, …) in a training run's
/// `OUT/metrics.jsonl`.
pub fn metric(out: &std::path::Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some((v["step"].as_u64()?, v.get(key)?.as_f64()?)))
        .collect()
}
