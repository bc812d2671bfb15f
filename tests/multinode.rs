//! `pp train --nnodes N --rdzv HOST:PORT`, the same command on every node: here the nodes are
//! processes of one machine on loopback (`netns.rs` puts them behind a shaped link). They train
//! what one device trains; a wrong token or other settings are refused on every node; a killed
//! node stops the others within 30 s, naming it; Ctrl-C on one node stops all after one step.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::fixture;
use common::nodes::{finish, free_port, kill_machine, node_args, start_node, stderr, LongRun};
use common::processes::{assert_same_weights, children, running, text_data, train};

fn loopback(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

#[test]
fn nodes_on_one_machine_train_what_one_device_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let single = tmp.path().join("single");
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    train(&model, &data, &single, &["--micro-batch-size", "2"]);
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
                &loopback(port),
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
            nodes.push(start_node(&args, "secret", None));
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
        &loopback(port),
        &["--steps", "3", "--node-rank", "0", "--join-timeout", "8"],
    );
    let node1 = node_args(
        &data,
        &out,
        2,
        &loopback(port),
        &["--steps", "3", "--node-rank", "1"],
    );
    let nodes = vec![
        start_node(&node0, "secret", None),
        start_node(&node1, "guess", None),
    ];
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
    let node0 = node_args(
        &data,
        &out,
        2,
        &loopback(port),
        &["--steps", "3", "--node-rank", "0"],
    );
    let node1 = node_args(
        &data,
        &out,
        2,
        &loopback(port),
        &["--steps", "4", "--node-rank", "1"],
    );
    let nodes = vec![
        start_node(&node0, "secret", None),
        start_node(&node1, "secret", None),
    ];
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

#[test]
fn a_killed_node_stops_the_others_within_30_s_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let LongRun { node0, node1, .. } = LongRun::start(tmp.path(), &loopback(free_port()), None);
    kill_machine(&node1);
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
    let LongRun { node0, node1, out } = LongRun::start(tmp.path(), &loopback(free_port()), None);
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

/// `pp ctl ACTION` against the rendezvous, with `token`.
fn ctl(rendezvous: &str, action: &str, token: &str) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pp"))
        .args(["ctl", action, "--rdzv", rendezvous])
        .env("PP_TOKEN", token)
        .output()
        .unwrap()
}

fn checkpoints(out: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("step-"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits up to `limit` for `condition`.
fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn pp_ctl_reports_saves_and_stops_a_run_from_outside() {
    let tmp = tempfile::tempdir().unwrap();
    let rendezvous = loopback(free_port());
    let LongRun {
        mut node0,
        mut node1,
        out,
    } = LongRun::start(tmp.path(), &rendezvous, None);

    let status = ctl(&rendezvous, "status", "secret");
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        text.contains(": running") && text.contains("rank 1: node 1 ("),
        "{text}"
    );
    assert!(
        eventually(Duration::from_secs(10), || {
            let status = ctl(&rendezvous, "status", "secret");
            let text = String::from_utf8_lossy(&status.stdout).into_owned();
            text.contains("compute per rank") && text.contains("links 0→1 ")
        }),
        "the status never showed progress and link rates"
    );
    let refused = ctl(&rendezvous, "status", "guess");
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("different cluster token"),
        "{}",
        stderr(&refused)
    );

    // One checkpoint, written by both nodes at the same step; training goes on.
    assert!(ctl(&rendezvous, "save", "secret").status.success());
    assert!(eventually(Duration::from_secs(30), || checkpoints(&out)
        .len()
        == 1));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(checkpoints(&out).len(), 1, "{:?}", checkpoints(&out));
    assert!(!node0.has_exited() && !node1.has_exited());

    let stop = ctl(&rendezvous, "stop", "secret");
    assert!(stop.status.success(), "{}", stderr(&stop));
    for output in finish(vec![node0, node1], Duration::from_secs(60)) {
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(stderr(&output).contains("stopped by pp ctl from 127.0.0.1"));
    }
    assert_eq!(checkpoints(&out).len(), 2, "the stop saved too");
}

#[test]
fn pp_ctl_abort_ends_every_node_without_saving() {
    let tmp = tempfile::tempdir().unwrap();
    let rendezvous = loopback(free_port());
    let LongRun { node0, node1, out } = LongRun::start(tmp.path(), &rendezvous, None);
    assert!(ctl(&rendezvous, "abort", "secret").status.success());
    for output in finish(vec![node0, node1], Duration::from_secs(20)) {
        assert!(!output.status.success());
        assert!(
            stderr(&output).contains("aborted by pp ctl from 127.0.0.1"),
            "{}",
            stderr(&output)
        );
    }
    assert!(checkpoints(&out).is_empty());
}

