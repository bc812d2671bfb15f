//! Nodes of a multi-node `pp train`, as processes of this machine: on loopback, or each in a
//! network namespace made by `scripts/netns.sh` (which stands in for a machine behind a
//! shaped link).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::fixture;
use super::processes::Launcher;

/// A UDP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pp train` of llama3-tiny on `data` into `out`, as one node of `nodes` meeting at
/// `rendezvous` (6 rows a step and a 60-second join timeout unless `extra` says otherwise).
pub fn node_args(
    data: &str,
    out: &Path,
    nodes: usize,
    rendezvous: &str,
    extra: &[&str],
) -> Vec<String> {
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
        rendezvous,
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

/// Starts a node with the cluster token, in network namespace `namespace` when given.
pub fn start_node(args: &[String], token: &str, namespace: Option<&str>) -> Launcher {
    let pp = env!("CARGO_BIN_EXE_pp");
    let mut command = match namespace {
        // `ip netns exec` executes pp in place: the process is pp itself.
        Some(namespace) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", namespace, pp]);
            command
        }
        None => Command::new(pp),
    };
    let child = command
        .args(args)
        .env("PP_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Launcher(Some(child))
}

/// Waits for every node, failing the test if they take longer than `limit`.
pub fn finish(nodes: Vec<Launcher>, limit: Duration) -> Vec<Output> {
    let started = Instant::now();
    let outputs: Vec<Output> = nodes.into_iter().map(Launcher::wait_with_output).collect();
    assert!(started.elapsed() < limit, "took {:?}", started.elapsed());
    outputs
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Arguments of a node that trains for long (until stopped).
pub fn long_run_args(data: &str, out: &Path, rendezvous: &str, node_rank: usize) -> Vec<String> {
    let rank = node_rank.to_string();
    node_args(
        data,
        out,
        2,
        rendezvous,
        &[
            "--steps",
            "100000",
            "--batch-size",
            "4",
            "--microbatches",
            "2",
            "--node-rank",
            &rank,
        ],
    )
}

/// Waits until the nodes have trained a few steps into `out`; fails with their stderr if one
/// ends first.
pub fn wait_for_steps(out: &Path, nodes: &mut [&mut Launcher]) {
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

/// Namespaces made by `scripts/netns.sh`, removed on drop.
pub struct Namespaces {
    prefix: String,
    count: usize,
}

impl Namespaces {
    /// `count` namespaces behind links of `rate`, or `None` (saying why) where they cannot be
    /// made here (not root, no `ip`).
    pub fn up(tag: &str, count: usize, rate: &str) -> Option<Self> {
        let prefix = format!("pp{}{tag}", std::process::id() % 100_000);
        let made = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns.sh"))
            .args(["up", &prefix, &count.to_string(), rate])
            .output();
        match made {
            Ok(output) if output.status.success() => Some(Self { prefix, count }),
            Ok(output) => {
                eprintln!(
                    "skipping: cannot make network namespaces here ({})",
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run scripts/netns.sh ({e})");
                None
            }
        }
    }

    /// The namespace of node `i`.
    pub fn name(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// Node `i`'s address.
    pub fn address(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Cuts node `i`'s link, as a pulled cable would.
    pub fn cut(&self, i: usize) {
        let status = Command::new("ip")
            .args(["link", "set", &format!("{}p{i}", self.prefix), "down"])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/netns.sh"))
            .args(["down", &self.prefix, &self.count.to_string()])
            .output();
    }
}
