//! `pp serve`: an OpenAI-compatible HTTP server over one model. The model lives on an engine
//! thread that decodes every request in one batch ([`engine`]); the HTTP side (axum on tokio)
//! checks requests, renders chat templates, and streams answers back ([`routes`]).

pub mod engine;
mod openai;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::sync::Notify;

use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::model::StageModel;
use crate::tokenizer::Tokenizer;
use crate::tool_calls::ToolCallFormat;
use engine::{EngineHandle, EngineSettings};

/// Largest request body accepted (a longer one is answered 413).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// What the HTTP side needs to know.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Address to listen on.
    pub address: SocketAddr,
    /// Requests must bring `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// The name clients ask for (`model` in requests, `/v1/models`).
    pub model_name: String,
    /// Longest sequence, prompt included.
    pub max_len: usize,
    /// How the model writes tool calls.
    pub tool_call_format: ToolCallFormat,
    /// Tokens that end an answer ([`crate::generate::stop_tokens`]).
    pub stop_tokens: Vec<u32>,
}

/// Shared by every request.
pub struct ServerState {
    settings: ServeSettings,
    engine: EngineHandle,
    tokenizer: Arc<Tokenizer>,
    vocab_size: usize,
    /// When the server started (`created` of the model).
    created: u64,
}

/// Serves `model` until interrupted (Ctrl-C or SIGTERM), then lets running requests finish.
pub fn serve<B: Kernels>(
    model: StageModel<B>,
    tokenizer: Tokenizer,
    settings: ServeSettings,
    engine_settings: EngineSettings,
    device: B::Device,
) -> Result<()> {
    let vocab_size = model.config().vocab_size;
    let tokenizer = Arc::new(tokenizer);
    let (handle, queue) = engine::channel();
    let load = handle.load_arc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Usage(format!("cannot start the HTTP runtime: {e}")))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(settings.address))
        .map_err(|e| Error::Usage(format!("cannot listen on {}: {e}", settings.address)))?;
    let address = listener.local_addr().unwrap_or(settings.address);
    let state = Arc::new(ServerState {
        settings,
        engine: handle,
        tokenizer: tokenizer.clone(),
        vocab_size,
        created: routes::unix_seconds(),
    });
    let app = router(state);
    // A failed engine ends the server rather than leaving it up with nothing to answer.
    let engine_gone = Arc::new(Notify::new());
    std::thread::scope(|scope| {
        let engine = scope.spawn(|| {
            let _notify = NotifyOnDrop(engine_gone.clone());
            engine::run(&model, &tokenizer, engine_settings, device, queue, &load)
        });
        // Scripts wait for this line before sending requests.
        eprintln!("serving on http://{address}");
        let gone = engine_gone.clone();
        let served = runtime.block_on(async {
            // Streamed chunks are small: sent at once, not held back by Nagle's algorithm.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    tokio::select! {
                        _ = interrupted() => {}
                        _ = gone.notified() => {}
                    }
                })
                .await
        });
        // The router, and with it the last engine handle, is gone: the engine thread ends.
        let engine = engine.join();
        served.map_err(|e| Error::Usage(format!("the HTTP server failed: {e}")))?;
        engine.map_err(|_| Error::Usage("the model's engine failed (see above)".into()))
    })
}

/// Wakes the server when the engine thread ends, however it ends.
struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// The routes, with authentication on `/v1`.
fn router(state: Arc<ServerState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(routes::models))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::authorize,
        ));
    Router::new()
        .merge(api)
        .route("/health", get(routes::health))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Resolves on Ctrl-C or SIGTERM.
async fn interrupted() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    eprintln!("stopping: finishing the requests in flight");
}
