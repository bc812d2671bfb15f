//! `pp train --nnodes N --rdzv HOST:PORT`, the same command on every node: here the nodes are
//! processes of one machine on loopback (`netns.rs` puts them behind a shaped link). They train
//! what one device trains; a wrong token or other settings are refused on every node; a killed
//! node stops the others within 30 s, naming it; Ctrl-C on one node stops all after one step.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{pp, stdout};
use common::fixture;
use common::processes::{assert_same_weights, children, running, text_data, Launcher};

/// A UDP port free on loopback now.
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pp train` of llama3-tiny on `data` into `out`, as one node of `nodes` (6 rows a step and
/// a 60-second join timeout unless `extra` says otherwise).
fn node_args(data: &str, out: &Path, nodes: usize, port: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        &fixture("llama3-tiny").join("hf").display().to_string(),
        "--data",
        data,
        "--out",
        &out.display().to_string(),
        "--lr",
        "1e-3",
        "--max-grad-norm",
        "0.05",
        "--dtype",
        "f32",
        "--no-shuffle",
        "--nnodes",
        &nodes.to_string(),
        "--rdzv",
        &format!("127.0.0.1:{port}"),
    ]
    .map(str::to_string)
    .to_vec();
    for (flag, default) in [("--batch-size", "6"), ("--join-timeout", "60")] {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), default.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start_node(args: &[String], token: &str) -> Launcher {
    let child = Command::new(env!("CARGO_BIN_EXE_pp"))
        .args(args)
        .env("PP_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Launcher(Some(child))
}

/// Waits for every node, failing the test if one takes longer than `limit`.
fn finish(nodes: Vec<Launcher>, limit: Duration) -> Vec<Output> {
    let started = Instant::now();
    let outputs: Vec<Output> = nodes.into_iter().map(Launcher::wait_with_output).collect();
    assert!(started.elapsed() < limit, "took {:?}", started.elapsed());
    outputs
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn nodes_on_one_machine_train_what_one_device_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let single = tmp.path().join("single");
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    stdout(&pp(&[
        "train",
        &model,
        "--data",
        &data,
        "--out",
        &single.display().to_string(),
        "--batch-size",
        "6",
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--max-grad-norm",
        "0.05",
        "--dtype",
        "f32",
        "--no-shuffle",
        "--micro-batch-size",
        "2",
    ]));
    // Two nodes of one worker each; then three nodes, the first with two workers: ranks
    // follow node ranks, whatever order the nodes start in.
    for (schedule, workers) in [("1f1b", vec!["1", "1"]), ("zbh1", vec!["2", "1", "1"])] {
        let out = tmp.path().join(format!("nodes-{}", workers.len()));
        let port = free_port();
        let mut nodes = Vec::new();
        for (rank, count) in workers.iter().enumerate().rev() {
            let rank = rank.to_string();
            let args = node_args(
                &data,
                &out,
                workers.len(),
                port,
                &[
                    "--steps",
                    "3",
                    "--schedule",
                    schedule,
                    "--microbatches",
                    "4",
                    "--nproc-per-node",
                    count,
                    "--node-rank",
                    &rank,
                ],
            );
            nodes.push(start_node(&args, "secret"));
            std::thread::sleep(Duration::from_millis(300));
        }
        let outputs = finish(nodes, Duration::from_secs(300));
        for output in &outputs {
            assert!(output.status.success(), "{}", stderr(output));
        }
        // Every node prints the same plan.
        let plan = |output: &Output| {
            stderr(output)
                .lines()
                .filter(|line| line.starts_with("  rank "))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let ranks = if workers.len() == 2 { 2 } else { 4 };
        assert_eq!(plan(&outputs[0]).len(), ranks, "{}", stderr(&outputs[0]));
        assert!(outputs.iter().all(|o| plan(o) == plan(&outputs[0])));
        // Node 0 (started last) reports.
        let report = String::from_utf8_lossy(&outputs.last().unwrap().stdout).into_owned();
        assert!(report.contains("trained 3 steps"), "{report}");
        assert_same_weights(
            &out.join("final"),
            &single.join("final"),
            1e-5,
            &format!("{} nodes, {schedule}", workers.len()),
        );
    }
}

#[test]
fn a_wrong_token_or_other_settings_are_refused_on_every_node() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let out = tmp.path().join("run");
    let port = free_port();
    let node0 = node_args(
        &data,
        &out,
        2,
        port,
        &["--steps", "3", "--node-rank", "0", "--join-timeout", "8"],
    );
    let node1 = node_args(&data, &out, 2, port, &["--steps", "3", "--node-rank", "1"]);
    let nodes = vec![start_node(&node0, "secret"), start_node(&node1, "guess")];
    let outputs = finish(nodes, Duration::from_secs(60));
    let (host, guest) = (stderr(&outputs[0]), stderr(&outputs[1]));
    assert!(!outputs[1].status.success());
    assert!(guest.contains("different cluster token"), "{guest}");
    assert!(!outputs[0].status.success());
    assert!(
        host.contains("turned away: 127.0.0.1:") && host.contains("(wrong cluster token)"),
        "{host}"
    );

    let port = free_port();
    let node0 = node_args(&data, &out, 2, port, &["--steps", "3", "--node-rank", "0"]);
    let node1 = node_args(&data, &out, 2, port, &["--steps", "4", "--node-rank", "1"]);
    let nodes = vec![start_node(&node0, "secret"), start_node(&node1, "secret")];
    for output in finish(nodes, Duration::from_secs(60)) {
        let text = stderr(&output);
        assert!(!output.status.success());
        assert!(
            text.contains(
                "was not started like node 0: the length is Steps(4) there, Steps(3) on node 0"
            ),
            "{text}"
        );
        assert!(!text.contains("panicked"), "{text}");
    }
}

/// Two nodes training for long, node 0 hosting.
fn start_long_run(tmp: &Path) -> (Launcher, Launcher) {
    let data = text_data(tmp);
    let out = tmp.join("run");
    let port = free_port();
    let long = [
        "--steps",
        "100000",
        "--batch-size",
        "4",
        "--microbatches",
        "2",
    ];
    let node0 = node_args(
        &data,
        &out,
        2,
        port,
        &[&long[..], &["--node-rank", "0"]].concat(),
    );
    let node1 = node_args(
        &data,
        &out,
        2,
        port,
        &[&long[..], &["--node-rank", "1"]].concat(),
    );
    (start_node(&node0, "secret"), start_node(&node1, "secret"))
}

/// Waits until the nodes have trained a few steps; fails with their stderr if one ends first.
fn wait_for_steps(out: &Path, nodes: &mut [&mut Launcher]) {
    let started = Instant::now();
    let metrics = out.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        for node in nodes.iter_mut() {
            if node.has_exited() {
                let output = node.take().wait_with_output().unwrap();
                panic!("a node ended early: {}", stderr(&output));
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the nodes never trained"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_node_stops_the_others_within_30_s_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut node0, mut node1) = start_long_run(tmp.path());
    wait_for_steps(&tmp.path().join("run"), &mut [&mut node0, &mut node1]);
    // The machine of node 1 dies: its launcher and its worker at once.
    let workers = children(node1.id());
    for pid in workers.iter().chain([node1.id()].iter()) {
        // SAFETY: killing processes this test started.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let killed_at = Instant::now();
    let output = node0.wait_with_output();
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "took {:?}",
        killed_at.elapsed()
    );
    let text = stderr(&output);
    assert!(!output.status.success());
    assert!(
        text.contains("node 1 (") || text.contains("(rank 1)"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
    drop(node1);
}

#[test]
fn ctrl_c_on_one_node_stops_every_node_after_the_same_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut node0, mut node1) = start_long_run(tmp.path());
    let out = tmp.path().join("run");
    wait_for_steps(&out, &mut [&mut node0, &mut node1]);
    let workers = [children(node0.id()), children(node1.id())].concat();
    // SAFETY: interrupting a launcher this test started.
    unsafe { libc::kill(node1.id() as i32, libc::SIGINT) };
    for output in finish(vec![node1, node0], Duration::from_secs(60)) {
        assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    }
    let saved: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(
        saved.len(),
        1,
        "one checkpoint, written by both nodes together"
    );
    for worker in workers {
        assert!(!running(worker), "worker {worker} still runs");
    }
}
