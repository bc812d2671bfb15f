//! The HTTP endpoints: `/v1/models`, `/v1/chat/completions`, `/v1/completions` and `/health`,
//! answering as OpenAI does, whole or streamed as server-sent events.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc::{self, UnboundedReceiver};
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::{StreamExt, StreamMap};

use super::engine::{Event, Job};
use super::openai::{
    template_messages, ApiError, ChatRequest, Checked, CompletionRequest, Generation, Prompt,
};
use super::ServerState;
use crate::generate::{FinishReason, GenerationOptions};
use crate::tool_calls::ToolCalls;

/// Most sequences (prompts × `n`) one request may ask for.
const MAX_SEQUENCES_PER_REQUEST: usize = 64;

/// Request ids and default seeds differ per request.
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh id with `prefix` (`chatcmpl-…`), and a seed for requests that bring none.
fn request_id(prefix: &str) -> (String, u64) {
    let count = REQUESTS.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed = nanos ^ count.rotate_left(32);
    (format!("{prefix}-{seed:016x}"), seed)
}

/// `GET /health`: up, and how busy.
pub async fn health(State(state): State<Arc<ServerState>>) -> Json<Value> {
    let load = state.engine.load();
    Json(json!({
        "status": "ok",
        "model": state.settings.model_name,
        "running": load.running.load(Ordering::SeqCst),
        "waiting": load.waiting.load(Ordering::SeqCst),
    }))
}

/// `GET /v1/models`.
pub async fn models(State(state): State<Arc<ServerState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.settings.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "pp",
            "max_model_len": state.settings.max_len,
        }],
    }))
}

/// Checks `Authorization: Bearer KEY` when the server has a key.
pub async fn authorize(
    State(state): State<Arc<ServerState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.settings.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            let mut error = ApiError::status(
                StatusCode::UNAUTHORIZED,
                "missing or incorrect API key (Authorization: Bearer KEY)",
            )
            .with_code("invalid_api_key");
            error.kind = "authentication_error";
            return error.into_response();
        }
    }
    next.run(request).await
}

/// Any other path.
pub async fn not_found() -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, "no such endpoint").with_code("not_found")
}

/// A known path with another method (`GET /v1/chat/completions`).
pub async fn method_not_allowed() -> ApiError {
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "this endpoint does not take that method",
    )
}

/// The JSON body as `T`, or the 4xx that says why not (too large, not JSON, wrong shape).
fn parse_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| ApiError::status(e.status(), e.body_text()))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid(format!("the body is not a valid request: {e}"), None))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: ChatRequest = parse_body(body)?;
    state.check_model(&request.generation.model)?;
    let (id, seed) = request_id("chatcmpl");
    let checked = request.generation.check(seed)?;
    let messages = template_messages(&request.messages)?;
    let tools = request.tools.clone().filter(|t| !t.is_empty());
    let parse_tools = tools.is_some() && request.tool_choice.as_ref() != Some(&json!("none"));
    let rendered = state
        .tokenizer
        .render_chat_values(messages, tools.map(Value::Array), true)
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
    let prompt = state
        .tokenizer
        .encode(&rendered, false)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let reply = Reply {
        id,
        model: state.settings.model_name.clone(),
        created: unix_seconds(),
        kind: Kind::Chat { parse_tools },
        prompt_tokens: prompt.len(),
    };
    let receivers = state.submit(&[prompt], &checked, None, "messages")?;
    reply.respond(state, receivers, &request.generation).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<Arc<ServerState>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: CompletionRequest = parse_body(body)?;
    state.check_model(&request.generation.model)?;
    let (id, seed) = request_id("cmpl");
    let checked = request.generation.check(seed)?;
    let encode = |text: &str| {
        state
            .tokenizer
            .encode(text, true)
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    let prompts = match request.prompt {
        Prompt::Text(text) => vec![encode(&text)?],
        Prompt::Texts(texts) => texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        Prompt::Ids(ids) => vec![ids],
        Prompt::IdsList(list) => list,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt must not be empty",
            Some("prompt"),
        ));
    }
    let vocab = state.vocab_size;
    if prompts.iter().flatten().any(|&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            format!("a prompt token id is outside the vocabulary of {vocab}"),
            Some("prompt"),
        ));
    }
    let reply = Reply {
        id,
        model: state.settings.model_name.clone(),
        created: unix_seconds(),
        kind: Kind::Completion,
        prompt_tokens: prompts.iter().map(Vec::len).sum(),
    };
    // OpenAI's default budget for completions.
    let receivers = state.submit(&prompts, &checked, Some(16), "prompt")?;
    reply.respond(state, receivers, &request.generation).await
}