#[test]
fn a_lost_node_that_comes_back_rejoins_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let out = tmp.path().join("run");
    let rendezvous = loopback(free_port());
    let args = |rank: &str| {
        node_args(
            &data,
            &out,
            2,
            &rendezvous,
            &[
                "--steps",
                "24",
                "--batch-size",
                "4",
                "--microbatches",
                "2",
                "--save-every",
                "4",
                "--max-restarts",
                "1",
                "--node-rank",
                rank,
            ],
        )
    };
    let node0 = start_node(&args("0"), "secret", None);
    let node1 = start_node(&args("1"), "secret", None);
    assert!(
        eventually(Duration::from_secs(120), || !checkpoints(&out).is_empty()),
        "no checkpoint"
    );
    // Node 1's machine dies, and comes back with the same command.
    kill_machine(&node1);
    drop(node1);
    let node1 = start_node(&args("1"), "secret", None);
    let outputs = finish(vec![node0, node1], Duration::from_secs(180));
    for output in &outputs {
        assert!(
            output.status.success(),
            "node 0: {}\nnode 1: {}",
            stderr(&outputs[0]),
            stderr(&outputs[1])
        );
    }
    let host = stderr(&outputs[0]);
    assert!(
        host.contains("forming the group again (restart 1 of 1)"),
        "{host}"
    );
    assert!(host.contains("resumed from "), "{host}");
    let report = String::from_utf8_lossy(&outputs[0].stdout).into_owned();
    assert!(report.contains("trained 24 steps"), "{report}");
    // Resuming is exact: the weights are those of one device training straight through.
    let single = tmp.path().join("single");
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    train(
        &model,
        &data,
        &single,
        &[
            "--batch-size",
            "4",
            "--steps",
            "24",
            "--micro-batch-size",
            "2",
        ],
    );
    assert_same_weights(
        &out.join("final"),
        &single.join("final"),
        1e-4,
        "after a restart",
    );
}

/// `scripts/slurm/train.sbatch` run as Slurm would on a two-node allocation: stand-ins for
/// `srun` (one task per node, `SLURM_NODEID` set) and `scontrol` (the node list) on `PATH`.
#[test]
fn the_slurm_script_trains_across_the_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let write_tool = |name: &str, body: &str| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    };
    write_tool("scontrol", "echo 127.0.0.1; echo 127.0.0.1");
    write_tool(
        "srun",
        r#"shift  # --kill-on-bad-exit=1
for node in 0 1; do SLURM_NODEID=$node "$@" & done
status=0; for job in $(jobs -p); do wait "$job" || status=1; done; exit $status"#,
    );
    let out = tmp.path().join("run");
    let output = std::process::Command::new(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/train.sbatch"),
    )
    .args([
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--microbatches",
        "2",
        "--dtype",
        "f32",
    ])
    .env(
        "PATH",
        format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
    )
    .env("SLURM_JOB_NODELIST", "n[1-2]")
    .env("SLURM_NNODES", "2")
    .env("PP", env!("CARGO_BIN_EXE_pp"))
    .env("MODEL", fixture("llama3-tiny").join("hf"))
    .env("DATA", &data)
    .env("OUT", &out)
    .output()
    .unwrap();
    assert!(
        output.status.success(),
        "{:?}: {}",
        output.status,
        stderr(&output)
    );
    assert!(out.join("final").join("manifest.json").is_file() || out.join("final").is_dir());
    assert!(
        stderr(&output).contains("rank 1: node 1 ("),
        "{}",
        stderr(&output)
    );
}

/// Node 0 and node 1 on loopback, each with `flags` of its rank after the common ones and
/// `--steps 3`, writing to `out`; their outputs once both have ended (within `limit`).
fn two_nodes(
    data: &str,
    out: &std::path::Path,
    limit: Duration,
    flags: impl Fn(usize) -> Vec<&'static str>,
) -> Vec<Output> {
    let rendezvous = loopback(free_port());
    let nodes = (0..2)
        .map(|rank| {
            let rank_flag = rank.to_string();
            let mut extra = vec!["--steps", "3", "--node-rank", &rank_flag];
            extra.extend(flags(rank));
            start_node(
                &node_args(data, out, 2, &rendezvous, &extra),
                "secret",
                None,
            )
        })
        .collect();
    finish(nodes, limit)
}

