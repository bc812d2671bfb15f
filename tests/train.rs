//! `pp train` end to end on the tiny fixture: checkpoints and exact resumption, Ctrl-C, config
//! files, metrics, early stopping, and a clear error for each kind of bad input.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::{assert_clean_error, copy_model, metric, pp, stdout};
use common::fixture;
use serde_json::Value;

fn model() -> String {
    fixture("llama3-tiny").join("hf").display().to_string()
}

/// The demo's held-out rows: 200 chat rows, small enough for quick runs.
fn chat_data() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs/data/tool-calls/val.jsonl")
        .display()
        .to_string()
}

fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    let data = chat_data();
    let out = out.display().to_string();
    let mut args = vec![
        "train",
        &model(),
        "--data",
        &data,
        "--out",
        &out,
        "--batch-size",
        "4",
        "--lr",
        "2e-3",
        "--lr-schedule",
        "cosine",
        "--warmup-steps",
        "2",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    pp(&refs)
}

fn stage_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("stage-000.bin")).unwrap()
}

crate::on_devices! {
    resuming_a_checkpoint_continues_exactly => resumes_exactly;
}

/// Six steps in one run equal three steps, a checkpoint, and three more after resuming it:
/// the same losses and byte-identical final weights.
fn resumes_exactly(device: pp::device::DeviceSpec) {
    let device = device.to_string();
    // Packed 64-token rows: every step has the same shapes, so a GPU backend compiles its
    // kernels once (software Vulkan compiles slowly).
    let on_device = ["--device", device.as_str(), "--pack", "--max-len", "64"];
    let tmp = tempfile::tempdir().unwrap();
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));
    stdout(&train(
        &whole,
        &[&on_device[..], &["--steps", "6", "--save-every", "3"]].concat(),
    ));
    let checkpoint = whole.join("checkpoints/step-3");
    assert!(checkpoint.join("optimizer-000.safetensors").is_file());
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(checkpoint.join("trainer.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 3);

    let from = checkpoint.display().to_string();
    stdout(&train(
        &resumed,
        &[&on_device[..], &["--steps", "6", "--resume", &from]].concat(),
    ));
    let (all, after) = (metric(&whole, "train_loss"), metric(&resumed, "train_loss"));
    assert_eq!(after.iter().map(|s| s.0).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(
        &all[3..],
        &after[..],
        "losses after resuming equal the uninterrupted run's"
    );
    assert!(all[5].1 < all[0].1, "training lowered the loss: {all:?}");
    assert_eq!(
        stage_bytes(&whole.join("final")),
        stage_bytes(&resumed.join("final")),
        "identical final weights"
    );
    // The checkpoint is a model every command reads.
    let eval = pp(&[
        "eval",
        &from,
        "--data",
        &chat_data(),
        "--json",
        "--device",
        &device,
    ]);
    assert!(stdout(&eval).contains("\"loss\""));
    // A GPU backend reports the allocator's peak every step; the CPU does not.
    let peaks = metric(&whole, "train_device_memory_peak");
    if device == "cpu" {
        assert!(peaks.is_empty(), "{peaks:?}");
    } else {
        assert_eq!(peaks.len(), 6);
        assert!(peaks.iter().all(|&(_, bytes)| bytes > 0.0), "{peaks:?}");
    }
}

#[test]
fn keep_removes_older_checkpoints_and_resume_picks_the_newest() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    stdout(&train(
        &out,
        &["--steps", "4", "--save-every", "1", "--keep", "2"],
    ));
    let mut names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["step-3", "step-4"]);
    // A save that died half-way (its process gone) is not a checkpoint, and is cleaned up.
    let partial = out.join("checkpoints/.step-5.pp-partial-999999999");
    std::fs::create_dir(&partial).unwrap();
    let more = train(
        &out,
        &[
            "--steps",
            "6",
            "--resume",
            "--save-every",
            "1",
            "--keep",
            "2",
        ],
    );
    assert!(stdout(&more).contains("trained 6 steps"));
    assert_eq!(metric(&out, "train_loss").last().unwrap().0, 6);
    assert!(!partial.exists());
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let child = Command::new(env!("CARGO_BIN_EXE_pp"))
        .args(["train", &model(), "--data", &chat_data(), "--out"])
        .arg(&out)
        .args(["--batch-size", "2", "--steps", "100000"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !out.join("metrics.jsonl").exists()
        || metric(&out, "train_loss").len() < 2 && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("continue with --resume"), "{stderr}");
    let saved = metric(&out, "train_loss").last().unwrap().0;
    assert!(out
        .join(format!("checkpoints/step-{saved}/trainer.json"))
        .is_file());
    assert!(
        !out.join("final").exists(),
        "an interrupted run writes no final model"
    );
}

#[test]
fn config_file_with_flags_overriding_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ndata = {:?}\nout = {:?}\nsteps = 50\nbatch_size = 2\n\
             optimizer = \"adafactor\"\nlr = 1e-2\ncheckpoint_activations = true\n",
            model(),
            chat_data(),
            out.display().to_string()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let run = pp(&["train", "--config", &config, "--steps", "2", "--json"]);
    let report: Value = serde_json::from_str(stdout(&run).trim()).unwrap();
    assert_eq!(report["steps"], 2, "the flag overrides the file");
    assert!(out.join("final/manifest.json").is_file());

    std::fs::write(tmp.path().join("bad.toml"), "step = 3\n").unwrap();
    let bad = tmp.path().join("bad.toml").display().to_string();
    assert_clean_error(
        &pp(&["train", "--config", &bad]),
        &["bad.toml", "unknown setting `step`"],
    );
}

