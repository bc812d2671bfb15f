//! `pp train --stages N`: worker processes connected over QUIC on loopback. For every schedule,
//! with 2 and 3 workers, 3 steps with global-norm clipping, the final weights equal those of
//! single-device training on the same data within 1e-5 relative (the tied-embedding fixture
//! included), and so do replicas of the model or of a pipeline (`--data-parallel`); a killed
//! worker stops the others, naming its stages (and replica); Ctrl-C stops them all.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{metric, pp, stdout};
use common::fixture;
use common::processes::{assert_same_weights, children, running, text_data, train, Launcher};

/// How far bf16 runs of different layouts may part (relative L2 of each saved weight): float32
/// sums in another order move a few values across a bf16 rounding step (2^-8 relative); here
/// about 5e-7 is seen.
const BF16_BOUND: f64 = 1e-5;

#[test]
fn every_schedule_over_quic_equals_single_device_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    for name in ["llama3-tiny", "llama32-tied-bf16-sharded"] {
        let model = fixture(name).join("hf").display().to_string();
        for ranks in [2usize, 3] {
            let microbatches = 2 * ranks;
            let single = tmp.path().join(format!("{name}-single-{ranks}"));
            // The same micro-batches on one device: 6 rows in `microbatches` parts.
            let micro = (6 / microbatches).to_string();
            train(&model, &data, &single, &["--micro-batch-size", &micro]);
            for schedule in ["gpipe", "1f1b", "interleaved", "zbh1", "zbv"] {
                // Interleaved runs two slices per worker (the default --virtual), ZB-V always two.
                let stages = match schedule {
                    "interleaved" | "zbv" => 2 * ranks,
                    _ => ranks,
                };
                let layers = if name == "llama3-tiny" { 4 } else { 3 };
                if stages > layers {
                    continue; // a stage per layer at most
                }
                let out = tmp.path().join(format!("{name}-{schedule}-{ranks}"));
                train(
                    &model,
                    &data,
                    &out,
                    &[
                        "--stages",
                        &ranks.to_string(),
                        "--schedule",
                        schedule,
                        "--microbatches",
                        &microbatches.to_string(),
                    ],
                );
                assert_same_weights(
                    &out.join("final"),
                    &single.join("final"),
                    1e-5,
                    &format!("{name} {schedule} with {ranks} workers"),
                );
            }
        }
    }
}

/// A wgpu stage beside a CPU stage: activations and gradients cross as host tensors, and the
/// pipeline trains the weights one CPU device trains (within wgpu's 1e-4).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_and_cpu_workers_train_together_as_stages_and_as_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    let single = tmp.path().join("single");
    let cpu = ["--device", "cpu", "--micro-batch-size", "3"];
    train(&model, &data, &single, &cpu);
    let mixed = tmp.path().join("mixed");
    let pipeline = ["--stages", "2", "--schedule", "1f1b", "--microbatches", "2"];
    train(
        &model,
        &data,
        &mixed,
        &[&pipeline[..], &["--devices", "wgpu,cpu"]].concat(),
    );
    assert_same_weights(
        &mixed.join("final"),
        &single.join("final"),
        1e-4,
        "wgpu and cpu",
    );
    // Replicas on a CubeCL backend: each gradient is read off the device on the all-reduce
    // thread, not the thread that computed it.
    let replicas = tmp.path().join("replicas");
    let ddp = [
        "--data-parallel",
        "2",
        "--microbatches",
        "1",
        "--devices",
        "wgpu,cpu",
    ];
    train(&model, &data, &replicas, &ddp);
    assert_same_weights(
        &replicas.join("final"),
        &single.join("final"),
        1e-4,
        "wgpu and cpu replicas",
    );
}

fn start_long_run(tmp: &Path) -> Launcher {
    start_long_run_with(tmp, &["--stages", "2", "--microbatches", "2"])
}

