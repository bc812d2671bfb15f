//! The `pp` binary end to end: `inspect` and `eval` on the fixtures, and a clear one-line error
//! with a non-zero exit for every kind of bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::cli::{assert_clean_error, copy_model, pp, stdout};
use common::{fixture, Expected};
use safetensors::tensor::TensorView;
use serde_json::Value;

fn write(path: &Path, text: &str) -> String {
    std::fs::write(path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The fixture's reference batch as a pre-tokenized JSONL dataset, one row per sequence.
fn reference_dataset(name: &str, path: &Path) -> String {
    let expected = Expected::load(name);
    let ids = expected.i64("input_ids");
    let labels = expected.i64("labels");
    let seq = ids.shape[1];
    let rows: Vec<String> = ids
        .values
        .chunks(seq)
        .zip(labels.values.chunks(seq))
        .map(|(i, l)| serde_json::json!({"input_ids": i, "labels": l}).to_string())
        .collect();
    write(path, &(rows.join("\n") + "\n"))
}

fn model_arg(name: &str) -> String {
    fixture(name).join("hf").to_str().unwrap().to_string()
}

#[test]
fn eval_on_reference_batch_reproduces_transformers_loss() {
    let tmp = tempfile::tempdir().unwrap();
    for name in common::FIXTURES {
        let data = reference_dataset(name, &tmp.path().join(format!("{name}.jsonl")));
        let expected_loss = f64::from(Expected::load(name).f32("loss").values[0]);
        // Whatever the batching, the token-weighted mean is the same.
        for batch in ["1", "8"] {
            let out = pp(&[
                "eval",
                &model_arg(name),
                "--data",
                &data,
                "--json",
                "--batch-size",
                batch,
            ]);
            let report: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
            let loss = report["loss"].as_f64().unwrap();
            assert!(
                (loss - expected_loss).abs() < 1e-5,
                "{name} batch {batch}: {loss} vs {expected_loss}"
            );
            assert!((report["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-6);
            assert!(report["tokens"].as_u64().unwrap() > 0);
        }
    }
}

#[test]
fn eval_text_rows_scores_every_token_but_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let data = write(
        &tmp.path().join("text.jsonl"),
        "{\"text\": \"Weather in Paris?\"}\n\n{\"text\": \"You call tools.\"}\n",
    );
    let out = pp(&["eval", &model_arg("llama3-tiny"), "--data", &data, "--json"]);
    let report: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    // The fixture's tokenizer adds no BOS; each row scores all tokens after its first.
    let tokenizer = pp::tokenizer::Tokenizer::load(&fixture("llama3-tiny").join("hf")).unwrap();
    let n = |t: &str| tokenizer.encode(t, true).unwrap().len() as u64 - 1;
    assert_eq!(
        report["tokens"].as_u64().unwrap(),
        n("Weather in Paris?") + n("You call tools.")
    );
    assert_eq!(report["rows"].as_u64().unwrap(), 2);
}

#[test]
fn inspect_reports_size_and_memory() {
    let out = pp(&["inspect", &model_arg("llama32-tied-bf16-sharded"), "--json"]);
    let report: Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    // 320*64 tied embedding + 3 layers + final norm.
    let layer = 64 * 64 * 2 + 64 * 16 * 2 + 3 * 64 * 128 + 2 * 64;
    assert_eq!(
        report["parameters"].as_u64().unwrap(),
        320 * 64 + 3 * layer + 64
    );
    assert_eq!(report["config"]["tie_word_embeddings"], true);
    assert_eq!(report["memory"]["dtype"], "bf16");
    let text = stdout(&pp(&["inspect", &model_arg("mistral-tiny-swa")]));
    assert!(
        text.contains("MistralForCausalLM") && text.contains("sliding window   8 tokens"),
        "{text}"
    );
}

fn eval_error(model: &Path, data: &Path) -> Output {
    pp(&[
        "eval",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ])
}

fn good_data(dir: &Path) -> PathBuf {
    let path = dir.join("good.jsonl");
    write(&path, "{\"text\": \"hello\"}\n");
    path
}

#[test]
fn missing_or_malformed_config_is_named() {
    let (tmp, model) = copy_model("llama3-tiny");
    let data = good_data(tmp.path());
    let config = model.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();

    write(&config, "{ not json");
    assert_clean_error(
        &eval_error(&model, &data),
        &["config.json", "not a valid model config"],
    );

    write(&config, &text.replace("\"hidden_size\": 64,", ""));
    assert_clean_error(&eval_error(&model, &data), &["config.json", "hidden_size"]);

    write(
        &config,
        &text
            .replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\""),
    );
    assert_clean_error(
        &eval_error(&model, &data),
        &["config.json", "GPT2LMHeadModel", "not supported"],
    );

    write(&config, &text.replace("\"llama3\"", "\"longrope\""));
    assert_clean_error(
        &eval_error(&model, &data),
        &["config.json", "rope_type `longrope`"],
    );

    std::fs::remove_file(&config).unwrap();
    assert_clean_error(&eval_error(&model, &data), &["config.json", "not found"]);
}

/// Rewrites `model.safetensors` through `edit`, which may drop or replace tensors.
fn rewrite_weights(model: &Path, edit: impl FnOnce(&mut Vec<(String, TensorView<'_>)>)) {
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, TensorView<'_>)> = file.tensors();
    edit(&mut tensors);
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let (tmp, model) = copy_model("llama3-tiny");
    let data = good_data(tmp.path());
    rewrite_weights(&model, |t| {
        t.retain(|(name, _)| name != "model.layers.2.mlp.up_proj.weight")
    });
    assert_clean_error(
        &eval_error(&model, &data),
        &[
            "model.safetensors",
            "model.layers.2.mlp.up_proj.weight",
            "missing",
        ],
    );

    let (tmp, model) = copy_model("llama3-tiny");
    let data = good_data(tmp.path());
    rewrite_weights(&model, |t| {
        let (_, view) = t
            .iter_mut()
            .find(|(name, _)| name == "model.norm.weight")
            .unwrap();
        // Keep the dtype, store only half of the norm weight.
        let data = &view.data()[..32 * 4];
        *view = TensorView::new(view.dtype(), vec![32], data).unwrap();
    });
    assert_clean_error(
        &eval_error(&model, &data),
        &["model.safetensors", "model.norm.weight", "shape [32]"],
    );
}

#[test]
fn truncated_or_corrupt_weights_are_named() {
    let (tmp, model) = copy_model("llama3-tiny");
    let data = good_data(tmp.path());
    let weights = model.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();

    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    assert_clean_error(
        &eval_error(&model, &data),
        &["model.safetensors", "truncated or corrupt"],
    );

    let mut corrupt = bytes.clone();
    corrupt[8..16].copy_from_slice(b"\x00garbage");
    std::fs::write(&weights, &corrupt).unwrap();
    assert_clean_error(
        &eval_error(&model, &data),
        &["model.safetensors", "truncated or corrupt"],
    );

    std::fs::write(&weights, b"abc").unwrap();
    assert_clean_error(
        &eval_error(&model, &data),
        &["model.safetensors", "truncated or corrupt"],
    );
}

#[test]
fn missing_shard_is_named() {
    let (tmp, model) = copy_model("llama32-tied-bf16-sharded");
    let data = good_data(tmp.path());
    std::fs::remove_file(model.join("model-00003-of-00005.safetensors")).unwrap();
    assert_clean_error(
        &eval_error(&model, &data),
        &["model-00003-of-00005.safetensors"],
    );
}

#[test]
fn broken_tokenizer_is_named() {
    let (tmp, model) = copy_model("llama3-tiny");
    let data = good_data(tmp.path());
    write(
        &model.join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": 42}",
    );
    assert_clean_error(
        &eval_error(&model, &data),
        &["tokenizer.json", "cannot load tokenizer"],
    );
}

#[test]
fn bad_dataset_rows_name_their_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama3-tiny").join("hf");
    let cases = [
        (
            "{\"text\": \"ok\"}\n{\"text\": \"fine\"\n",
            "2",
            "not valid JSON",
        ),
        (
            "{\"text\": \"ok\"}\n\n{\"prompt\": \"x\"}\n",
            "3",
            "no usable field",
        ),
        (
            "{\"input_ids\": [1, 2, 384]}\n",
            "1",
            "outside the vocabulary",
        ),
        ("{\"input_ids\": [1, 2], \"labels\": [1]}\n", "1", "aligned"),
        ("[1, 2, 3]\n", "1", "JSON object"),
        ("{\"text\": 5}\n", "1", "must be a string"),
    ];
    for (i, (rows, line, message)) in cases.iter().enumerate() {
        let data = tmp.path().join(format!("bad{i}.jsonl"));
        write(&data, rows);
        let location = format!("bad{i}.jsonl:{line}:");
        assert_clean_error(&eval_error(&model, &data), &[&location, message]);
    }
    let data = tmp.path().join("utf8.jsonl");
    std::fs::write(&data, b"{\"text\": \"caf\xe9\"}\n").unwrap();
    assert_clean_error(&eval_error(&model, &data), &["utf8.jsonl:1:", "UTF-8"]);
}

#[test]
fn empty_or_missing_dataset_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama3-tiny").join("hf");
    let data = tmp.path().join("empty.jsonl");
    write(&data, "\n  \n");
    assert_clean_error(&eval_error(&model, &data), &["empty.jsonl", "no rows"]);
    assert_clean_error(
        &eval_error(&model, &tmp.path().join("absent.jsonl")),
        &["absent.jsonl"],
    );
    let all_masked = tmp.path().join("masked.jsonl");
    write(
        &all_masked,
        "{\"input_ids\": [5, 6], \"labels\": [-100, -100]}\n",
    );
    assert_clean_error(
        &eval_error(&model, &all_masked),
        &["masked.jsonl", "no token has a label"],
    );
}

#[test]
fn missing_model_directory_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = good_data(tmp.path());
    assert_clean_error(
        &eval_error(&tmp.path().join("nowhere"), &data),
        &["nowhere", "not found"],
    );
}

#[test]
fn schedule_prints_one_json_object_with_the_bubble_and_actions() {
    let out = pp(&[
        "schedule",
        "--kind",
        "1f1b",
        "--ranks",
        "4",
        "--microbatches",
        "8",
        "--json",
    ]);
    let text = stdout(&out);
    assert_eq!(text.trim().lines().count(), 1);
    let report: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let bubble = report["bubble"].as_f64().unwrap();
    assert!((bubble - 3.0 / 11.0).abs() < 1e-9, "{bubble}");
    assert_eq!(report["actions"].as_array().unwrap().len(), 4);
    let chart = stdout(&pp(&[
        "schedule",
        "--kind",
        "zbv",
        "--ranks",
        "2",
        "--microbatches",
        "4",
    ]));
    assert!(
        chart.contains("rank  1 |") && chart.contains("bubble"),
        "{chart}"
    );
    let bad = pp(&[
        "schedule",
        "--kind",
        "interleaved",
        "--ranks",
        "5",
        "--microbatches",
        "7",
    ]);
    assert_clean_error(&bad, &["multiple of the ranks"]);
}

/// `pp generate` is greedy by default (the same as sampling among the one likeliest token),
/// a sampled answer repeats with its seed and changes with another, and a bad value is one
/// line naming it.
#[test]
fn generate_is_greedy_by_default_and_sampling_repeats_with_its_seed() {
    let model = model_arg("llama3-tiny");
    let answer = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            &model,
            "--prompt",
            "pipelines move",
            "--max-new-tokens",
            "16",
        ];
        args.extend_from_slice(extra);
        stdout(&pp(&args))
    };
    let greedy = answer(&[]);
    assert!(!greedy.trim().is_empty());
    assert_eq!(answer(&["--temperature", "1.5", "--top-k", "1"]), greedy);
    let sampled = answer(&["--temperature", "2", "--seed", "3"]);
    assert_eq!(answer(&["--temperature", "2", "--seed", "3"]), sampled);
    assert_ne!(answer(&["--temperature", "2", "--seed", "4"]), sampled);
    for (flag, value) in [
        ("--temperature", "-1"),
        ("--top-p", "0"),
        ("--repetition-penalty", "0"),
    ] {
        let out = pp(&[
            "generate",
            &model,
            "--prompt",
            "x",
            &format!("{flag}={value}"),
        ]);
        let name = flag.trim_start_matches("--").replace('-', "_");
        assert_clean_error(&out, &[&name]);
    }
}

/// A prompt that fills the context, or no room for new tokens, is refused before the model
/// runs, naming the row or the flag.
#[test]
fn generate_and_eval_refuse_prompts_without_room_naming_the_row() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("rows.jsonl");
    let long = "weather ".repeat(200);
    std::fs::write(
        &data,
        format!("{{\"prompt\": \"hi\"}}\n\n{{\"prompt\": \"{long}\"}}\n"),
    )
    .unwrap();
    let model = fixture("llama3-tiny").join("hf");
    let (model, data) = (model.to_str().unwrap(), data.to_str().unwrap());
    let line = format!("{data}:3");
    for command in [
        vec!["generate", model, "--data", data],
        vec!["eval", model, "--task", "tool-calls", "--data", data],
    ] {
        let out = pp(&[&command[..], &["--device", "cpu"]].concat());
        assert_clean_error(&out, &[&line, "400 tokens", "context of 128"]);
    }
    let out = pp(&["generate", model, "--prompt", &long, "--device", "cpu"]);
    assert_clean_error(&out, &["--prompt", "400 tokens"]);
    let out = pp(&["generate", model, "--prompt", "hi", "--max-new-tokens", "0"]);
    assert_clean_error(&out, &["--max-new-tokens"]);
}