impl ServerState {
    fn check_model(&self, model: &str) -> Result<(), ApiError> {
        if model == self.settings.model_name {
            return Ok(());
        }
        let mut error = ApiError::status(
            StatusCode::NOT_FOUND,
            format!(
                "the model {model:?} does not exist; this server serves {:?}",
                self.settings.model_name
            ),
        )
        .with_code("model_not_found");
        error.param = Some("model");
        Err(error)
    }

    /// Queues `n` sequences per prompt (choice `i * n + j` is prompt `i`'s `j`-th), after
    /// checking that each fits the context.
    fn submit(
        &self,
        prompts: &[Vec<u32>],
        checked: &Checked,
        default_max_tokens: Option<usize>,
        prompt_param: &'static str,
    ) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
        let max_len = self.settings.max_len;
        if prompts.len().saturating_mul(checked.n) > MAX_SEQUENCES_PER_REQUEST {
            return Err(ApiError::invalid(
                format!(
                    "{} prompts with n={} would be {} sequences; a request may ask for at most \
                     {MAX_SEQUENCES_PER_REQUEST}",
                    prompts.len(),
                    checked.n,
                    prompts.len().saturating_mul(checked.n)
                ),
                Some("n"),
            ));
        }
        let mut jobs = Vec::new();
        for prompt in prompts {
            if prompt.is_empty() {
                return Err(ApiError::invalid("a prompt has no tokens", Some("prompt")));
            }
            let too_long = |asked: String| {
                ApiError::invalid(
                    format!(
                        "this model's maximum context length is {max_len} tokens; the prompt has \
                         {} tokens{asked}",
                        prompt.len()
                    ),
                    Some(prompt_param),
                )
                .with_code("context_length_exceeded")
            };
            if prompt.len() >= max_len {
                return Err(too_long(String::new()));
            }
            let room = max_len - prompt.len();
            let max_tokens = checked.max_tokens.or(default_max_tokens).unwrap_or(room);
            if max_tokens > room {
                return Err(too_long(format!(" and {max_tokens} more were asked for")));
            }
            for choice in 0..checked.n {
                let mut sampling = checked.sampling.clone();
                sampling.seed = sampling.seed.wrapping_add(choice as u64);
                let options = GenerationOptions {
                    sampling,
                    max_new_tokens: max_tokens,
                    stop_tokens: self.settings.stop_tokens.clone(),
                    stop_strings: checked.stop.clone(),
                };
                jobs.push((prompt.clone(), options));
            }
        }
        let mut receivers = Vec::with_capacity(jobs.len());
        for (prompt, options) in jobs {
            let (events, receiver) = mpsc::unbounded_channel();
            let job = Job {
                prompt,
                options,
                events,
            };
            if !self.engine.submit(job) {
                return Err(ApiError::internal("the model's engine has stopped"));
            }
            receivers.push(receiver);
        }
        Ok(receivers)
    }
}

/// Which endpoint a reply is for.
#[derive(Clone, Copy)]
enum Kind {
    Chat { parse_tools: bool },
    Completion,
}

/// What every chunk and answer of one request carries.
struct Reply {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
    /// Tokens of the request's prompts (each counted once, whatever `n`).
    prompt_tokens: usize,
}

/// One finished choice.
struct Choice {
    text: String,
    finish: FinishReason,
    completion_tokens: usize,
}