#[test]
fn metrics_are_written_as_jsonl_and_tensorboard_events() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let run = train(
        &out,
        &["--steps", "4", "--val-split", "0.1", "--eval-every", "2"],
    );
    stdout(&run);
    let events = std::fs::read_dir(out.join("tensorboard"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let scalars = pp::train::metrics::read_scalars(&events).unwrap();
    let losses: Vec<(i64, f32)> = scalars
        .iter()
        .filter(|(_, tag, _)| tag == "train/loss")
        .map(|(step, _, v)| (*step, *v))
        .collect();
    let jsonl = metric(&out, "train_loss");
    assert_eq!(losses.len(), 4);
    for ((step, loss), (jstep, jloss)) in losses.iter().zip(&jsonl) {
        assert_eq!(*step as u64, *jstep);
        assert_eq!(*loss, *jloss as f32);
    }
    let val_steps: Vec<i64> = scalars
        .iter()
        .filter(|(_, tag, _)| tag == "val/perplexity")
        .map(|(step, _, _)| *step)
        .collect();
    assert_eq!(val_steps, vec![0, 2, 4]);
}

#[test]
fn early_stopping_ends_a_run_that_stopped_improving() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    // With a zero learning rate the validation loss never improves on the first evaluation.
    let run = pp(&[
        "train",
        &model(),
        "--data",
        &chat_data(),
        "--out",
        &out.display().to_string(),
        "--batch-size",
        "2",
        "--steps",
        "50",
        "--lr",
        "0",
        "--val-split",
        "0.05",
        "--eval-every",
        "1",
        "--early-stopping-patience",
        "2",
        "--json",
    ]);
    let report: Value = serde_json::from_str(stdout(&run).trim()).unwrap();
    assert_eq!(report["stopped_early"], true);
    assert_eq!(
        report["steps"], 2,
        "the start is the best, then two evaluations without improvement"
    );
    assert!(out.join("final/manifest.json").is_file());
}

