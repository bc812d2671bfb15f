//! JSONL datasets: each line one row, turned into token ids and labels in the Hugging Face
//! convention (labels aligned with `input_ids`, `-100` where there is no loss).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::loss::IGNORE_INDEX;
use crate::tokenizer::Tokenizer;

/// One tokenized row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids`; `-100` where no loss is taken.
    pub labels: Vec<i64>,
    /// 1-based line of the row in its file.
    pub line: usize,
}

/// Reads and tokenizes every row of a JSONL file. Blank lines are skipped; a row that is not
/// usable is an error naming its line. `tokenizer` is needed only for text rows.
pub fn read_jsonl(
    path: &Path,
    tokenizer: Option<&Tokenizer>,
    vocab_size: usize,
) -> Result<Vec<Example>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut examples = Vec::new();
    for (index, bytes) in BufReader::new(file).split(b'\n').enumerate() {
        let line = index + 1;
        let bytes = bytes.map_err(|e| Error::io(path, e))?;
        let row = RowContext { path, line };
        let text =
            std::str::from_utf8(&bytes).map_err(|e| row.error(format!("not valid UTF-8 ({e})")))?;
        if text.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(text).map_err(|e| row.error(format!("not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(row.error("a row must be a JSON object".into()));
        };
        let example = row.parse(&fields, tokenizer)?;
        row.check_vocab(&example, vocab_size)?;
        examples.push(example);
    }
    if examples.is_empty() {
        return Err(Error::DatasetFile {
            path: path.to_path_buf(),
            message: "the dataset has no rows".into(),
        });
    }
    Ok(examples)
}

/// Where a row came from, for its errors.
struct RowContext<'a> {
    path: &'a Path,
    line: usize,
}

impl RowContext<'_> {
    fn error(&self, message: String) -> Error {
        Error::Dataset {
            path: PathBuf::from(self.path),
            line: self.line,
            message,
        }
    }

    fn parse(&self, fields: &Map<String, Value>, tokenizer: Option<&Tokenizer>) -> Result<Example> {
        if let Some(ids) = fields.get("input_ids") {
            let input_ids: Vec<u32> = self
                .integers(ids, "input_ids")?
                .into_iter()
                .map(|id| {
                    u32::try_from(id)
                        .map_err(|_| self.error(format!("input_ids has an invalid token id {id}")))
                })
                .collect::<Result<_>>()?;
            let labels = match fields.get("labels") {
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
            return Ok(Example {
                input_ids,
                labels,
                line: self.line,
            });
        }
        if let Some(text) = fields.get("text") {
            let text = text
                .as_str()
                .ok_or_else(|| self.error("\"text\" must be a string".into()))?;
            let tokenizer = tokenizer.ok_or_else(|| {
                self.error(
                    "a \"text\" row needs the model's tokenizer.json, which is missing".into(),
                )
            })?;
            let input_ids = tokenizer.encode(text, true)?;
            let labels = input_ids.iter().map(|&id| i64::from(id)).collect();
            return Ok(Example {
                input_ids,
                labels,
                line: self.line,
            });
        }
        let found: Vec<&str> = fields.keys().map(String::as_str).collect();
        Err(self.error(format!(
            "no usable field: expected \"text\" or \"input_ids\" (found {found:?})"
        )))
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

    fn check_vocab(&self, example: &Example, vocab_size: usize) -> Result<()> {
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