#[test]
fn plan_only_prints_the_plan_on_every_node_and_trains_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let out = tmp.path().join("run");
    let flags = |_| {
        vec![
            "--plan-only",
            "--microbatches",
            "4",
            "--nproc-per-node",
            "2",
        ]
    };
    for output in two_nodes(&data, &out, Duration::from_secs(60), flags) {
        let text = stderr(&output);
        assert!(output.status.success(), "{text}");
        assert!(text.contains("plan: 2 nodes, 4 workers"), "{text}");
        assert!(
            text.contains("rank 3: node 1 (") && text.contains("(layer 3 + head)"),
            "{text}"
        );
    }
    assert!(!out.join("final").exists());
}

#[test]
fn split_places_the_layers_and_the_plan_gives_the_expected_step() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let out = tmp.path().join("run");
    let limit = Duration::from_secs(60);
    for output in two_nodes(&data, &out, limit, |_| vec!["--plan-only", "--split", "3"]) {
        let text = stderr(&output);
        assert!(output.status.success(), "{text}");
        assert!(text.contains("(as --split gives); expected "), "{text}");
        // Node 1 timed its link to node 0; the expected step counts the transfers over it.
        assert!(
            text.contains("links to node 0, counted in the step: node 1 "),
            "{text}"
        );
        assert!(
            text.contains("stage 0 (embedding + layers 0-2); busy "),
            "{text}"
        );
        assert!(text.contains("stage 1 (layer 3 + head); busy "), "{text}");
    }
    // A split beyond the model's layers is refused on every node, before training.
    for output in two_nodes(&data, &out, limit, |_| vec!["--split", "5"]) {
        let text = stderr(&output);
        assert!(!output.status.success());
        assert!(text.contains("error: --split"), "{text}");
    }
    assert!(!out.join("final").exists());
}

