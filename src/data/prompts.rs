//! Rows to answer: `{"messages"}` (answered as the next assistant turn) or `{"prompt"}`, each
//! with the answer the row already holds, if any (a final assistant turn, or `"completion"`),
//! for `pp generate --data` and `pp eval --task tool-calls`.

use std::path::Path;

use serde_json::Value;

use super::rows::Row;
use crate::error::Result;
use crate::tokenizer::{Message, Tokenizer};

/// One row's prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptRow {
    /// 1-based line in its file.
    pub line: usize,
    /// Token ids to continue.
    pub prompt: Vec<u32>,
    /// The row's own answer: its final assistant turn (not part of the prompt) or its
    /// `"completion"`.
    pub reference: Option<String>,
}

/// The prompt of every row of `path`. A chat row ending in an assistant turn is answered in
/// that turn's place.
pub fn read_prompts(path: &Path, tokenizer: &Tokenizer) -> Result<Vec<PromptRow>> {
    super::read_objects(path)?
        .into_iter()
        .map(|(line, fields)| {
            let row = Row { path, line };
            let mut reference = None;
            let prompt = if let Some(messages) = fields.get("messages") {
                let mut messages: Vec<Message> =
                    serde_json::from_value(messages.clone()).map_err(|e| {
                        row.error(format!("\"messages\" is not a list of messages: {e}"))
                    })?;
                if messages.last().is_some_and(|m| m.role == "assistant") {
                    reference = messages.pop().map(|m| m.content);
                }
                tokenizer.encode_chat(&messages, true)?
            } else if let Some(prompt) = fields.get("prompt").and_then(Value::as_str) {
                reference = fields
                    .get("completion")
                    .and_then(Value::as_str)
                    .map(String::from);
                tokenizer.encode(prompt, true)?
            } else {
                return Err(row.error("expected \"messages\" or \"prompt\"".into()));
            };
            Ok(PromptRow {
                line,
                prompt,
                reference,
            })
        })
        .collect()
}
