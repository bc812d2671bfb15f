//! Dataset rows to labels with the fixture's real tokenizer and chat template: which tokens are
//! scored for chat, prompt/completion, text and templated rows.

mod common;

use common::fixture;
use pp::data::{read_jsonl, Example, LossOn, RowOptions, RowTemplate};
use pp::model::loss::IGNORE_INDEX;
use pp::tokenizer::Tokenizer;

fn rows(jsonl: &str, loss_on: LossOn, template: Option<&RowTemplate>) -> Vec<Example> {
    let tokenizer = Tokenizer::load(&fixture("llama3-tiny").join("hf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    std::fs::write(&path, jsonl).unwrap();
    let options = RowOptions {
        tokenizer: Some(&tokenizer),
        vocab_size: 384,
        loss_on,
        template,
        append_eos: tokenizer.eos_id(),
    };
    read_jsonl(&path, &options).unwrap()
}

/// The text of the scored tokens, run by run.
fn scored_text(example: &Example) -> Vec<String> {
    let tokenizer = Tokenizer::load(&fixture("llama3-tiny").join("hf")).unwrap();
    let mut runs: Vec<Vec<u32>> = Vec::new();
    let mut previous = false;
    for (&id, &label) in example.input_ids.iter().zip(&example.labels) {
        let scored = label != IGNORE_INDEX;
        if scored {
            if !previous {
                runs.push(Vec::new());
            }
            runs.last_mut().unwrap().push(id);
        }
        previous = scored;
    }
    runs.iter()
        .map(|ids| tokenizer.decode(ids, false).unwrap())
        .collect()
}

#[test]
fn chat_rows_score_only_assistant_turns() {
    let row = r#"{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": "{\"city\":\"Oslo\"}"},
        {"role": "user", "content": "and Rome?"},
        {"role": "assistant", "content": "{\"city\":\"Rome\"}"}]}"#
        .replace('\n', " ");
    let example = &rows(&row, LossOn::Completion, None)[0];
    assert_eq!(
        scored_text(example),
        vec![
            "{\"city\":\"Oslo\"}<|im_end|>\n",
            "{\"city\":\"Rome\"}<|im_end|>\n"
        ]
    );
    let all = &rows(&row, LossOn::All, None)[0];
    assert!(all.labels.iter().all(|&l| l != IGNORE_INDEX));
    assert_eq!(all.input_ids, example.input_ids);
}

#[test]
fn prompt_completion_rows_score_the_completion_and_eos() {
    let example = &rows(
        r#"{"prompt": "Q: 2+2?\nA:", "completion": " 4"}"#,
        LossOn::Completion,
        None,
    )[0];
    assert_eq!(scored_text(example), vec![" 4<|end_of_text|>"]);
}

#[test]
fn templates_build_rows_of_any_shape() {
    let template = RowTemplate::parse("Q: {question}\nA:", Some(" {answer}")).unwrap();
    let example = &rows(
        r#"{"question": "capital of France?", "answer": "Paris", "id": 7}"#,
        LossOn::Completion,
        Some(&template),
    )[0];
    assert_eq!(scored_text(example), vec![" Paris<|end_of_text|>"]);
    let text_only = RowTemplate::parse("{question} {answer}", None).unwrap();
    let example = &rows(
        r#"{"question": "capital?", "answer": "Paris"}"#,
        LossOn::Completion,
        Some(&text_only),
    )[0];
    assert_eq!(scored_text(example), vec!["capital? Paris<|end_of_text|>"]);
}

#[test]
fn text_rows_score_everything() {
    let example = &rows(r#"{"text": "hello world"}"#, LossOn::Completion, None)[0];
    assert_eq!(scored_text(example), vec!["hello world<|end_of_text|>"]);
}
