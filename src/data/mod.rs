//! Datasets: JSONL rows turned into token ids and labels in the Hugging Face convention (labels
//! aligned with `input_ids`, `-100` where there is no loss), then into the sequences and batches
//! training consumes.

mod batches;
mod prompts;
mod rows;
mod template;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use batches::{split_validation, MicroBatch, Sequence, SequenceOptions, SequenceSet};
pub use prompts::{read_prompts, PromptRow};
pub use template::RowTemplate;

use crate::error::{Error, Result};
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

/// Which tokens of prompt/completion and chat rows are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Completions and assistant turns only.
    #[default]
    Completion,
    /// Every token, prompts included.
    All,
}

/// How rows become examples.
#[derive(Clone, Copy)]
pub struct RowOptions<'a> {
    /// The model's tokenizer; needed by every row that is not pre-tokenized.
    pub tokenizer: Option<&'a Tokenizer>,
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// Which tokens are scored.
    pub loss_on: LossOn,
    /// Builds the row's text (and completion) from its fields, for rows of other shapes.
    pub template: Option<&'a RowTemplate>,
    /// End text and completions with this token (training does, so the model learns to stop).
    pub append_eos: Option<u32>,
}

impl<'a> RowOptions<'a> {
    /// Rows scored as they are, with nothing appended: what `pp eval` reads.
    pub fn plain(tokenizer: Option<&'a Tokenizer>, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            vocab_size,
            loss_on: LossOn::All,
            template: None,
            append_eos: None,
        }
    }
}

/// Reads and tokenizes every row of a JSONL file. Blank lines are skipped; a row that is not
/// usable is an error naming its line.
pub fn read_jsonl(path: &Path, options: &RowOptions<'_>) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for (line, fields) in read_objects(path)? {
        let row = rows::Row { path, line };
        let example = row.parse(&fields, options)?;
        row.check_vocab(&example, options.vocab_size)?;
        examples.push(example);
    }
    Ok(examples)
}

/// The JSON object of every non-blank line of `path`, with its 1-based line number. A line
/// that is not a JSON object, or a file without rows, is an error naming the file (and line).
fn read_objects(path: &Path) -> Result<Vec<(usize, serde_json::Map<String, Value>)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut objects = Vec::new();
    for (index, bytes) in BufReader::new(file).split(b'\n').enumerate() {
        let line = index + 1;
        let bytes = bytes.map_err(|e| Error::io(path, e))?;
        let row = rows::Row { path, line };
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
        objects.push((line, fields));
    }
    if objects.is_empty() {
        return Err(Error::DatasetFile {
            path: path.to_path_buf(),
            message: "the dataset has no rows".into(),
        });
    }
    Ok(objects)
}

/// Error for a dataset-wide problem.
pub(crate) fn dataset_error(path: &Path, message: String) -> Error {
    Error::DatasetFile {
        path: PathBuf::from(path),
        message,
    }
}
