//! The thread that owns the model and decodes every request in one batch: requests wait in a
//! queue, join the batch between steps (their prompt runs on joining) while it has room, stream
//! their text out as it is made, and leave when they finish or their client goes away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use burn::tensor::DType;
use tokio::sync::mpsc::UnboundedSender;

use crate::generate::{Completion, Decoder, FinishReason, GenerationOptions};
use crate::kernels::Kernels;
use crate::model::StageModel;
use crate::tokenizer::Tokenizer;

/// One sequence to generate.
pub struct Job {
    pub prompt: Vec<u32>,
    pub options: GenerationOptions,
    /// Where its text goes; dropping the receiver cancels the job.
    pub events: UnboundedSender<Event>,
}

/// What a job reports, in order: text pieces, then one `Done` (or an `Error`).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// New text (final: never taken back).
    Text(String),
    /// Finished.
    Done {
        finish: FinishReason,
        completion_tokens: usize,
    },
    /// The job failed.
    Error(String),
}

/// Counts the server reports on `/health`.
#[derive(Debug, Default)]
pub struct Load {
    /// Sequences in the batch.
    pub running: AtomicUsize,
    /// Sequences queued for a place in the batch.
    pub waiting: AtomicUsize,
}

/// How the engine runs.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Most sequences decoded together.
    pub max_batch: usize,
    /// Longest sequence, prompt included.
    pub max_len: usize,
    /// Matmuls and activations in this dtype.
    pub compute: DType,
}

/// Submits jobs to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    load: Arc<Load>,
}

impl EngineHandle {
    /// Queues `job`; false if the engine has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.load.waiting.fetch_add(1, Ordering::SeqCst);
        let sent = self.jobs.send(job).is_ok();
        if !sent {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }

    /// Sequences running and waiting.
    pub fn load(&self) -> &Load {
        &self.load
    }

    /// The counts, for the engine thread to keep up to date.
    pub fn load_arc(&self) -> Arc<Load> {
        self.load.clone()
    }
}

/// A channel to an engine and its receiving end, which [`run`] serves.
pub fn channel() -> (EngineHandle, mpsc::Receiver<Job>) {
    let (jobs, queue) = mpsc::channel();
    let handle = EngineHandle {
        jobs,
        load: Arc::new(Load::default()),
    };
    (handle, queue)
}

/// Serves `queue` until every handle is dropped. Runs on its own thread: it blocks.
pub fn run<B: Kernels>(
    model: &StageModel<B>,
    tokenizer: &Tokenizer,
    settings: EngineSettings,
    device: B::Device,
    queue: mpsc::Receiver<Job>,
    load: &Load,
) {
    let mut decoder: Decoder<'_, B, UnboundedSender<Event>> =
        Decoder::new(model, tokenizer, settings.compute, device);
    loop {
        // Idle: wait for work. Then take prompts up to a budget of tokens per step, so that a
        // burst of new requests delays the running ones by at most about that much prompt
        // work per token.
        let mut budget = PROMPT_TOKENS_PER_STEP;
        if decoder.is_empty() {
            match queue.recv() {
                Ok(job) => budget -= admit(&mut decoder, job, settings, load).min(budget),
                Err(_) => return,
            }
        }
        while decoder.len() < settings.max_batch && budget > 0 {
            match queue.try_recv() {
                Ok(job) => {
                    budget = budget.saturating_sub(admit(&mut decoder, job, settings, load));
                    // Each new request's first token goes out as soon as its prompt has run.
                    report(&mut decoder);
                }
                Err(_) => break,
            }
        }
        report(&mut decoder);
        load.running.store(decoder.len(), Ordering::SeqCst);
        if let Err(e) = decoder.step() {
            for (_, events) in decoder.retain(|_, _| false) {
                let _ = events.send(Event::Error(e.to_string()));
            }
        }
    }
}

/// Prompt tokens a busy engine runs between two decoding steps (a prompt is never split: one
/// longer than this runs alone).
const PROMPT_TOKENS_PER_STEP: usize = 256;

/// Runs `job`'s prompt and adds it to the batch, or reports why it cannot run; returns the
/// prompt's tokens.
fn admit<B: Kernels>(
    decoder: &mut Decoder<'_, B, UnboundedSender<Event>>,
    job: Job,
    settings: EngineSettings,
    load: &Load,
) -> usize {
    load.waiting.fetch_sub(1, Ordering::SeqCst);
    if job.events.is_closed() {
        return 0;
    }
    let tokens = job.prompt.len();
    let added = Completion::new(job.prompt, job.options, settings.max_len)
        .and_then(|completion| decoder.add(completion, job.events.clone()));
    if let Err(e) = added {
        let _ = job.events.send(Event::Error(e.to_string()));
    }
    tokens
}

/// Sends each sequence's new text, and takes out the finished and the abandoned.
fn report<B: Kernels>(decoder: &mut Decoder<'_, B, UnboundedSender<Event>>) {
    decoder.retain(|completion, events| {
        let text = completion.take_text();
        if !text.is_empty() && events.send(Event::Text(text)).is_err() {
            return false;
        }
        match completion.finish() {
            Some(finish) => {
                let _ = events.send(Event::Done {
                    finish,
                    completion_tokens: completion.new_tokens(),
                });
                false
            }
            None => !events.is_closed(),
        }
    });
}