#[test]
fn unlike_devices_are_measured_and_placed_by_speed_the_same_on_every_node() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let out = tmp.path().join("run");
    let device = ["cpu", "wgpu"];
    let flags = |rank: usize| vec!["--max-len", "32", "--plan-only", "--device", device[rank]];
    let outputs = two_nodes(&data, &out, Duration::from_secs(240), flags);
    let plan = |output: &Output| {
        let text = stderr(output);
        assert!(output.status.success(), "{text}");
        assert!(
            text.contains("(placed by measured speed); expected "),
            "{text}"
        );
        text.lines()
            .filter(|line| line.starts_with("plan: ") || line.starts_with("  rank "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let plans: Vec<_> = outputs.iter().map(plan).collect();
    assert_eq!(plans[0].len(), 3, "{:?}", plans[0]);
    assert_eq!(plans[0], plans[1]);
    assert!(plans[0][1].contains("cpu (ndarray") && plans[0][2].contains("wgpu:0"));
}

/// Node 1 has neither the model nor the data, and no directory in common with node 0: it
/// receives node 0's description of the model, only the weights its worker loads (node 0's
/// native checkpoint is cut as the plan cuts it), and the data, checked; node 0 gathers every
/// checkpoint and the final model. Run again with --resume, node 1 takes the model from its
/// cache and receives only its share of the checkpoint, and the run continues exactly.
#[test]
fn a_node_without_the_files_receives_them_and_node_0_gathers_the_checkpoints() {
    let apart = Apart::new();
    let (_, received) = apart.run(&[]);
    assert!(
        received.contains("received model/stage-001.bin from node 0")
            && received.contains("received model/manifest.json")
            && received.contains("received data/text.jsonl")
            && received.contains("checksum verified"),
        "{received}"
    );
    assert!(!received.contains("model/stage-000.bin"), "{received}");
    let out = apart.out(0);
    assert_same_weights(&out.join("final"), &apart.single(), 1e-5, "gathered");
    assert_eq!(checkpoints(&out), ["step-2", "step-4"]);
    for file in ["stage-001.bin", "optimizer-001.safetensors", "trainer.json"] {
        assert!(
            out.join("checkpoints/step-2").join(file).is_file(),
            "{file}"
        );
    }
    // Node 1 keeps no share of what node 0 now holds.
    let theirs = apart.out(1);
    assert!(!theirs.join("final").exists() && checkpoints(&theirs).is_empty());

    // Resume from step 2 on node 0's side: node 1 fetches only its share of it.
    std::fs::remove_dir_all(out.join("checkpoints/step-4")).unwrap();
    let first_final = apart.tmp.path().join("first-final");
    std::fs::rename(out.join("final"), &first_final).unwrap();
    let (host, received) = apart.run(&["--resume"]);
    assert!(host.contains("resumed from "), "{host}");
    assert!(!received.contains("received model/"), "{received}");
    assert!(
        received.contains("received checkpoint/step-2/stage-001.bin")
            && received.contains("received checkpoint/step-2/optimizer-001.safetensors"),
        "{received}"
    );
    assert!(
        !received.contains("checkpoint/step-2/stage-000.bin"),
        "{received}"
    );
    assert_same_weights(
        &out.join("final"),
        &first_final,
        1e-6,
        "resumed on two nodes",
    );
}

/// `--data-parallel 2 --fsdp` across two nodes with no directory in common, one replica each:
/// the plan says so on both; node 0 gathers the weights and both replicas' optimizer shards of
/// every checkpoint, and the final model equals one device's. Resumed from step 2, node 1
/// receives the shards and the run continues exactly.
#[test]
fn fsdp_replicas_on_two_nodes_train_what_one_device_trains_and_resume() {
    let apart = Apart::new();
    let fsdp = ["--data-parallel", "2", "--fsdp"];
    let (host, received) = apart.run(&fsdp);
    for plan in [&host, &received] {
        assert!(plan.contains("1 workers × 2 replicas (FSDP)"), "{plan}");
    }
    let out = apart.out(0);
    assert_same_weights(
        &out.join("final"),
        &apart.single(),
        1e-5,
        "FSDP on two nodes",
    );
    for shard in ["000", "001"] {
        let file = format!("checkpoints/step-2/optimizer-000.shard-{shard}-of-002.safetensors");
        assert!(out.join(&file).is_file(), "{file}");
    }
    let theirs = apart.out(1);
    assert!(!theirs.join("final").exists() && checkpoints(&theirs).is_empty());

    std::fs::remove_dir_all(out.join("checkpoints/step-4")).unwrap();
    let first_final = apart.tmp.path().join("first-final");
    std::fs::rename(out.join("final"), &first_final).unwrap();
    let mut resume = fsdp.to_vec();
    resume.push("--resume");
    let (host, received) = apart.run(&resume);
    assert!(host.contains("resumed from "), "{host}");
    assert!(
        received.contains("received checkpoint/step-2/optimizer-000.shard-001-of-002"),
        "{received}"
    );
    assert_same_weights(
        &out.join("final"),
        &first_final,
        1e-6,
        "FSDP resumed on two nodes",
    );
}

/// Two replicas of a two-stage pipeline on two nodes apart, node 0 with one worker and node 1
/// with three: the first replica spans both nodes, so node 1 sends its stage's files of every
/// checkpoint; the second sends nothing. The final model equals one device's, and node 1 keeps
/// no staging directory.
#[test]
fn replicas_of_a_pipeline_across_two_nodes_train_what_one_device_trains() {
    let apart = Apart::new();
    let (host, _) = apart.run_with(
        &["--stages", "2", "--data-parallel", "2"],
        &["--nproc-per-node", "3"],
    );
    assert!(host.contains("2 workers × 2 replicas"), "{host}");
    let out = apart.out(0);
    assert_same_weights(
        &out.join("final"),
        &apart.single(),
        1e-5,
        "DDP on two nodes",
    );
    for file in ["stage-001.bin", "optimizer-001.safetensors"] {
        assert!(
            out.join("checkpoints/step-4").join(file).is_file(),
            "{file}"
        );
    }
    let theirs = apart.out(1);
    assert_no_staging_left(&theirs);
}

/// With --save-on-each-node each node keeps its own share of every checkpoint (a whole
/// checkpoint's description, its own stages' weights and optimizer state); the final model is
/// still gathered on node 0. Resuming takes the newest checkpoint every node holds: here node
/// 1 lost its newest.
#[test]
fn with_save_on_each_node_each_keeps_its_share_and_resumes_from_one_all_hold() {
    let apart = Apart::new();
    apart.run(&["--save-on-each-node"]);
    for (node, (own, other)) in [(0, (0, 1)), (1, (1, 0))] {
        let out = apart.out(node);
        assert_eq!(checkpoints(&out), ["step-2", "step-4"], "node {node}");
        let step = out.join("checkpoints/step-2");
        for file in [
            format!("stage-{own:03}.bin"),
            format!("optimizer-{own:03}.safetensors"),
            "manifest.json".into(),
            "trainer.json".into(),
        ] {
            assert!(step.join(&file).is_file(), "node {node}: {file}");
        }
        assert!(!step.join(format!("stage-{other:03}.bin")).exists());
        assert_eq!(
            std::fs::read(step.join("manifest.json")).unwrap(),
            std::fs::read(apart.out(0).join("checkpoints/step-2/manifest.json")).unwrap()
        );
    }
    let out = apart.out(0);
    assert_same_weights(&out.join("final"), &apart.single(), 1e-5, "final gathered");

    std::fs::remove_dir_all(apart.out(1).join("checkpoints/step-4")).unwrap();
    let first_final = apart.tmp.path().join("first-final");
    std::fs::rename(out.join("final"), &first_final).unwrap();
    let (host, _) = apart.run(&["--save-on-each-node", "--resume"]);
    assert!(
        host.contains("resumed from ") && host.contains("step-2"),
        "{host}"
    );
    assert_same_weights(
        &out.join("final"),
        &first_final,
        1e-6,
        "resumed from shares",
    );
}

/// Two workers on node 1 each send their own share of every checkpoint to node 0.
#[test]
fn two_workers_away_from_node_0_each_send_their_share() {
    let apart = Apart::new();
    let (_, received) = apart.run_with(&[], &["--nproc-per-node", "2"]);
    // Three stages do not match node 0's two: node 1 receives the whole model.
    assert!(
        received.contains("received model/stage-000.bin"),
        "{received}"
    );
    let out = apart.out(0);
    assert_same_weights(
        &out.join("final"),
        &apart.single(),
        1e-5,
        "three ranks, two nodes",
    );
    for file in [
        "stage-001.bin",
        "stage-002.bin",
        "optimizer-002.safetensors",
    ] {
        assert!(
            out.join("checkpoints/step-4").join(file).is_file(),
            "{file}"
        );
    }
    // Node 1's staging directories are gone.
    let theirs = apart.out(1);
    assert_no_staging_left(&theirs);
}

/// Asserts that the node whose output directory is `out` kept nothing of the checkpoints it
/// sent to node 0 (no staging directory either).
fn assert_no_staging_left(out: &std::path::Path) {
    let left: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// Two nodes on loopback with no directory in common: node 0 holds a native copy of the
/// model cut in two stages and the data, node 1 names paths it does not have.
struct Apart {
    tmp: tempfile::TempDir,
}

impl Apart {
    const FLAGS: [&str; 6] = ["--steps", "4", "--save-every", "2", "--microbatches", "2"];

    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let apart = Self { tmp };
        let here = apart.dir(0);
        std::fs::create_dir_all(&here).unwrap();
        text_data(&here);
        let source = fixture("llama3-tiny").join("hf");
        let convert = std::process::Command::new(env!("CARGO_BIN_EXE_pp"))
            .args(["convert", &source.display().to_string()])
            .arg(here.join("model"))
            .args(["--stages", "2"])
            .output()
            .unwrap();
        assert!(convert.status.success(), "{}", stderr(&convert));
        apart
    }

    fn dir(&self, node: usize) -> std::path::PathBuf {
        self.tmp.path().join(format!("node{node}"))
    }

    fn out(&self, node: usize) -> std::path::PathBuf {
        self.dir(node).join("out")
    }

    /// The same training on one device: its final model.
    fn single(&self) -> std::path::PathBuf {
        let single = self.tmp.path().join("single");
        if !single.join("final").exists() {
            let model = self.dir(0).join("model").display().to_string();
            let data = self.dir(0).join("text.jsonl").display().to_string();
            let mut flags = Self::FLAGS.to_vec();
            flags.extend(["--micro-batch-size", "3"]);
            train(&model, &data, &single, &flags);
        }
        single.join("final")
    }

    /// Both nodes with `extra`; each one's stderr once both succeeded.
    fn run(&self, extra: &[&str]) -> (String, String) {
        self.run_with(extra, &[])
    }

    /// Both nodes with `extra`, node 1 also with `node1`.
    fn run_with(&self, extra: &[&str], node1: &[&str]) -> (String, String) {
        let rendezvous = loopback(free_port());
        let nodes = (0..2)
            .map(|rank| {
                let dir = self.dir(rank);
                let cache = dir.join("cache").display().to_string();
                let rank_flag = rank.to_string();
                let mut flags = vec!["--node-rank", &rank_flag, "--cache-dir", &cache];
                flags.extend(Self::FLAGS);
                flags.extend_from_slice(extra);
                if rank == 1 {
                    flags.extend_from_slice(node1);
                }
                let data = dir.join("text.jsonl").display().to_string();
                let mut args = node_args(&data, &dir.join("out"), 2, &rendezvous, &flags);
                args[1] = dir.join("model").display().to_string();
                start_node(&args, "secret", None)
            })
            .collect();
        let outputs = finish(nodes, Duration::from_secs(240));
        let (host, other) = (stderr(&outputs[0]), stderr(&outputs[1]));
        for output in &outputs {
            assert!(output.status.success(), "node 0: {host}\nnode 1: {other}");
        }
        (host, other)
    }
}