#[test]
fn bf16_training_writes_bf16_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = |dir: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap()
    };
    let bf16 = ["--dtype", "bf16", "--pack", "--max-len", "128"];
    // Float32 master weights (the default): checkpoints keep them, the final model is bf16.
    let out = tmp.path().join("run");
    let steps = ["--steps", "2", "--save-every", "1"];
    stdout(&train(&out, &[&bf16[..], &steps].concat()));
    let final_manifest = manifest(&out.join("final"));
    assert_eq!(final_manifest["dtype"], "bf16");
    assert_eq!(final_manifest["config"]["dtype"], "bfloat16");
    assert_eq!(manifest(&out.join("checkpoints/step-1"))["dtype"], "f32");
    // Resuming from float32 masters continues exactly.
    let resumed = tmp.path().join("resumed");
    let from = out.join("checkpoints/step-1").display().to_string();
    stdout(&train(
        &resumed,
        &[&bf16[..], &["--steps", "2", "--resume", &from]].concat(),
    ));
    assert_eq!(
        metric(&out, "train_loss")[1..],
        metric(&resumed, "train_loss")[..]
    );
    assert_eq!(
        stage_bytes(&out.join("final")),
        stage_bytes(&resumed.join("final"))
    );
    // bf16 master weights: every update rounded, checkpoints in bf16; a different master
    // dtype cannot resume the float32 run.
    let rounded = tmp.path().join("rounded");
    let master = ["--master-weights", "bf16"];
    stdout(&train(&rounded, &[&bf16[..], &steps, &master].concat()));
    assert_eq!(
        manifest(&rounded.join("checkpoints/step-1"))["dtype"],
        "bf16"
    );
    assert_ne!(
        stage_bytes(&out.join("final")),
        stage_bytes(&rounded.join("final")),
        "rounding every update trains other weights"
    );
    let refused = train(
        &tmp.path().join("refused"),
        &[&bf16[..], &["--steps", "2", "--resume", &from], &master].concat(),
    );
    assert_clean_error(&refused, &["master weights were f32"]);
    // Master weights in a third dtype are refused.
    let odd = train(
        &tmp.path().join("odd"),
        &[&bf16[..], &["--master-weights", "f16"]].concat(),
    );
    assert_clean_error(
        &odd,
        &["--master-weights must be f32 or the training dtype"],
    );
}

fn write_data(dir: &Path, name: &str, bytes: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn train_on(data: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "tests/fixtures/llama3-tiny/hf", "--data", data];
    let out = out.display().to_string();
    args.extend(["--out", &out, "--steps", "1"]);
    args.extend(extra);
    let mut command = Command::new(env!("CARGO_BIN_EXE_pp"));
    command.current_dir(env!("CARGO_MANIFEST_DIR")).args(&args);
    command.output().unwrap()
}

#[test]
fn bad_data_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = dir.join("out");
    // (file, contents, extra flags, what the error names)
    type Case<'a> = (&'a str, &'a [u8], Vec<&'a str>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "empty.jsonl",
            b"\n\n",
            vec![],
            vec!["empty.jsonl", "no rows"],
        ),
        (
            "long.jsonl",
            b"{\"text\": \"a rather long row of text that will not fit\"}\n",
            vec!["--max-len", "4", "--no-truncate"],
            vec!["long.jsonl:1", "more than --max-len 4"],
        ),
        (
            "latin1.jsonl",
            b"{\"text\": \"caf\xe9\"}\n",
            vec![],
            vec!["latin1.jsonl:1", "UTF-8"],
        ),
        (
            "fields.jsonl",
            b"{\"text\": \"fine\"}\n{\"question\": \"?\"}\n",
            vec![],
            vec!["fields.jsonl:2", "no usable field"],
        ),
        (
            "chat.jsonl",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            vec![],
            vec!["chat.jsonl:1", "no assistant turn"],
        ),
        (
            "template.jsonl",
            b"{\"q\": \"why\"}\n",
            vec!["--template", "Q: {q}", "--completion-template", "{a}"],
            vec!["template.jsonl:1", "field \"a\" is missing"],
        ),
        (
            "completion.jsonl",
            b"{\"prompt\": \"hi\", \"completion\": 3}\n",
            vec![],
            vec!["completion.jsonl:1", "\"completion\" must be a string"],
        ),
    ];
    for (name, bytes, extra, needles) in cases {
        let data = write_data(dir, name, bytes);
        assert_clean_error(&train_on(&data, &out, &extra), &needles);
        assert!(!out.join("final").exists(), "{name}: nothing written");
    }
}