impl Reply {
    /// The envelope of an answer or chunk around `choices`.
    fn envelope(&self, choices: Value, chunk: bool) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Chat { .. }, false) => "chat.completion",
            (Kind::Chat { .. }, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// Token counts of the request.
    fn usage(&self, choices: &[Choice]) -> Value {
        let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
        json!({"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
               "total_tokens": self.prompt_tokens + completion})
    }

    /// The tool calls in `text`, when this request may have some.
    fn tool_calls(&self, state: &ServerState, text: &str) -> Option<ToolCalls> {
        match self.kind {
            Kind::Chat { parse_tools: true } => state.settings.tool_call_format.parse(text),
            _ => None,
        }
    }

    /// Answers streamed or whole, as the request asked.
    async fn respond(
        self,
        state: Arc<ServerState>,
        receivers: Vec<UnboundedReceiver<Event>>,
        generation: &Generation,
    ) -> Result<Response, ApiError> {
        if generation.stream() {
            Ok(self.stream(state, receivers, generation.include_usage()))
        } else {
            self.whole(&state, receivers).await
        }
    }

    /// Waits for every choice and answers with all of them.
    async fn whole(
        self,
        state: &ServerState,
        receivers: Vec<UnboundedReceiver<Event>>,
    ) -> Result<Response, ApiError> {
        let mut choices = Vec::with_capacity(receivers.len());
        for mut receiver in receivers {
            let mut text = String::new();
            let done = loop {
                match receiver.recv().await {
                    Some(Event::Text(piece)) => text.push_str(&piece),
                    Some(Event::Done {
                        finish,
                        completion_tokens,
                    }) => {
                        break Choice {
                            text,
                            finish,
                            completion_tokens,
                        }
                    }
                    Some(Event::Error(message)) => return Err(ApiError::internal(message)),
                    None => return Err(ApiError::internal("the model's engine has stopped")),
                };
            };
            choices.push(done);
        }
        let usage = self.usage(&choices);
        let rendered: Vec<Value> = choices
            .into_iter()
            .enumerate()
            .map(|(index, choice)| self.whole_choice(state, index, choice))
            .collect();
        let mut body = self.envelope(Value::Array(rendered), false);
        body["usage"] = usage;
        Ok(Json(body).into_response())
    }

    fn whole_choice(&self, state: &ServerState, index: usize, choice: Choice) -> Value {
        match self.kind {
            Kind::Completion => json!({
                "index": index, "text": choice.text, "logprobs": null,
                "finish_reason": choice.finish.as_str(),
            }),
            Kind::Chat { .. } => {
                let (message, finish) = match self.tool_calls(state, &choice.text) {
                    Some(calls) => (
                        json!({"role": "assistant", "content": calls.content,
                               "tool_calls": tool_calls_json(&calls, false)}),
                        "tool_calls",
                    ),
                    None => (
                        json!({"role": "assistant", "content": choice.text}),
                        choice.finish.as_str(),
                    ),
                };
                json!({"index": index, "message": message, "logprobs": null,
                       "finish_reason": finish})
            }
        }
    }

    /// Streams every choice as server-sent events, chunk by chunk, then `[DONE]`.
    fn stream(
        self,
        state: Arc<ServerState>,
        receivers: Vec<UnboundedReceiver<Event>>,
        include_usage: bool,
    ) -> Response {
        let (sender, events) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
        tokio::spawn(async move {
            let mut streams = StreamMap::new();
            for (index, receiver) in receivers.into_iter().enumerate() {
                streams.insert(index, UnboundedReceiverStream::new(receiver));
            }
            let mut writer = ChunkWriter {
                reply: &self,
                state: &state,
                sender: &sender,
                held: vec![String::new(); streams.len()],
                finished: Vec::new(),
            };
            if writer.start(streams.len()).await.is_err() {
                return;
            }
            loop {
                // A client that goes away ends the stream at once, even while its sequences
                // wait for a place in the batch; dropping the receivers cancels them.
                let next = tokio::select! {
                    next = streams.next() => next,
                    _ = sender.closed() => return,
                };
                let Some((index, event)) = next else { break };
                if writer.event(index, event).await.is_err() {
                    return;
                }
            }
            // Every choice ended with `Done`, or the engine went away mid-answer.
            if writer.finished.len() < writer.held.len() {
                let _ = writer
                    .send(
                        ApiError::internal("the model's engine has stopped")
                            .body()
                            .to_string(),
                    )
                    .await;
                return;
            }
            let _ = writer.end(include_usage).await;
        });
        Sse::new(ReceiverStream::new(events))
            .keep_alive(KeepAlive::default())
            .into_response()
    }
}

