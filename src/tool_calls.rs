//! Tool calls in a model's answer: the formats function-calling fine-tunes write them in, parsed
//! into names and JSON arguments (`pp serve` returns them as OpenAI's `tool_calls`; `pp eval
//! --task tool-calls` scores them).

use serde_json::Value;

/// How a model writes its tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ToolCallFormat {
    /// The first of the formats below that the answer is in.
    #[default]
    Auto,
    /// The whole answer is one JSON call `{"name", "arguments"}` or a list of them (what pp's
    /// tool-call demo trains; Llama 3's `"parameters"` is read as arguments).
    Json,
    /// Hermes / Qwen: each call is JSON inside `<tool_call>…</tool_call>`, after optional text.
    Hermes,
    /// Mistral: `[TOOL_CALLS]` followed by a JSON list of calls.
    Mistral,
}

/// One call: the function's name and its arguments (a JSON object).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: Value,
}

/// An answer that calls tools: the calls, and any text written before them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCalls {
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_PREFIX: &str = "[TOOL_CALLS]";

impl ToolCallFormat {
    /// The tool calls in `text`, or `None` when it is not (wholly) a tool call in this format.
    pub fn parse(self, text: &str) -> Option<ToolCalls> {
        match self {
            ToolCallFormat::Auto => [
                ToolCallFormat::Hermes,
                ToolCallFormat::Mistral,
                ToolCallFormat::Json,
            ]
            .into_iter()
            .find_map(|format| format.parse(text)),
            ToolCallFormat::Json => calls_in_json(text.trim()).map(|calls| ToolCalls {
                content: None,
                calls,
            }),
            ToolCallFormat::Hermes => {
                let start = text.find(HERMES_OPEN)?;
                let mut calls = Vec::new();
                let mut rest = &text[start..];
                while let Some(body) = rest.trim_start().strip_prefix(HERMES_OPEN) {
                    // A call cut off by the token budget has no closing tag: still a call if
                    // its JSON is whole.
                    let (json, after) = body.split_once(HERMES_CLOSE).unwrap_or((body, ""));
                    calls.push(call_in(&serde_json::from_str(json.trim()).ok()?)?);
                    rest = after;
                }
                if !rest.trim().is_empty() {
                    return None;
                }
                let content = text[..start].trim();
                Some(ToolCalls {
                    content: (!content.is_empty()).then(|| content.to_string()),
                    calls,
                })
            }
            ToolCallFormat::Mistral => {
                let json = text.trim_start().strip_prefix(MISTRAL_PREFIX)?;
                calls_in_json(json.trim()).map(|calls| ToolCalls {
                    content: None,
                    calls,
                })
            }
        }
    }
}

/// How many answers were tool calls, and how many the expected ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallScore {
    /// Answers scored.
    pub rows: usize,
    /// Answers that are tool calls in the format (valid JSON, a name, object arguments).
    pub valid: usize,
    /// Answers whose calls equal the reference's (names and arguments, as JSON values: key
    /// order and spacing do not matter).
    pub exact: usize,
}

impl CallScore {
    /// Scores `answer` against `reference`, both read in `format`. `reference` must be a call.
    pub fn add(&mut self, format: ToolCallFormat, reference: &ToolCalls, answer: &str) {
        self.rows += 1;
        if let Some(answered) = format.parse(answer) {
            self.valid += 1;
            self.exact += usize::from(answered.calls == reference.calls);
        }
    }
}

/// A JSON call or a non-empty list of calls.
fn calls_in_json(text: &str) -> Option<Vec<ToolCall>> {
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Array(items) if !items.is_empty() => items.iter().map(call_in).collect(),
        value => Some(vec![call_in(&value)?]),
    }
}

/// `{"name": string, "arguments" | "parameters": object}` as a call.
fn call_in(value: &Value) -> Option<ToolCall> {
    let name = value.get("name")?.as_str()?;
    let arguments = value.get("arguments").or_else(|| value.get("parameters"))?;
    // Some models write the arguments as a JSON string, as OpenAI sends them.
    let arguments = match arguments {
        Value::String(s) => serde_json::from_str(s).ok()?,
        other => other.clone(),
    };
    arguments.is_object().then(|| ToolCall {
        name: name.to_string(),
        arguments,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, arguments: Value) -> ToolCall {
        ToolCall {
            name: name.into(),
            arguments,
        }
    }

    #[test]
    fn every_format_is_read_and_auto_finds_it() {
        let weather = call("get_weather", json!({"city": "Paris"}));
        let json = r#"{"name":"get_weather","arguments":{"city":"Paris"}}"#;
        let hermes = format!("Let me check.\n<tool_call>\n{json}\n</tool_call>");
        let mistral = format!("[TOOL_CALLS] [{json}]");
        for (format, text, content) in [
            (ToolCallFormat::Json, json.to_string(), None),
            (
                ToolCallFormat::Hermes,
                hermes,
                Some("Let me check.".to_string()),
            ),
            (ToolCallFormat::Mistral, mistral, None),
        ] {
            let expected = ToolCalls {
                content,
                calls: vec![weather.clone()],
            };
            assert_eq!(format.parse(&text), Some(expected.clone()), "{format:?}");
            assert_eq!(
                ToolCallFormat::Auto.parse(&text),
                Some(expected),
                "auto: {format:?}"
            );
        }
    }

    #[test]
    fn lists_llama_parameters_and_string_arguments_are_calls() {
        let two = r#"[{"name":"a","arguments":{}},{"name":"b","parameters":{"x":1}}]"#;
        let calls = ToolCallFormat::Json.parse(two).unwrap().calls;
        assert_eq!(
            calls,
            vec![call("a", json!({})), call("b", json!({"x": 1}))]
        );
        let stringly = r#"{"name":"a","arguments":"{\"x\": 2}"}"#;
        assert_eq!(
            ToolCallFormat::Json.parse(stringly).unwrap().calls,
            vec![call("a", json!({"x": 2}))]
        );
    }

    #[test]
    fn text_and_broken_calls_are_not_calls() {
        for text in [
            "The weather in Paris is sunny.",
            r#"{"name":"get_weather"}"#,
            r#"{"name":"get_weather","arguments":[1]}"#,
            r#"{"name":"get_weather","arguments":{"city":"#,
            "<tool_call>{not json}</tool_call>",
            "<tool_call>{\"name\":\"a\",\"arguments\":{}}</tool_call> and then text",
            "[]",
        ] {
            assert_eq!(ToolCallFormat::Auto.parse(text), None, "{text}");
        }
    }
}
