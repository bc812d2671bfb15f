//! Tokenization (`tokenizer.json` through the `tokenizers` crate) and chat templates (Jinja,
//! rendered with `minijinja` the way transformers renders them).

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// The tokenizer file transformers writes.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Special tokens, and the chat template in transformers 4 checkpoints.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
/// The chat template in transformers 5 checkpoints.
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// Start and end byte of a token in the text it was encoded from.
pub type ByteRange = (usize, usize);

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat_template: Option<ChatTemplate>,
    /// Special tokens from `tokenizer_config.json` (`bos_token`, `eos_token`, …), as the
    /// template sees them.
    special_tokens: serde_json::Map<String, Value>,
}

/// A chat template and the file it came from.
struct ChatTemplate {
    source: String,
    path: PathBuf,
}

/// One chat message.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Tokenizer {
    /// Loads `tokenizer.json`, `tokenizer_config.json` (optional) and the chat template
    /// (`chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`) from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        if !path.exists() {
            return Err(Error::Tokenizer {
                path,
                message: "not found; the model directory needs a tokenizer.json".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: format!("cannot load tokenizer: {e}"),
        })?;
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = if config_path.exists() {
            let text =
                std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
            serde_json::from_str::<Value>(&text).map_err(|e| Error::Tokenizer {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?
        } else {
            Value::Null
        };
        let special_tokens = special_tokens(&config);
        let template_path = dir.join(CHAT_TEMPLATE_FILE);
        let chat_template = if template_path.exists() {
            Some(ChatTemplate {
                source: std::fs::read_to_string(&template_path)
                    .map_err(|e| Error::io(&template_path, e))?,
                path: template_path,
            })
        } else {
            template_from_config(&config).map(|source| ChatTemplate {
                source,
                path: config_path,
            })
        };
        Ok(Self {
            inner,
            path,
            chat_template,
            special_tokens,
        })
    }

    /// Loads the tokenizer of `dir` if it has a `tokenizer.json` (pre-tokenized data needs
    /// none; text rows then report its absence).
    pub fn load_if_present(dir: &Path) -> Result<Option<Self>> {
        dir.join(TOKENIZER_FILE)
            .exists()
            .then(|| Self::load(dir))
            .transpose()
    }

    /// The `tokenizer.json` this was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (BOS and the like).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| Error::Tokenizer {
                    path: self.path.clone(),
                    message: format!("cannot encode text: {e}"),
                })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with the byte range of `text` each token came from (special tokens
    /// written in the text cover their own bytes).
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteRange>)> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot encode text: {e}"),
            })?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The id of the end-of-sequence token named by `tokenizer_config.json`'s `eos_token`.
    pub fn eos_id(&self) -> Option<u32> {
        let text = self.special_tokens.get("eos_token")?.as_str()?;
        self.inner.token_to_id(text)
    }

    /// The special token the chat template closes an assistant turn with (`<|im_end|>`,
    /// `<|eot_id|>`, `</s>`), found by rendering one: answers stop there. `None` without a
    /// template, or when the turn does not end in exactly one special token.
    pub fn end_of_turn_id(&self) -> Option<u32> {
        const ANSWER: &str = "\u{1}answer\u{1}";
        let messages = serde_json::json!([
            {"role": "user", "content": "question"},
            {"role": "assistant", "content": ANSWER},
        ]);
        let text = self.render_chat_values(messages, None, false).ok()?;
        let after = &text[text.find(ANSWER)? + ANSWER.len()..];
        match self.encode(after.trim(), false).ok()?.as_slice() {
            [id] if self
                .inner
                .get_added_tokens_decoder()
                .get(id)
                .is_some_and(|token| token.special) =>
            {
                Some(*id)
            }
            _ => None,
        }
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("cannot decode ids: {e}"),
            })
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders `messages` with the chat template, as transformers' `apply_chat_template` does.
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages = serde_json::to_value(messages).unwrap_or_default();
        self.render_chat_values(messages, None, add_generation_prompt)
    }

    /// Renders messages given as JSON (OpenAI's shape: tool calls, tool results) with the chat
    /// template, and `tools` (JSON schemas) as the template's `tools`.
    pub fn render_chat_values(
        &self,
        messages: Value,
        tools: Option<Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Tokenizer {
                path: self.path.clone(),
                message:
                    "the model has no chat template (chat_template.jinja or tokenizer_config.json)"
                        .into(),
            })?;
        let fail = |e: minijinja::Error| Error::Tokenizer {
            path: template.path.clone(),
            message: format!("chat template: {e}"),
        };
        let env = jinja_environment();
        let compiled = env.template_from_str(&template.source).map_err(fail)?;
        let mut context = self.special_tokens.clone();
        context.insert("messages".into(), messages);
        if let Some(tools) = tools {
            context.insert("tools".into(), tools);
        }
        context.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        compiled
            .render(minijinja::Value::from_serialize(&context))
            .map_err(fail)
    }

    /// Token ids of a rendered chat. Like transformers, no special tokens are added on top of
    /// what the template writes.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        self.encode(&self.render_chat(messages, add_generation_prompt)?, false)
    }
}