fn start_long_run_with(tmp: &Path, layout: &[&str]) -> Launcher {
    let data = text_data(tmp);
    let child = Command::new(env!("CARGO_BIN_EXE_pp"))
        .args([
            "train",
            &fixture("llama3-tiny").join("hf").display().to_string(),
        ])
        .args(["--data", &data, "--out"])
        .arg(tmp.join("run"))
        .args(["--batch-size", "4", "--steps", "100000"])
        .args(layout)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Launcher(Some(child))
}

fn wait_for_steps(tmp: &Path) {
    let started = Instant::now();
    let metrics = tmp.join("run/metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the pipeline never trained"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_worker_stops_the_others_naming_its_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let launcher = start_long_run(tmp.path());
    wait_for_steps(tmp.path());
    let workers = children(launcher.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    let killed_at = Instant::now();
    // SAFETY: killing a worker process this test started (through the launcher).
    unsafe { libc::kill(workers[1] as i32, libc::SIGKILL) };
    let output = launcher.wait_with_output();
    assert!(
        killed_at.elapsed() < Duration::from_secs(40),
        "took {:?}",
        killed_at.elapsed()
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("lost the worker of stage(s) [1]"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A worker of the second replica dies, in two stages × two DDP replicas and in two FSDP
/// replicas: every other worker (its pipeline peer, and the first replica, which waits on it
/// in a collective) stops within 30 s, naming it.
#[test]
fn a_killed_replica_stops_the_others_within_30_s() {
    let ddp = [
        "--stages",
        "2",
        "--data-parallel",
        "2",
        "--microbatches",
        "1",
    ];
    let fsdp = ["--data-parallel", "2", "--fsdp", "--microbatches", "1"];
    for (layout, victim, named) in [
        (
            &ddp[..],
            2,
            "lost the worker of stage(s) [0] of replica 1 (rank 2)",
        ),
        (
            &fsdp[..],
            1,
            "lost the worker of stage(s) [0] of replica 1 (rank 1)",
        ),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let launcher = start_long_run_with(tmp.path(), layout);
        wait_for_steps(tmp.path());
        let workers = children(launcher.id());
        assert!(workers.len() > victim, "{workers:?}");
        let killed_at = Instant::now();
        // SAFETY: killing a worker process this test started (through the launcher).
        unsafe { libc::kill(workers[victim] as i32, libc::SIGKILL) };
        let output = launcher.wait_with_output();
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "{layout:?}: took {:?}",
            killed_at.elapsed()
        );
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(named), "{layout:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// Trains fixture `name` on one device and in each of `layouts` (flags), with AdamW and with
/// Adafactor, and asserts that every layout's final weights equal the one device's.
fn assert_layouts_train_as_one_device(tmp: &Path, data: &str, name: &str, layouts: &[&[&str]]) {
    let model = fixture(name).join("hf").display().to_string();
    for optimizer in ["adamw", "adafactor"] {
        let single = tmp.join(format!("{name}-{optimizer}-single"));
        train(&model, data, &single, &["--optimizer", optimizer]);
        for (index, layout) in layouts.iter().enumerate() {
            let out = tmp.join(format!("{name}-{optimizer}-{index}"));
            let mut args = vec!["--optimizer", optimizer];
            args.extend(*layout);
            train(&model, data, &out, &args);
            assert_same_weights(
                &out.join("final"),
                &single.join("final"),
                1e-5,
                &format!("{name} {optimizer} with {layout:?}"),
            );
        }
    }
}

/// `--data-parallel 2`, alone and with `--stages 2`, and one replica all-reducing alone: worker
/// processes over QUIC train the weights one device trains on the same rows, with AdamW and
/// with Adafactor, clipping on.
#[test]
fn data_parallel_workers_equal_single_device_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let two_stages = [
        "--stages",
        "2",
        "--data-parallel",
        "2",
        "--microbatches",
        "2",
    ];
    for name in ["llama3-tiny", "llama32-tied-bf16-sharded"] {
        // `--collectives ring` alone: one replica all-reduces over a group of one.
        let layouts: [&[&str]; 3] = [
            &["--data-parallel", "2", "--microbatches", "1"],
            &two_stages,
            &["--collectives", "ring", "--microbatches", "1"],
        ];
        assert_layouts_train_as_one_device(tmp.path(), &data, name, &layouts);
    }
}

/// bf16 training (float32 master weights) with replicas, sharded or not: the gradients are
/// summed in float32, so the weights follow one device's to within bf16's rounding of the
/// saved model.
#[test]
fn replicas_train_in_bf16_as_one_device_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    let single = tmp.path().join("single");
    train(&model, &data, &single, &["--dtype", "bf16"]);
    for layout in [
        &["--data-parallel", "2"][..],
        &["--data-parallel", "2", "--fsdp"],
    ] {
        let out = tmp.path().join(layout.join(""));
        let mut args = vec!["--dtype", "bf16", "--microbatches", "1"];
        args.extend(layout);
        train(&model, &data, &out, &args);
        assert_same_weights(
            &out.join("final"),
            &single.join("final"),
            BF16_BOUND,
            &format!("bf16 with {layout:?}"),
        );
    }
}

/// `--fsdp`: replicas that shard parameters, gradients and optimizer state train what one device
/// trains (AdamW and Adafactor, alone and with two stages, under 1F1B and ZB-H1). Their checkpoint holds the AdamW
/// state as one shard per replica, and resumes exactly under FSDP, and in other layouts: one
/// device, three DDP replicas, two pipeline stages.
#[test]
fn fsdp_workers_equal_single_device_and_their_sharded_checkpoints_resume_anywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let fsdp = ["--data-parallel", "2", "--fsdp", "--microbatches", "1"];
    let two_stages = [
        "--stages",
        "2",
        "--data-parallel",
        "2",
        "--fsdp",
        "--microbatches",
        "2",
    ];
    let mut zero_bubble = two_stages.to_vec();
    zero_bubble.extend(["--schedule", "zbh1"]);
    let layouts: [&[&str]; 3] = [&fsdp, &two_stages, &zero_bubble];
    assert_layouts_train_as_one_device(tmp.path(), &data, "llama3-tiny", &layouts);
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    let whole = tmp.path().join("whole");
    let mut first = fsdp.to_vec();
    first.extend(["--save-every", "2"]);
    train(&model, &data, &whole, &first);
    let checkpoint = whole.join("checkpoints/step-2");
    for shard in ["000", "001"] {
        let file = format!("optimizer-000.shard-{shard}-of-002.safetensors");
        assert!(checkpoint.join(&file).is_file(), "{file}");
    }
    assert!(!checkpoint.join("optimizer-000.safetensors").exists());
    let from = checkpoint.display().to_string();
    let resumed = tmp.path().join("resumed");
    let mut second = fsdp.to_vec();
    second.extend(["--resume", &from]);
    train(&model, &data, &resumed, &second);
    assert_same_weights(
        &resumed.join("final"),
        &whole.join("final"),
        1e-6,
        "FSDP resumed",
    );
    for (what, layout) in [
        ("one device", vec![]),
        (
            "three DDP replicas",
            vec!["--data-parallel", "3", "--microbatches", "1"],
        ),
        ("two stages", vec!["--stages", "2", "--microbatches", "2"]),
    ] {
        let out = tmp.path().join(what.replace(' ', "-"));
        let mut args = layout.clone();
        args.extend(["--resume", &from]);
        train(&model, &data, &out, &args);
        assert_same_weights(
            &out.join("final"),
            &whole.join("final"),
            1e-5,
            &format!("the FSDP checkpoint resumed on {what}"),
        );
    }
}

#[test]
fn ctrl_c_stops_every_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let launcher = start_long_run(tmp.path());
    wait_for_steps(tmp.path());
    let workers = children(launcher.id());
    // SAFETY: interrupting the launcher this test started.
    unsafe { libc::kill(launcher.id() as i32, libc::SIGINT) };
    let output = launcher.wait_with_output();
    assert_eq!(output.status.code(), Some(130));
    let saved = std::fs::read_dir(tmp.path().join("run/checkpoints"))
        .unwrap()
        .count();
    assert_eq!(saved, 1, "the interrupted pipeline saved a checkpoint");
    for worker in workers {
        assert!(!running(worker), "worker {worker} still runs");
    }
}

#[test]
fn workers_stop_when_their_launcher_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let launcher = start_long_run(tmp.path());
    wait_for_steps(tmp.path());
    let workers = children(launcher.id());
    assert_eq!(workers.len(), 2, "{workers:?}");
    drop(launcher); // SIGKILL: the launcher can pass nothing on.
    let killed_at = Instant::now();
    while workers.iter().any(|&worker| running(worker)) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(40),
            "workers {workers:?} still run"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pipeline_checkpoint_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = fixture("llama32-tied-bf16-sharded")
        .join("hf")
        .display()
        .to_string();
    let pipeline = [
        "--stages",
        "2",
        "--schedule",
        "zbh1",
        "--microbatches",
        "2",
        "--optimizer",
        "adafactor",
    ];
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));
    let mut first = pipeline.to_vec();
    first.extend(["--save-every", "2"]);
    train(&model, &data, &whole, &first);
    let checkpoint = whole.join("checkpoints/step-2");
    for stage in ["000", "001"] {
        assert!(checkpoint
            .join(format!("optimizer-{stage}.safetensors"))
            .is_file());
    }
    let from = checkpoint.display().to_string();
    let mut second = pipeline.to_vec();
    second.extend(["--resume", &from]);
    train(&model, &data, &resumed, &second);
    assert_eq!(
        &metric(&whole, "train_loss")[2..],
        &metric(&resumed, "train_loss")[..]
    );
    // A pipeline checkpoint resumes on one device too: its state is found by name in both
    // stages' files (the same micro-batches, so the same losses up to summation order).
    let single = tmp.path().join("single");
    train(
        &model,
        &data,
        &single,
        &[
            "--optimizer",
            "adafactor",
            "--micro-batch-size",
            "3",
            "--resume",
            &from,
        ],
    );
    for ((s, a), (t, b)) in metric(&single, "train_loss")
        .iter()
        .zip(&metric(&whole, "train_loss")[2..])
    {
        assert_eq!(s, t);
        assert!((a - b).abs() <= 1e-5 * b.abs(), "step {s}: {a} vs {b}");
    }
    // The workers' shards form one native checkpoint: re-partition it and export it.
    let final_dir = whole.join("final").display().to_string();
    let one = tmp.path().join("one-stage").display().to_string();
    stdout(&pp(&["convert", &final_dir, &one, "--stages", "1"]));
    let hf = tmp.path().join("hf").display().to_string();
    stdout(&pp(&["convert", &final_dir, &hf, "--to", "hf"]));
    for stage in ["000", "001"] {
        let file = format!("final/stage-{stage}.bin");
        assert_eq!(
            std::fs::read(whole.join(&file)).unwrap(),
            std::fs::read(resumed.join(&file)).unwrap(),
            "{file}"
        );
    }
}

