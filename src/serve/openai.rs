//! OpenAI's API shapes: requests as clients send them, checked into generation settings, and
//! the error body every failure is answered with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::sampling::Sampling;

/// Most stop strings per request (OpenAI's limit).
const MAX_STOP_STRINGS: usize = 4;
/// Most choices per request.
pub const MAX_CHOICES: u64 = 16;

/// A failed request: its status and OpenAI's `{"error": {...}}` body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about the request's content.
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// The same error with a machine-readable `code`.
    pub fn with_code(self, code: &'static str) -> Self {
        Self {
            code: Some(code),
            ..self
        }
    }

    /// Any status, as an invalid request.
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            ..Self::invalid(message, None)
        }
    }

    /// The server failed, not the request.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The `{"error": ...}` body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the token counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and completion requests share: sampling, budget, stops, streaming.
#[derive(Debug, Deserialize)]
pub struct Generation {
    pub model: String,
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens` in chat requests.
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not in OpenAI's API; vLLM's extension, kept for transformers users.
    pub top_k: Option<i64>,
    /// Not in OpenAI's API; vLLM's extension (transformers' rule).
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    /// Signed in OpenAI's API; any value seeds the draws.
    pub seed: Option<i64>,
    pub logprobs: Option<Value>,
    pub echo: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    #[serde(flatten)]
    pub generation: Generation,
}

/// `prompt` of a completion request: text or token ids, one or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdsList(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub generation: Generation,
}

/// A request's generation settings, checked.
#[derive(Debug, Clone)]
pub struct Checked {
    pub sampling: Sampling,
    /// `None`: as many as the context leaves.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub n: usize,
}

impl Generation {
    /// Checks every value, naming the first bad one; `seed` when the request has none.
    pub fn check(&self, default_seed: u64) -> Result<Checked, ApiError> {
        let unsupported = |param: &'static str| {
            ApiError::invalid(format!("{param} is not supported by pp serve"), Some(param))
        };
        for (param, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(unsupported(param));
            }
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != &json!(false))
        {
            return Err(unsupported("logprobs"));
        }
        if self.echo == Some(true) {
            return Err(unsupported("echo"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature must be between 0 and 2, not {temperature}"),
                Some("temperature"),
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => {
                return Err(ApiError::invalid(
                    format!("top_k must be -1 (off) or at least 0, not {k}"),
                    Some("top_k"),
                ))
            }
        };
        let sampling = Sampling {
            temperature,
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed: self.seed.map_or(default_seed, |seed| seed as u64),
        };
        sampling.validate().map_err(|message| {
            let param = if message.starts_with("top_p") {
                "top_p"
            } else {
                "repetition_penalty"
            };
            ApiError::invalid(message, Some(param))
        })?;
        let (param, max_tokens) = match self.max_completion_tokens {
            Some(m) => ("max_completion_tokens", Some(m)),
            None => ("max_tokens", self.max_tokens),
        };
        if max_tokens == Some(0) {
            return Err(ApiError::invalid(
                format!("{param} must be at least 1"),
                Some(param),
            ));
        }
        let max_tokens = max_tokens.map(|m| usize::try_from(m).unwrap_or(usize::MAX));
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_CHOICES).contains(&n) {
            return Err(ApiError::invalid(
                format!("n must be between 1 and {MAX_CHOICES}, not {n}"),
                Some("n"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS || stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid(
                format!("stop takes at most {MAX_STOP_STRINGS} non-empty strings"),
                Some("stop"),
            ));
        }
        Ok(Checked {
            sampling,
            max_tokens,
            stop,
            n: n as usize,
        })
    }

    /// Whether to answer with server-sent events.
    pub fn stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// Whether to end a stream with a chunk of token counts.
    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

/// OpenAI's chat messages as chat templates expect them: text parts joined into one string,
/// tool-call arguments as objects rather than JSON strings.
pub fn template_messages(messages: &[Value]) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (index, message) in messages.iter().enumerate() {
        let bad =
            |what: &str| ApiError::invalid(format!("messages[{index}]: {what}"), Some("messages"));
        let Value::Object(fields) = message else {
            return Err(bad("a message is an object"));
        };
        let mut fields = fields.clone();
        if !fields.get("role").is_some_and(Value::is_string) {
            return Err(bad("needs a \"role\" string"));
        }
        let content = match fields.get("content") {
            None | Some(Value::Null) => Value::Null,
            Some(Value::String(s)) => Value::String(s.clone()),
            Some(Value::Array(parts)) => Value::String(text_of_parts(parts).map_err(|e| bad(&e))?),
            Some(_) => return Err(bad("\"content\" is a string or a list of text parts")),
        };
        // Templates concatenate content: a missing one (an assistant's tool call) is "".
        let content = if content.is_null() {
            Value::String(String::new())
        } else {
            content
        };
        fields.insert("content".into(), content);
        if let Some(Value::Array(calls)) = fields.get_mut("tool_calls") {
            for call in calls {
                if let Some(arguments) = call.pointer_mut("/function/arguments") {
                    if let Some(parsed) = arguments
                        .as_str()
                        .and_then(|s| serde_json::from_str::<Value>(s).ok())
                    {
                        *arguments = parsed;
                    }
                }
            }
        }
        out.push(Value::Object(fields));
    }
    Ok(Value::Array(out))
}

/// The text of `[{"type": "text", "text": ...}, ...]`.
fn text_of_parts(parts: &[Value]) -> Result<String, String> {
    parts
        .iter()
        .map(|part| match part.get("type").and_then(Value::as_str) {
            Some("text") => part
                .get("text")
                .and_then(Value::as_str)
                .map(String::from)
                .ok_or_else(|| "a text part needs \"text\"".to_string()),
            Some(other) => Err(format!("content parts of type {other:?} are not supported")),
            None => Err("a content part needs a \"type\"".to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(extra: Value) -> Generation {
        let mut body = json!({"model": "m"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn bad_values_name_their_parameter() {
        for (extra, param) in [
            (json!({"temperature": 3.0}), "temperature"),
            (json!({"top_p": 0.0}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"logprobs": true}), "logprobs"),
            (json!({"top_k": -2}), "top_k"),
        ] {
            let err = generation(extra.clone()).check(0).unwrap_err();
            assert_eq!(err.param, Some(param), "{extra}: {}", err.message);
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
        }
        let ok = generation(json!({"temperature": 0, "stop": "\n", "n": 2, "seed": 7}))
            .check(1)
            .unwrap();
        assert_eq!(
            (ok.n, ok.stop, ok.sampling.seed),
            (2, vec!["\n".to_string()], 7)
        );
    }

    #[test]
    fn messages_are_shaped_for_templates() {
        let messages = vec![
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}),
        ];
        let shaped = template_messages(&messages).unwrap();
        assert_eq!(shaped[0]["content"], "ab");
        assert_eq!(shaped[1]["content"], "");
        assert_eq!(
            shaped[1]["tool_calls"][0]["function"]["arguments"],
            json!({"x": 1})
        );
        assert!(template_messages(&[json!({"content": "no role"})]).is_err());
        assert!(template_messages(&[]).is_err());
    }
}
