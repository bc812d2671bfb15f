//! Nodes of a multi-node `pp train`, as processes of this machine: on loopback, or each in a
//! network namespace made by `scripts/netns.sh` (which stands in for a machine behind a
//! shaped link).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::fixture;
use super::processes::{with_defaults, Launcher, DTYPE_DEFAULT, TRAINING_FLAGS};

/// A UDP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `pp train` of llama3-tiny on `data` into `out`, as one node of `nodes` meeting at
/// `rendezvous`, with the shared training flags (6 rows a step and a 60-second join timeout
/// unless `extra` says otherwise).
pub fn node_args(
    data: &str,
    out: &Path,
    nodes: usize,
    rendezvous: &str,
    extra: &[&str],
) -> Vec<String> {
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    let out = out.display().to_string();
    let nodes = nodes.to_string();
    let args = ["train", &model, "--data", data, "--out", &out]
        .into_iter()
        .chain(TRAINING_FLAGS)
        .chain(["--nnodes", &nodes, "--rdzv", rendezvous])
        .chain(extra.iter().copied())
        .map(str::to_string)
        .collect();
    with_defaults(
        args,
        &[
            ("--batch-size", "6"),
            ("--join-timeout", "60"),
            DTYPE_DEFAULT,
        ],
    )
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

/// Kills a node as its machine dying would: its launcher and its workers at once.
pub fn kill_machine(node: &Launcher) {
    let launcher = node.id();
    for pid in super::processes::children(launcher)
        .into_iter()
        .chain([launcher])
    {
        // SAFETY: killing processes the test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// Two nodes training for long (until stopped), node 0 hosting, each in `namespaces` when
/// given; started and seen to train a few steps.
pub struct LongRun {
    pub node0: Launcher,
    pub node1: Launcher,
    pub out: PathBuf,
}

impl LongRun {
    pub fn start(tmp: &Path, rendezvous: &str, namespaces: Option<&Namespaces>) -> Self {
        let data = super::processes::text_data(tmp);
        let out = tmp.join("run");
        let node = |rank: usize| {
            let args = node_args(
                &data,
                &out,
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
                    &rank.to_string(),
                ],
            );
            let namespace = namespaces.map(|n| n.name(rank));
            start_node(&args, "secret", namespace.as_deref())
        };
        let mut run = Self {
            node0: node(0),
            node1: node(1),
            out,
        };
        run.wait_for_steps();
        run
    }

    /// Waits until the nodes have trained a few steps; fails with their stderr if one ends
    /// first.
    fn wait_for_steps(&mut self) {
        let started = Instant::now();
        let metrics = self.out.join("metrics.jsonl");
        while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
            for node in [&mut self.node0, &mut self.node1] {
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