#[test]
fn bad_settings_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write_data(tmp.path(), "d.jsonl", b"{\"text\": \"hello there\"}\n");
    let out = tmp.path().join("out");
    let file = tmp.path().join("file");
    std::fs::write(&file, "not a directory").unwrap();
    let unwritable = file.join("out");
    assert_clean_error(&train_on(&data, &unwritable, &[]), &["file/out"]);
    assert_clean_error(
        &train_on(
            &data,
            &out,
            &["--optimizer-in-backward", "--max-grad-norm", "1"],
        ),
        &["--optimizer-in-backward", "--max-grad-norm 0"],
    );
    assert_clean_error(
        &train_on(
            &data,
            &out,
            &[
                "--optimizer-in-backward",
                "--batch-size",
                "4",
                "--micro-batch-size",
                "2",
            ],
        ),
        &["--optimizer-in-backward", "--micro-batch-size"],
    );
    assert_clean_error(
        &train_on(&data, &out, &["--resume"]),
        &["no checkpoint to resume from"],
    );
    // Devices: a kind that does not exist, an adapter index past the last, a CUDA device on a
    // machine without the driver (CI's), and a pipeline's device list of the wrong length or
    // with an unusable entry, refused by the launcher before any worker starts.
    let unknown = train_on(&data, &out, &["--device", "tpu"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(!unknown.status.success() && !stderr.contains("panicked"));
    assert!(
        stderr.starts_with("error: invalid value 'tpu' for '--device"),
        "{stderr}"
    );
    assert!(
        stderr.contains("expected auto, cpu, cuda[:N] or wgpu[:N]"),
        "{stderr}"
    );
    assert_clean_error(
        &train_on(&data, &out, &["--device", "wgpu:99"]),
        &["wgpu:99"],
    );
    if std::env::var_os("PP_TEST_HAS_CUDA").is_none() {
        assert_clean_error(&train_on(&data, &out, &["--device", "cuda"]), &["cuda:0"]);
    }
    let pipeline = ["--stages", "2", "--batch-size", "2"];
    assert_clean_error(
        &train_on(
            &data,
            &out,
            &[&pipeline[..], &["--devices", "cpu,cpu,cpu"]].concat(),
        ),
        &["--devices lists 3 devices for 2 workers"],
    );
    assert_clean_error(
        &train_on(
            &data,
            &out,
            &[&pipeline[..], &["--devices", "cpu,wgpu:99"]].concat(),
        ),
        &["wgpu:99"],
    );
}

#[test]
fn resuming_an_incompatible_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    stdout(&train(&out, &["--steps", "1", "--save-every", "1"]));
    let checkpoint = out.join("checkpoints/step-1");
    let before = stage_bytes(&checkpoint);
    let from = checkpoint.display().to_string();
    let other = tmp.path().join("other");
    assert_clean_error(
        &train(
            &other,
            &["--steps", "2", "--resume", &from, "--optimizer", "sgd"],
        ),
        &["step-1", "cannot resume", "--optimizer adamw"],
    );
    assert_clean_error(
        &train(
            &other,
            &["--steps", "2", "--resume", &from, "--max-len", "100"],
        ),
        &["step-1", "cannot resume", "other data"],
    );
    // A checkpoint of another model.
    let (_keep, mistral) = copy_model("mistral-tiny-swa");
    let run = pp(&[
        "train",
        &mistral.display().to_string(),
        "--data",
        &chat_data(),
        "--out",
        &other.display().to_string(),
        "--steps",
        "2",
        "--resume",
        &from,
    ]);
    assert_clean_error(&run, &["step-1", "cannot resume", "different model"]);
    assert_eq!(
        stage_bytes(&checkpoint),
        before,
        "the checkpoint is untouched"
    );
}

