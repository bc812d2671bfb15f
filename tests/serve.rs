//! `pp serve` with a real client: a tiny model is taught two answers (a JSON tool call and a
//! greeting), served, and checked with the official `openai` Python package
//! (`tests/openai_client.py`, which installs it when missing): models, chat, completions,
//! streaming, a tool call, sampling with a seed, concurrent clients, and bad input answered with
//! OpenAI-style errors while the server goes on serving.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use common::cli::{assert_clean_error, pp, stdout};

const KEY: &str = "test-key";

/// Kills the server when the test ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The training output of [`teach_answers`], made once for every test here.
fn taught() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, run) = RUN.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let run = teach_answers(tmp.path());
        (tmp, run)
    });
    run
}

/// Trains the fixture model on two conversations until it answers them exactly.
fn teach_answers(dir: &Path) -> PathBuf {
    let weather = r#"{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Paris\"}}"#;
    let rows: String = (0..16)
        .map(|_| {
            format!(
                "{{\"messages\":[{{\"role\":\"user\",\"content\":\"weather in Paris?\"}},\
                 {{\"role\":\"assistant\",\"content\":\"{weather}\"}}]}}\n\
                 {{\"messages\":[{{\"role\":\"user\",\"content\":\"say hello\"}},\
                 {{\"role\":\"assistant\",\"content\":\"Hello there!\"}}]}}\n"
            )
        })
        .collect();
    let data = dir.join("data.jsonl");
    std::fs::write(&data, rows).unwrap();
    let out = dir.join("run");
    let model = common::fixture("llama3-tiny").join("hf");
    stdout(&pp(&[
        "train",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "150",
        "--lr",
        "5e-3",
        "--batch-size",
        "8",
        "--device",
        "cpu",
    ]));
    out
}

/// Starts `pp serve` on a free port and returns it with its base URL.
fn start_server(run: &Path) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pp"))
        .args([
            "serve",
            run.to_str().unwrap(),
            "--port",
            "0",
            "--device",
            "cpu",
        ])
        .args(["--api-key", KEY, "--model-name", "tiny", "--max-batch", "4"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines
            .next()
            .expect("pp serve exited before listening")
            .unwrap();
        if let Some(url) = line.strip_prefix("serving on ") {
            break url.to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (server, url)
}

#[test]
fn the_openai_client_chats_completes_streams_and_calls_tools() {
    // A training output directory: the server picks its `final`.
    let (_server, url) = start_server(taught());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([url.as_str(), "tiny", KEY])
        .output()
        .expect("python3 runs (the client test needs Python 3)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{printed}");
    assert!(printed.contains("all checks passed"), "{printed}");
}

#[test]
fn eval_scores_tool_calls_as_the_scoring_script_does() {
    let run = taught();
    let tmp = tempfile::tempdir().unwrap();
    // Answered with the Paris call: exact, then valid but not the reference; "say hello" is
    // answered with text: not a call.
    let call = |city: &str| {
        format!(r#"{{\"name\":\"get_weather\",\"arguments\":{{\"city\":\"{city}\"}}}}"#)
    };
    let rows: String = [
        ("weather in Paris?", call("Paris")),
        ("weather in Paris?", call("Rome")),
        ("say hello", call("Paris")),
    ]
    .iter()
    .map(|(question, answer)| {
        format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{question}\"}},\
                 {{\"role\":\"assistant\",\"content\":\"{answer}\"}}]}}\n"
        )
    })
    .collect();
    let data = tmp.path().join("calls.jsonl");
    std::fs::write(&data, rows).unwrap();
    let model = run.join("final");
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    // No --stop: answers end at the chat template's end-of-turn token.
    let common = ["--device", "cpu"];
    let ours = stdout(&pp(&[
        &[
            "eval",
            model,
            "--data",
            data,
            "--task",
            "tool-calls",
            "--json",
            "--tool-call-format",
            "json",
        ][..],
        &common,
    ]
    .concat()));
    let ours: serde_json::Value = serde_json::from_str(ours.trim()).unwrap();
    assert_eq!(ours["rows"], 3);
    assert!(
        (ours["valid_json"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9,
        "{ours}"
    );
    assert!(
        (ours["exact"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{ours}"
    );

    let answers = tmp.path().join("answers.jsonl");
    std::fs::write(
        &answers,
        stdout(&pp(
            &[&["generate", model, "--data", data][..], &common].concat()
        )),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/score_tool_calls.py");
    let theirs = Command::new("python3")
        .arg(script)
        .args([data, answers.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let theirs: serde_json::Value = serde_json::from_str(stdout(&theirs).trim()).unwrap();
    assert_eq!(ours, theirs);
}

#[test]
fn bad_serve_arguments_fail_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().to_str().unwrap();
    assert_clean_error(
        &pp(&["serve", empty, "--latest", "--device", "cpu"]),
        &["--latest", "no checkpoint"],
    );
    assert_clean_error(&pp(&["serve", empty, "--device", "cpu"]), &[empty]);
    let model = common::fixture("llama3-tiny").join("hf");
    let model = model.to_str().unwrap();
    assert_clean_error(
        &pp(&["serve", model, "--max-len", "100000", "--device", "cpu"]),
        &["--max-len", "128"],
    );
    assert_clean_error(&pp(&["serve", model, "--max-batch", "0"]), &["--max-batch"]);
    assert_clean_error(
        &pp(&["serve", model, "--dtype", "bf16", "--device", "cpu"]),
        &["bf16", "f32"],
    );
}