/// The client is gone.
struct Gone;

/// Turns engine events into OpenAI chunks on one stream.
struct ChunkWriter<'a> {
    reply: &'a Reply,
    state: &'a ServerState,
    sender: &'a mpsc::Sender<Result<SseEvent, Infallible>>,
    /// Text of chat choices that may be tool calls, held until they finish.
    held: Vec<String>,
    finished: Vec<Choice>,
}

impl ChunkWriter<'_> {
    async fn send(&self, data: String) -> Result<(), Gone> {
        self.sender
            .send(Ok(SseEvent::default().data(data)))
            .await
            .map_err(|_| Gone)
    }

    async fn chunk(&self, choices: Value) -> Result<(), Gone> {
        self.send(self.reply.envelope(choices, true).to_string())
            .await
    }

    /// A chat stream opens with each choice's role.
    async fn start(&self, choices: usize) -> Result<(), Gone> {
        if let Kind::Chat { .. } = self.reply.kind {
            for index in 0..choices {
                self.chunk(
                    json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                                   "logprobs": null, "finish_reason": null}]),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// A piece of text as one choice's delta.
    async fn text(&self, index: usize, text: &str) -> Result<(), Gone> {
        match self.reply.kind {
            Kind::Chat { .. } => {
                self.chunk(json!([{"index": index, "delta": {"content": text},
                                   "logprobs": null, "finish_reason": null}]))
                    .await
            }
            Kind::Completion => {
                self.chunk(json!([{"index": index, "text": text, "logprobs": null,
                                   "finish_reason": null}]))
                    .await
            }
        }
    }

    async fn event(&mut self, index: usize, event: Event) -> Result<(), Gone> {
        let holding = matches!(self.reply.kind, Kind::Chat { parse_tools: true });
        match event {
            Event::Text(text) if holding => {
                self.held[index].push_str(&text);
                Ok(())
            }
            Event::Text(text) => self.text(index, &text).await,
            Event::Done {
                finish,
                completion_tokens,
            } => {
                let held = std::mem::take(&mut self.held[index]);
                let mut reason = finish.as_str();
                if let Some(calls) = self.reply.tool_calls(self.state, &held) {
                    let mut delta = json!({"tool_calls": tool_calls_json(&calls, true)});
                    if let Some(content) = &calls.content {
                        delta["content"] = json!(content);
                    }
                    self.chunk(json!([{"index": index, "delta": delta, "logprobs": null,
                                       "finish_reason": null}]))
                        .await?;
                    reason = "tool_calls";
                } else if !held.is_empty() {
                    self.text(index, &held).await?;
                }
                let last = match self.reply.kind {
                    Kind::Chat { .. } => json!([{"index": index, "delta": {}, "logprobs": null,
                                                 "finish_reason": reason}]),
                    Kind::Completion => json!([{"index": index, "text": "", "logprobs": null,
                                                "finish_reason": reason}]),
                };
                self.finished.push(Choice {
                    text: String::new(),
                    finish,
                    completion_tokens,
                });
                self.chunk(last).await
            }
            Event::Error(message) => {
                self.send(ApiError::internal(message).body().to_string())
                    .await?;
                Err(Gone)
            }
        }
    }

    /// The usage chunk when asked for, then `[DONE]`.
    async fn end(&self, include_usage: bool) -> Result<(), Gone> {
        if include_usage {
            let mut chunk = self.reply.envelope(json!([]), true);
            chunk["usage"] = self.reply.usage(&self.finished);
            self.send(chunk.to_string()).await?;
        }
        self.send("[DONE]".into()).await
    }
}

/// `tool_calls` as OpenAI writes them (with each call's `index` in streamed deltas).
fn tool_calls_json(calls: &ToolCalls, indexed: bool) -> Value {
    let (_, seed) = request_id("call");
    calls
        .calls
        .iter()
        .enumerate()
        .map(|(index, call)| {
            let mut out = json!({
                "id": format!("call_{:016x}", seed.wrapping_add(index as u64)),
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments.to_string()},
            });
            if indexed {
                out["index"] = json!(index);
            }
            out
        })
        .collect()
}