#[test]
fn plan_shows_what_fits_a_24_gb_card() {
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/llama-3-8b");
    let llama = llama.display().to_string();
    let plan = |memory: &str, extra: &[&str]| {
        let mut args = vec![
            "plan",
            &llama,
            "--seq-len",
            "4096",
            "--device-memory",
            memory,
            "--json",
        ];
        args.extend(extra);
        let report: Value = serde_json::from_str(stdout(&pp(&args)).trim()).unwrap();
        report["stages"][0].clone()
    };
    let plain = plan("80GB", &["--optimizer", "adamw"]);
    assert_eq!(plain["fits"], false);
    assert_eq!(plain["plan"]["params"], 8_030_261_248u64);
    let savers = [
        "--optimizer",
        "adafactor",
        "--optimizer-in-backward",
        "--offload-activations",
        "cpu",
    ];
    // The weights are float32 on the device (32 GB): the savers fit 8B on an 80 GB card, not
    // yet on a 24 GB one.
    let on_80 = plan("80GB", &savers);
    assert_eq!(on_80["fits"], true);
    assert_eq!(on_80["plan"]["activations"], 0);
    assert_eq!(plan("24GB", &savers)["fits"], false);
}

#[test]
fn plan_puts_interleaved_and_zbv_stages_together_per_device() {
    let llama = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/models/llama-3-8b");
    let llama = llama.display().to_string();
    let plan = |schedule: &str| {
        let args = [
            "plan",
            &llama,
            "--stages",
            "2",
            "--schedule",
            schedule,
            "--json",
        ];
        serde_json::from_str::<Value>(stdout(&pp(&args)).trim()).unwrap()
    };
    for (schedule, first_device) in [("interleaved", [0, 2]), ("zbv", [0, 3])] {
        let report = plan(schedule);
        let stages = report["stages"].as_array().unwrap();
        let devices = report["devices"].as_array().unwrap();
        assert_eq!((stages.len(), devices.len()), (4, 2), "{schedule}");
        let device = &devices[0]["plan"];
        assert_eq!(device["stages"], serde_json::json!(first_device));
        let weights = |stage: usize| stages[stage]["plan"]["weights"].as_u64().unwrap();
        assert_eq!(
            device["weights"].as_u64().unwrap(),
            weights(first_device[0]) + weights(first_device[1])
        );
    }
    // Three stages cannot go two to a device.
    let refused = pp(&["plan", &llama, "--split", "10,20", "--schedule", "zbv"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("3 stages do not divide"), "{stderr}");
}

#[test]
fn a_two_stage_tied_checkpoint_resumes_with_state_split_by_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let native = tmp.path().join("native").display().to_string();
    let tied = fixture("llama32-tied-bf16-sharded").join("hf");
    stdout(&pp(&[
        "convert",
        &tied.display().to_string(),
        &native,
        "--stages",
        "2",
    ]));
    let rows: String = (0..16)
        .map(|i| {
            format!("{{\"text\": \"row {i}: the quick brown fox jumps over the lazy dog\"}}\n")
        })
        .collect();
    let data = write_data(tmp.path(), "text.jsonl", rows.as_bytes());
    let run = |out: &Path, extra: &[&str]| {
        let out = out.display().to_string();
        let mut args = vec![
            "train",
            &native,
            "--data",
            &data,
            "--out",
            &out,
            "--batch-size",
            "4",
            "--dtype",
            "f32",
            "--optimizer",
            "adafactor",
            "--lr",
            "1e-2",
            "--steps",
            "4",
        ];
        args.extend(extra);
        stdout(&pp(&args));
    };
    let (whole, resumed) = (tmp.path().join("whole"), tmp.path().join("resumed"));
    run(&whole, &["--save-every", "2"]);
    let checkpoint = whole.join("checkpoints/step-2");
    for stage in ["000", "001"] {
        assert!(checkpoint.join(format!("stage-{stage}.bin")).is_file());
        assert!(checkpoint
            .join(format!("optimizer-{stage}.safetensors"))
            .is_file());
    }
    run(&resumed, &["--resume", &checkpoint.display().to_string()]);
    assert_eq!(
        &metric(&whole, "train_loss")[2..],
        &metric(&resumed, "train_loss")[..]
    );
    for stage in ["000", "001"] {
        let file = format!("final/stage-{stage}.bin");
        assert_eq!(
            std::fs::read(whole.join(&file)).unwrap(),
            std::fs::read(resumed.join(&file)).unwrap()
        );
    }
}