#[test]
fn pipeline_validation_matches_single_device_and_stops_early() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    let validation = [
        "--val-split",
        "0.25",
        "--eval-every",
        "1",
        "--micro-batch-size",
        "3",
    ];
    let single = tmp.path().join("single");
    train(&model, &data, &single, &validation);
    let want = metric(&single, "val_loss");
    assert_eq!(want.len(), 4, "{want:?}");
    // The validation set's two micro-batches through a pipeline, and shared by DDP and FSDP
    // replicas (of three FSDP replicas, one repeats a micro-batch uncounted: they gather each
    // layer together).
    for (name, layout) in [
        ("piped", &["--stages", "2", "--microbatches", "2"][..]),
        (
            "replicas",
            &["--data-parallel", "2", "--microbatches", "1"][..],
        ),
        (
            "sharded",
            &["--data-parallel", "2", "--fsdp", "--microbatches", "1"][..],
        ),
        (
            "sharded-3",
            &["--data-parallel", "3", "--fsdp", "--microbatches", "1"][..],
        ),
    ] {
        let out = tmp.path().join(name);
        let mut args = validation.to_vec();
        args.extend(layout);
        train(&model, &data, &out, &args);
        let got = metric(&out, "val_loss");
        assert_eq!(got.len(), want.len(), "{name}");
        for ((s, a), (t, b)) in got.iter().zip(&want) {
            assert_eq!(s, t);
            assert!(
                (a - b).abs() <= 1e-5 * b.abs(),
                "{name} step {s}: {a} vs {b}"
            );
        }
    }
    // With a zero learning rate nothing improves after the first evaluation.
    let stopped = tmp.path().join("stopped");
    let out = stopped.display().to_string();
    let run = pp(&[
        "train",
        &model,
        "--data",
        &data,
        "--out",
        &out,
        "--batch-size",
        "6",
        "--steps",
        "20",
        "--lr",
        "0",
        "--val-split",
        "0.25",
        "--eval-every",
        "1",
        "--early-stopping-patience",
        "2",
        "--stages",
        "2",
        "--microbatches",
        "2",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(stdout(&run).trim()).unwrap();
    assert_eq!(report["stopped_early"], true);
    assert_eq!(
        report["steps"], 2,
        "the start is the best; two evaluations later it stops"
    );
}

#[test]
fn pipeline_settings_are_checked_before_workers_start() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let out = tmp.path().join("out").display().to_string();
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    let run = pp(&[
        "train",
        &model,
        "--data",
        &data,
        "--out",
        &out,
        "--stages",
        "2",
        "--optimizer-in-backward",
        "--max-grad-norm",
        "0",
    ]);
    common::cli::assert_clean_error(&run, &["--optimizer-in-backward", "--stages"]);
    let run = pp(&[
        "train",
        &model,
        "--data",
        &data,
        "--out",
        &out,
        "--stages",
        "3",
        "--schedule",
        "interleaved",
        "--microbatches",
        "7",
        "--virtual",
        "3",
    ]);
    assert!(!run.status.success());
    let nccl = |layout: &[&str]| {
        let mut args = vec!["train", &model, "--data", &data, "--out", &out];
        args.extend(["--device", "cpu", "--collectives", "nccl"]);
        args.extend(layout);
        pp(&args)
    };
    // Workers on the CPU refuse NCCL together: none waits for the others. One replica asks
    // for NCCL too (a group of one).
    for layout in [&["--data-parallel", "2", "--microbatches", "1"][..], &[]] {
        let mut args = layout.to_vec();
        args.extend(["--batch-size", "2"]);
        let run = nccl(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success());
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains("the worker of rank 0 failed")
                && stderr.contains("NCCL needs every rank of the group on a CUDA device"),
            "{layout:?}: {stderr}"
        );
    }
}

/// `--wire-dtype`: activations and gradients cross narrow, and training follows float32's.
#[test]
fn narrow_wire_dtypes_train_close_to_float32() {
    let tmp = tempfile::tempdir().unwrap();
    let data = text_data(tmp.path());
    let model = fixture("llama3-tiny").join("hf").display().to_string();
    let losses = |wire: &str| {
        let out = tmp.path().join(wire);
        let pipeline = ["--stages", "2", "--microbatches", "2", "--wire-dtype", wire];
        train(&model, &data, &out, &pipeline);
        metric(&out, "train_loss")
    };
    let exact = losses("f32");
    for (wire, bound) in [("bf16", 5e-3), ("f16", 1e-3), ("fp8", 5e-2)] {
        let narrow = losses(wire);
        assert_eq!(narrow.len(), exact.len());
        for ((step, got), (_, want)) in narrow.iter().zip(&exact) {
            let relative = (got - want).abs() / want.abs();
            assert!(
                relative <= bound,
                "{wire} step {step}: loss {got} against {want}"
            );
        }
        // Rounded activations change the loss: the flag took effect.
        if wire == "fp8" {
            assert_ne!(narrow.last(), exact.last(), "fp8 changed nothing");
        }
    }
}
