//! One JSONL row to one [`Example`]: pre-tokenized, text, prompt/completion, chat messages, or
//! any shape through a [`RowTemplate`](super::RowTemplate).

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{Example, LossOn, RowOptions};
use crate::error::{Error, Result};
use crate::model::loss::IGNORE_INDEX;
use crate::tokenizer::{Message, Tokenizer};

/// Where a row came from, for its errors.
pub(super) struct Row<'a> {
    pub path: &'a Path,
    pub line: usize,
}

impl Row<'_> {
    pub fn error(&self, message: String) -> Error {
        Error::Dataset {
            path: PathBuf::from(self.path),
            line: self.line,
            message,
        }
    }

    pub fn parse(&self, fields: &Map<String, Value>, options: &RowOptions<'_>) -> Result<Example> {
        let (input_ids, labels) = if let Some(template) = options.template {
            let (prompt, completion) = template.render(fields).map_err(|field| {
                self.error(format!("the template's field \"{field}\" is missing"))
            })?;
            match completion {
                Some(completion) => self.prompt_completion(&prompt, &completion, options)?,
                None => self.text(&prompt, options)?,
            }
        } else if let Some(ids) = fields.get("input_ids") {
            self.pre_tokenized(ids, fields.get("labels"))?
        } else if let Some(messages) = fields.get("messages") {
            self.chat(messages, options)?
        } else if let (Some(prompt), Some(completion)) =
            (fields.get("prompt"), fields.get("completion"))
        {
            let prompt = self.string(prompt, "prompt")?;
            let completion = self.string(completion, "completion")?;
            self.prompt_completion(prompt, completion, options)?
        } else if let Some(text) = fields.get("text") {
            self.text(self.string(text, "text")?, options)?
        } else {
            let found: Vec<&str> = fields.keys().map(String::as_str).collect();
            return Err(self.error(format!(
                "no usable field: expected \"text\", \"prompt\" and \"completion\", \"messages\" \
                 or \"input_ids\" (found {found:?})"
            )));
        };
        Ok(Example {
            input_ids,
            labels,
            line: self.line,
        })
    }

    fn pre_tokenized(&self, ids: &Value, labels: Option<&Value>) -> Result<(Vec<u32>, Vec<i64>)> {
        let input_ids: Vec<u32> = self
            .integers(ids, "input_ids")?
            .into_iter()
            .map(|id| {
                u32::try_from(id)
                    .map_err(|_| self.error(format!("input_ids has an invalid token id {id}")))
            })
            .collect::<Result<_>>()?;
        let labels = match labels {
            None | Some(Value::Null) => input_ids.iter().map(|&id| i64::from(id)).collect(),
            Some(labels) => self.integers(labels, "labels")?,
        };
        if labels.len() != input_ids.len() {
            return Err(self.error(format!(
                "labels has {} entries but input_ids has {}; they must be aligned",
                labels.len(),
                input_ids.len()
            )));
        }
        Ok((input_ids, labels))
    }

    fn text(&self, text: &str, options: &RowOptions<'_>) -> Result<(Vec<u32>, Vec<i64>)> {
        let mut ids = self.tokenizer(options)?.encode(text, true)?;
        ids.extend(options.append_eos);
        let labels = ids.iter().map(|&id| i64::from(id)).collect();
        Ok((ids, labels))
    }

    /// The prompt with the tokenizer's special tokens, then the completion (and EOS); the prompt
    /// is scored only with `--loss-on all`.
    fn prompt_completion(
        &self,
        prompt: &str,
        completion: &str,
        options: &RowOptions<'_>,
    ) -> Result<(Vec<u32>, Vec<i64>)> {
        let tokenizer = self.tokenizer(options)?;
        let mut ids = tokenizer.encode(prompt, true)?;
        let prompt_len = ids.len();
        ids.extend(tokenizer.encode(completion, false)?);
        ids.extend(options.append_eos);
        let labels = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| match options.loss_on {
                LossOn::Completion if i < prompt_len => IGNORE_INDEX,
                _ => i64::from(id),
            })
            .collect();
        Ok((ids, labels))
    }

    /// Renders the conversation with the chat template and scores the tokens of assistant turns
    /// (their end-of-turn marker included, so the model learns to stop).
    fn chat(&self, messages: &Value, options: &RowOptions<'_>) -> Result<(Vec<u32>, Vec<i64>)> {
        let tokenizer = self.tokenizer(options)?;
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
            self.error(format!(
                "\"messages\" must be a list of {{\"role\", \"content\"}} objects: {e}"
            ))
        })?;
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(self.error("the conversation has no assistant turn to learn from".into()));
        }
        let full = tokenizer.render_chat(&messages, false)?;
        let spans = assistant_spans(tokenizer, &messages, &full).map_err(|e| self.error(e))?;
        let (ids, offsets) = tokenizer.encode_with_offsets(&full)?;
        let labels = ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(start, _))| {
                let scored = options.loss_on == LossOn::All
                    || spans.iter().any(|span| span.contains(&start));
                if scored {
                    i64::from(id)
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        Ok((ids, labels))
    }

    fn tokenizer<'t>(&self, options: &RowOptions<'t>) -> Result<&'t Tokenizer> {
        options.tokenizer.ok_or_else(|| {
            self.error("a text row needs the model's tokenizer.json, which is missing".into())
        })
    }

    fn string<'v>(&self, value: &'v Value, field: &str) -> Result<&'v str> {
        value
            .as_str()
            .ok_or_else(|| self.error(format!("\"{field}\" must be a string")))
    }

    fn integers(&self, value: &Value, field: &str) -> Result<Vec<i64>> {
        let items = value
            .as_array()
            .ok_or_else(|| self.error(format!("\"{field}\" must be a list of integers")))?;
        items
            .iter()
            .map(|v| {
                v.as_i64().ok_or_else(|| {
                    self.error(format!("\"{field}\" must be a list of integers, found {v}"))
                })
            })
            .collect()
    }

    pub fn check_vocab(&self, example: &Example, vocab_size: usize) -> Result<()> {
        let labels = example.labels.iter().filter(|&&l| l != IGNORE_INDEX);
        let ids = example.input_ids.iter().map(|&id| i64::from(id));
        for (position, id) in ids.chain(labels.copied()).enumerate() {
            if id < 0 || id as usize >= vocab_size {
                let field = if position < example.input_ids.len() {
                    "input_ids"
                } else {
                    "labels"
                };
                return Err(self.error(format!(
                    "{field} has token id {id}, outside the vocabulary of {vocab_size} tokens"
                )));
            }
        }
        Ok(())
    }
}

/// The byte ranges of `full` (the whole rendered conversation) written by assistant turns.
///
/// Turn `i` starts where the rendering of the turns before it with the generation prompt ends,
/// and ends where the rendering of the turns up to it ends; both must be prefixes of `full`,
/// which holds for templates that render a conversation turn by turn.
fn assistant_spans(
    tokenizer: &Tokenizer,
    messages: &[Message],
    full: &str,
) -> std::result::Result<Vec<Range<usize>>, String> {
    let prefix_of_full = |rendered: String| {
        if full.starts_with(&rendered) {
            Ok(rendered.len())
        } else {
            Err(
                "the chat template does not render this conversation turn by turn, so the \
                 assistant turns cannot be located; use --loss-on all"
                    .to_string(),
            )
        }
    };
    let render = |turns: &[Message], generation_prompt: bool| {
        tokenizer
            .render_chat(turns, generation_prompt)
            .map_err(|e| e.to_string())
    };
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let start = prefix_of_full(render(&messages[..i], true)?)?;
        let end = prefix_of_full(render(&messages[..=i], false)?)?;
        spans.push(start..end);
    }
    Ok(spans)
}
