//! `pp convert` end to end: Hugging Face → native → Hugging Face keeps every tensor byte for
//! byte, native checkpoints re-partition, every reader accepts the native format, and corrupt or
//! unsupported inputs fail with one clear line and leave nothing behind.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::cli::{assert_clean_error, copy_model, pp, stdout};
use common::{fixture, FIXTURES};
use pp::checkpoint::{self, NativeCheckpoint};
use pp::dtype::DType;
use pp_stages::StageSlice;
use serde_json::Value;

fn arg(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn hf(name: &str) -> PathBuf {
    fixture(name).join("hf")
}

/// Every tensor of a model directory (either format): name → (dtype, shape, bytes).
fn tensors(dir: &Path) -> BTreeMap<String, (DType, Vec<usize>, Vec<u8>)> {
    let files = checkpoint::open(dir).unwrap();
    files
        .weights
        .names()
        .into_iter()
        .map(|name| {
            let view = files.weights.tensor(&name).unwrap();
            let value = (view.dtype, view.shape.to_vec(), view.bytes.to_vec());
            (name, value)
        })
        .collect()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn manifest(dir: &Path) -> Value {
    json(&dir.join("manifest.json"))
}

/// `name` converted to the native format (with `flags`) in a temporary directory, as `native`.
fn native_copy(name: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let native = tmp.path().join("native");
    let source = hf(name);
    let mut args = vec!["convert", arg(&source), arg(&native)];
    args.extend_from_slice(flags);
    stdout(&pp(&args));
    (tmp, native)
}

fn layer_ranges(dir: &Path) -> Vec<(u64, u64)> {
    manifest(dir)["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let layers = &s["slice"]["layers"];
            (
                layers["start"].as_u64().unwrap(),
                layers["end"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn round_trip_through_native_is_byte_exact_on_every_fixture() {
    for name in FIXTURES {
        let (tmp, native) = native_copy(name, &["--stages", "2"]);
        let back = tmp.path().join("back");
        let out = stdout(&pp(&["convert", arg(&native), arg(&back), "--to", "hf"]));
        assert!(out.contains("self-check passed"), "{out}");

        assert_eq!(tensors(&back), tensors(&hf(name)), "{name}: tensors differ");
        assert_eq!(
            tensors(&native),
            tensors(&hf(name)),
            "{name}: native differs"
        );
        assert_eq!(
            json(&back.join("config.json")),
            json(&hf(name).join("config.json")),
            "{name}: config"
        );
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                std::fs::read(back.join(file)).unwrap(),
                std::fs::read(hf(name).join(file)).unwrap(),
                "{name}: {file}"
            );
        }
        // What transformers needs to load it: an index naming every tensor's shard, and
        // generation defaults.
        let index = json(&back.join("model.safetensors.index.json"));
        let listed: Vec<&String> = index["weight_map"].as_object().unwrap().keys().collect();
        assert_eq!(listed.len(), tensors(&hf(name)).len());
        assert!(back.join("generation_config.json").is_file());
    }
}

#[test]
fn tied_embedding_is_held_by_first_and_last_stage() {
    let (_tmp, native) = native_copy("llama32-tied-bf16-sharded", &["--split", "1,2"]);
    let manifest = manifest(&native);
    assert_eq!(manifest["tied_embeddings"], true);
    let holders: Vec<usize> = manifest["stages"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            s["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == "model.embed_tokens.weight")
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(holders, vec![0, 2]);
    // The last stage alone loads, with its copy as the output weight.
    let checkpoint = NativeCheckpoint::open(&native).unwrap();
    let weights = checkpoint.weights(&[2]).unwrap();
    let slice = checkpoint.partition().stages()[2].clone();
    pp::model::StageModel::<pp::device::Cpu>::load(
        checkpoint.config(),
        slice,
        &weights,
        &Default::default(),
    )
    .unwrap();
}

#[test]
fn a_stage_maps_only_its_own_file() {
    let (_tmp, native) = native_copy("llama3-tiny", &["--split", "1,3"]);
    assert_eq!(layer_ranges(&native), vec![(0, 1), (1, 3), (3, 4)]);
    std::fs::remove_file(native.join("stage-000.bin")).unwrap();
    std::fs::remove_file(native.join("stage-002.bin")).unwrap();
    let checkpoint = NativeCheckpoint::open(&native).unwrap();
    let weights = checkpoint.weights(&[1]).unwrap();
    let slice = StageSlice {
        embedding: false,
        layers: 1..3,
        head: false,
    };
    assert_eq!(checkpoint.partition().stages()[1], slice);
    pp::model::StageModel::<pp::device::Cpu>::load(
        checkpoint.config(),
        slice,
        &weights,
        &Default::default(),
    )
    .unwrap();
    let missing = checkpoint.weights(&[0]).err().unwrap().to_string();
    assert!(missing.contains("stage-000.bin"), "{missing}");
    // That machine can still describe the model: inspect reads only the manifest.
    let inspect = stdout(&pp(&["inspect", arg(&native)]));
    assert!(inspect.contains("3 stage(s)"), "{inspect}");
}

#[test]
fn native_checkpoints_repartition_without_hugging_face() {
    let (tmp, two) = native_copy(
        "mistral-tiny-swa",
        &["--stages", "2", "--balance", "layers"],
    );
    let (three, one) = (tmp.path().join("three"), tmp.path().join("one"));
    let source = hf("mistral-tiny-swa");
    // Ties go to the split that gives earlier stages fewer layers.
    assert_eq!(layer_ranges(&two), vec![(0, 1), (1, 3)]);
    stdout(&pp(&["convert", arg(&two), arg(&three), "--stages", "3"]));
    assert_eq!(layer_ranges(&three), vec![(0, 1), (1, 2), (2, 3)]);
    stdout(&pp(&["convert", arg(&three), arg(&one), "--stages", "1"]));
    assert_eq!(layer_ranges(&one), vec![(0, 3)]);
    assert_eq!(tensors(&one), tensors(&source));
    // With no partition flag a native source keeps its stages.
    let same = tmp.path().join("same");
    stdout(&pp(&["convert", arg(&three), arg(&same)]));
    assert_eq!(layer_ranges(&same), layer_ranges(&three));
}

#[test]
fn dtype_conversion_rounds_like_torch_and_is_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let (bf16, f32_back) = (tmp.path().join("bf16"), tmp.path().join("f32"));
    let source = hf("llama3-tiny");
    let out = stdout(&pp(&[
        "convert",
        arg(&source),
        arg(&bf16),
        "--dtype",
        "bf16",
    ]));
    assert!(out.contains("self-check passed"), "{out}");
    assert_eq!(manifest(&bf16)["dtype"], "bf16");
    // The fixture's config is in transformers 5's layout, which names the field `dtype`.
    assert_eq!(manifest(&bf16)["config"]["dtype"], "bfloat16");
    let converted = tensors(&bf16);
    for (name, (dtype, shape, bytes)) in tensors(&source) {
        let mut expected = Vec::new();
        dtype.cast(&bytes, DType::BF16, &mut expected);
        assert_eq!(converted[&name], (DType::BF16, shape, expected), "{name}");
    }
    // Widening back is exact: the f32 export holds the bf16 values.
    stdout(&pp(&[
        "convert",
        arg(&bf16),
        arg(&f32_back),
        "--to",
        "hf",
        "--dtype",
        "f32",
    ]));
    assert_eq!(json(&f32_back.join("config.json"))["dtype"], "float32");
    for (name, (dtype, _, bytes)) in tensors(&f32_back) {
        assert_eq!(dtype, DType::F32);
        let (_, _, narrow) = &converted[&name];
        assert_eq!(
            DType::F32.to_f32(&bytes),
            DType::BF16.to_f32(narrow),
            "{name}"
        );
    }
}

#[test]
fn small_shards_are_indexed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sharded");
    let source = hf("llama3-tiny");
    stdout(&pp(&[
        "convert",
        arg(&source),
        arg(&out),
        "--to",
        "hf",
        "--max-shard-size",
        "200KB",
    ]));
    let index = json(&out.join("model.safetensors.index.json"));
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(shards.len() >= 4, "{shards:?}");
    for shard in &shards {
        assert!(
            out.join(shard).metadata().unwrap().len() <= 200_000 + 4096,
            "{shard}"
        );
    }
    assert_eq!(tensors(&out), tensors(&source));
}

#[test]
fn eval_and_inspect_read_the_native_format() {
    let (_tmp, native) = native_copy("llama3-tiny", &["--stages", "2"]);
    let source = hf("llama3-tiny");
    let data = fixture("eval-sample.jsonl");
    let eval = |model: &Path| stdout(&pp(&["eval", arg(model), "--data", arg(&data), "--json"]));
    assert_eq!(eval(&native), eval(&source));
    let inspect = |model: &Path| -> Value {
        serde_json::from_str(&stdout(&pp(&["inspect", arg(model), "--json"]))).unwrap()
    };
    let (native_report, hf_report) = (inspect(&native), inspect(&source));
    assert_eq!(native_report["parameters"], hf_report["parameters"]);
    assert_eq!(native_report["format"], "native");
    assert_eq!(native_report["stages"].as_array().unwrap().len(), 2);
}

/// Asserts a failed conversion left neither the output nor a partial directory behind.
fn assert_nothing_written(out: &Path) {
    assert!(!out.exists(), "{} was created", out.display());
    let parent = out.parent().unwrap();
    for entry in std::fs::read_dir(parent).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            !name.to_string_lossy().contains("pp-partial"),
            "partial output left: {name:?}"
        );
    }
}

#[test]
fn corrupt_tensor_bytes_fail_the_checksum() {
    let (tmp, native) = native_copy("llama3-tiny", &["--stages", "2"]);
    let stage = native.join("stage-001.bin");
    let mut bytes = std::fs::read(&stage).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    std::fs::write(&stage, bytes).unwrap();
    let data = fixture("eval-sample.jsonl");
    let eval = pp(&["eval", arg(&native), "--data", arg(&data)]);
    assert_clean_error(
        &eval,
        &["stage-001.bin", "checksum mismatch", "model.norm.weight"],
    );
    let out = tmp.path().join("out");
    let convert = pp(&["convert", arg(&native), arg(&out), "--to", "hf"]);
    assert_clean_error(&convert, &["stage-001.bin", "checksum mismatch"]);
    assert_nothing_written(&out);
    // Re-partitioning checks the output's checksum against the source's.
    let repartition = pp(&["convert", arg(&native), arg(&out), "--stages", "1"]);
    assert_clean_error(&repartition, &["stage-001.bin", "checksum mismatch"]);
    assert_nothing_written(&out);
}

#[test]
fn truncated_stage_file_is_named() {
    let (tmp, native) = native_copy("llama3-tiny", &["--stages", "2"]);
    let stage = native.join("stage-000.bin");
    let bytes = std::fs::read(&stage).unwrap();
    std::fs::write(&stage, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("out");
    let result = pp(&["convert", arg(&native), arg(&out), "--to", "hf"]);
    assert_clean_error(&result, &["stage-000.bin", "truncated"]);
    assert_nothing_written(&out);
}

#[test]
fn stage_file_from_another_checkpoint_is_refused() {
    let (_a, first) = native_copy("llama3-tiny", &["--stages", "2"]);
    let (_b, second) = native_copy("llama3-tiny", &["--stages", "3"]);
    // Same size is not enough: the header must match the manifest.
    std::fs::copy(second.join("stage-000.bin"), first.join("stage-000.bin")).unwrap();
    let manifest_path = first.join("manifest.json");
    let mut manifest = manifest(&first);
    manifest["stages"][0]["bytes"] = std::fs::metadata(first.join("stage-000.bin"))
        .unwrap()
        .len()
        .into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let out = first.with_file_name("out");
    let result = pp(&["convert", arg(&first), arg(&out), "--to", "hf"]);
    assert_clean_error(&result, &["stage-000.bin", "does not match"]);
    assert_nothing_written(&out);
}

#[test]
fn unknown_format_version_and_corrupt_manifest_are_named() {
    let (_tmp, native) = native_copy("llama3-tiny", &["--stages", "1"]);
    let path = native.join("manifest.json");
    let mut newer = manifest(&native);
    newer["format_version"] = 99.into();
    std::fs::write(&path, newer.to_string()).unwrap();
    assert_clean_error(
        &pp(&["inspect", arg(&native)]),
        &["manifest.json", "format version 99"],
    );
    std::fs::write(&path, "{\"format\": \"pp-native\", ").unwrap();
    assert_clean_error(
        &pp(&["inspect", arg(&native)]),
        &["manifest.json", "not valid JSON"],
    );
}

#[test]
fn unsupported_architecture_is_refused_before_writing() {
    let (tmp, model) = copy_model("llama3-tiny");
    let config_path = model.join("config.json");
    let mut config = json(&config_path);
    config["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
    config["model_type"] = "gpt2".into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = tmp.path().join("out");
    assert_clean_error(
        &pp(&["convert", arg(&model), arg(&out)]),
        &["config.json", "GPT2"],
    );
    assert_nothing_written(&out);
}

#[test]
fn truncated_source_leaves_nothing_behind() {
    let (tmp, model) = copy_model("llama3-tiny");
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let out = tmp.path().join("out");
    assert_clean_error(
        &pp(&["convert", arg(&model), arg(&out)]),
        &["model.safetensors"],
    );
    assert_nothing_written(&out);
}

#[test]
fn existing_output_needs_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let source = hf("llama3-tiny");
    let refused = pp(&["convert", arg(&source), arg(&out)]);
    assert_clean_error(&refused, &["out", "already exists", "--force"]);
    assert!(out.join("keep.txt").exists());
    stdout(&pp(&["convert", arg(&source), arg(&out), "--force"]));
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("manifest.json").exists());
}

#[test]
fn bad_partitions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let source = hf("llama3-tiny");
    let too_many = pp(&["convert", arg(&source), arg(&out), "--stages", "9"]);
    assert_clean_error(&too_many, &["--stages", "9 stages"]);
    let backwards = pp(&["convert", arg(&source), arg(&out), "--split", "3,1"]);
    assert_clean_error(&backwards, &["--split"]);
    assert_nothing_written(&out);
}

#[test]
fn self_check_catches_a_changed_weight() {
    let source = checkpoint::open(&hf("llama3-tiny")).unwrap();
    let names = source.weights.names();
    let mut changed =
        pp::checkpoint::OwnedWeights::copy_from(source.weights.as_ref(), &names, None).unwrap();
    let name = "model.layers.2.mlp.down_proj.weight";
    let view = source.weights.tensor(name).unwrap();
    let mut bytes = view.bytes.to_vec();
    bytes[7] ^= 0x01;
    changed.insert(name, view.dtype, view.shape.to_vec(), bytes);
    let converted = checkpoint::ModelFiles {
        info: checkpoint::ModelInfo {
            dir: PathBuf::from("converted"),
            format: checkpoint::Format::HuggingFace,
            hf_config: source.info.hf_config.clone(),
            config: source.info.config.clone(),
        },
        weights: Box::new(changed),
    };
    let error =
        pp::convert::verify::<pp::device::Cpu>(&source, &converted, None, &Default::default())
            .unwrap_err()
            .to_string();
    assert!(
        error.contains("self-check failed") && error.contains("layer 2"),
        "{error}"
    );
    let same = checkpoint::open(&hf("llama3-tiny")).unwrap();
    let report =
        pp::convert::verify::<pp::device::Cpu>(&source, &same, None, &Default::default()).unwrap();
    assert_eq!(report.max_abs_diff, 0.0);
    assert_eq!(report.parts, 6);
}