/// A Jinja environment configured like transformers' (`trim_blocks`, `lstrip_blocks`, Python
/// string methods, `raise_exception`, `strftime_now`).
fn jinja_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| {
        jiff::Timestamp::now().strftime(&format).to_string()
    });
    env
}

/// `bos_token`, `eos_token`, … from `tokenizer_config.json`: a string, or an added-token object
/// whose `content` is the string.
fn special_tokens(config: &Value) -> serde_json::Map<String, Value> {
    let mut tokens = serde_json::Map::new();
    for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
        let text = match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
            _ => None,
        };
        if let Some(text) = text {
            tokens.insert(key.into(), Value::String(text));
        }
    }
    tokens
}

/// `chat_template` from `tokenizer_config.json`: a string, or a list of named templates of which
/// `default` is the chat one.
fn template_from_config(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn special_tokens_accept_strings_and_added_token_objects() {
        let config = json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": false}});
        let tokens = special_tokens(&config);
        assert_eq!(tokens["bos_token"], "<s>");
        assert_eq!(tokens["eos_token"], "</s>");
    }

    #[test]
    fn named_templates_pick_default() {
        let config = json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(template_from_config(&config).as_deref(), Some("D"));
    }

    #[test]
    fn tools_and_tool_calls_reach_the_template() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/llama3-tiny/hf/tokenizer.json"
            ),
            dir.path().join(TOKENIZER_FILE),
        )
        .unwrap();
        let template = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}\
                        {% for m in messages %}{{ m.role }}:{{ m.content }}\
                        {% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %};\
                        {% endfor %}";
        std::fs::write(dir.path().join(CHAT_TEMPLATE_FILE), template).unwrap();
        let tokenizer = Tokenizer::load(dir.path()).unwrap();
        let messages = json!([
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        ]);
        let tools = json!([{"type": "function", "function": {"name": "get_weather"}}]);
        let text = tokenizer
            .render_chat_values(messages, Some(tools), false)
            .unwrap();
        assert_eq!(text, r#"[get_weather]user:hi;assistant:{"x":1};"#);
    }

    #[test]
    fn the_end_of_turn_token_is_found_by_rendering_a_turn() {
        let hf = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama3-tiny/hf");
        let tokenizer = Tokenizer::load(Path::new(hf)).unwrap();
        let end = tokenizer.end_of_turn_id().unwrap();
        assert_eq!(tokenizer.decode(&[end], false).unwrap(), "<|im_end|>");
        // Without a template there is none.
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            Path::new(hf).join(TOKENIZER_FILE),
            dir.path().join(TOKENIZER_FILE),
        )
        .unwrap();
        assert_eq!(Tokenizer::load(dir.path()).unwrap().end_of_turn_id(), None);
    }

    #[test]
    fn environment_behaves_like_transformers() {
        let env = jinja_environment();
        let source = "{% for m in messages %}\n  {{ m.content.strip() | upper }}\n{% endfor %}\
                      {% if not messages %}{{ raise_exception('empty') }}{% endif %}";
        let out = env
            .render_str(
                source,
                minijinja::context! { messages => vec![json!({"content": " hi "})] },
            )
            .unwrap();
        // trim_blocks drops the newline after a block tag; lstrip_blocks only strips before
        // block tags, so the indentation before an expression stays, as in Jinja2.
        assert_eq!(out, "  HI\n");
        let err = env
            .render_str(
                source,
                minijinja::context! { messages => Vec::<Value>::new() },
            )
            .unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
