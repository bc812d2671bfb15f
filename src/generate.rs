//! Text generation with a key/value cache: greedy or sampled (`crate::sampling`), with stop
//! tokens, stop strings and a token budget. A [`Decoder`] decodes a batch of sequences together,
//! one token each per step, and sequences join and leave between steps (continuous batching);
//! `pp generate` and `pp serve` both run on it.

use std::path::Path;

use burn::tensor::DType;

use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::model::{KvCache, ModelConfig, StageModel};
use crate::sampling::{Sampler, Sampling};
use crate::tokenizer::Tokenizer;

/// How to pick tokens and when to stop.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// Greedy, or how to sample.
    pub sampling: Sampling,
    /// At most this many new tokens.
    pub max_new_tokens: usize,
    /// Stop after any of these tokens (not included in the output).
    pub stop_tokens: Vec<u32>,
    /// Stop when the text contains any of these strings (cut from the output).
    pub stop_strings: Vec<String>,
}

/// The tokens that end a model's answer: the end-of-sequence ids of `config.json`, of
/// `generation_config.json` in `model_dir` (instruction-tuned models list their end-of-turn
/// token there), the tokenizer's `eos_token`, and the token its chat template ends a turn with.
pub fn stop_tokens(
    model_dir: &Path,
    config: &ModelConfig,
    tokenizer: &Tokenizer,
) -> Result<Vec<u32>> {
    let mut tokens = config.eos_token_ids.clone();
    let path = model_dir.join(crate::convert::GENERATION_CONFIG);
    if path.is_file() {
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let generation: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::Config {
                path: path.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
        match &generation["eos_token_id"] {
            serde_json::Value::Number(n) => tokens.extend(n.as_u64().map(|id| id as u32)),
            serde_json::Value::Array(ids) => {
                tokens.extend(ids.iter().filter_map(|id| id.as_u64()).map(|id| id as u32))
            }
            _ => {}
        }
    }
    tokens.extend(tokenizer.eos_id());
    tokens.extend(tokenizer.end_of_turn_id());
    tokens.sort_unstable();
    tokens.dedup();
    Ok(tokens)
}

/// Why a sequence ended, as OpenAI's `finish_reason` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or a stop string.
    Stop,
    /// The token budget or the context ran out.
    Length,
}

impl FinishReason {
    /// OpenAI's name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One sequence being generated: its tokens, its sampler, its text, and whether it is done.
pub struct Completion {
    /// Prompt and new tokens (the repetition penalty sees both).
    ids: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    options: GenerationOptions,
    /// Longest sequence, prompt included.
    max_len: usize,
    /// The new tokens' text, cut at a stop string.
    text: String,
    /// Bytes of `text` already handed out by [`take_text`](Self::take_text).
    released: usize,
    finish: Option<FinishReason>,
}

impl Completion {
    /// A sequence continuing `prompt`, at most `max_len` tokens long in all.
    pub fn new(prompt: Vec<u32>, options: GenerationOptions, max_len: usize) -> Result<Self> {
        if prompt.is_empty() {
            return Err(Error::Usage("the prompt has no tokens".into()));
        }
        if prompt.len() >= max_len {
            return Err(Error::Usage(format!(
                "the prompt has {} tokens, which leaves no room in the context of {max_len}",
                prompt.len()
            )));
        }
        if options.max_new_tokens == 0 {
            return Err(Error::Usage(
                "at least one new token must be allowed".into(),
            ));
        }
        Ok(Self {
            prompt_len: prompt.len(),
            ids: prompt,
            sampler: Sampler::new(options.sampling.clone()),
            options,
            max_len,
            text: String::new(),
            released: 0,
            finish: None,
        })
    }

    /// Picks the next token from its `logits` and updates the text and the finish.
    fn push(&mut self, logits: &[f32], tokenizer: &Tokenizer) -> Result<()> {
        let next = self.sampler.next(logits, &self.ids);
        if self.options.stop_tokens.contains(&next) {
            self.finish = Some(FinishReason::Stop);
            return Ok(());
        }
        self.ids.push(next);
        self.text = tokenizer.decode(&self.ids[self.prompt_len..], false)?;
        if let Some(cut) = self
            .options
            .stop_strings
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(cut);
            self.finish = Some(FinishReason::Stop);
        } else if self.new_tokens() >= self.options.max_new_tokens || self.ids.len() >= self.max_len
        {
            self.finish = Some(FinishReason::Length);
        }
        Ok(())
    }

    /// The newest token, which the cache has not seen yet.
    fn last_token(&self) -> u32 {
        *self.ids.last().expect("a completion has a prompt")
    }

    /// Why it ended, once it has.
    pub fn finish(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Tokens generated (a final stop token is not counted: it is not part of the answer).
    pub fn new_tokens(&self) -> usize {
        self.ids.len() - self.prompt_len
    }

    /// The new tokens so far.
    pub fn new_ids(&self) -> &[u32] {
        &self.ids[self.prompt_len..]
    }

    /// The text so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Text not handed out before. While generating, it holds back what could still become a
    /// stop string and a trailing incomplete character, so that streamed text is final.
    pub fn take_text(&mut self) -> String {
        let mut end = self.text.len();
        if self.finish.is_none() {
            end = self.text.trim_end_matches('\u{FFFD}').len();
            let held = self
                .options
                .stop_strings
                .iter()
                .map(|stop| partial_suffix(&self.text[..end], stop))
                .max()
                .unwrap_or(0);
            end -= held;
        }
        if end <= self.released {
            return String::new();
        }
        let out = self.text[self.released..end].to_string();
        self.released = end;
        out
    }
}

/// Bytes at the end of `text` that are the beginning of `stop` (the longest such suffix).
fn partial_suffix(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|&n| stop.is_char_boundary(n) && text.ends_with(&stop[..n]))
        .unwrap_or(0)
}

/// A batch of sequences decoded together. Each carries a caller's tag `T` (an output channel,
/// a row number). Sequences are added with [`add`](Self::add) (their prompt runs at once),
/// stepped together with [`step`](Self::step), and taken out when finished or unwanted with
/// [`retain`](Self::retain).
pub struct Decoder<'m, B: Kernels, T> {
    model: &'m StageModel<B>,
    tokenizer: &'m Tokenizer,
    compute: DType,
    device: B::Device,
    /// Rows of the cache, in order; `None` while no sequence is running.
    cache: Option<KvCache<B>>,
    running: Vec<(Completion, T)>,
}

impl<'m, B: Kernels, T> Decoder<'m, B, T> {
    /// An empty batch over `model`, computing in `compute`.
    pub fn new(
        model: &'m StageModel<B>,
        tokenizer: &'m Tokenizer,
        compute: DType,
        device: B::Device,
    ) -> Self {
        Self {
            model,
            tokenizer,
            compute,
            device,
            cache: None,
            running: Vec::new(),
        }
    }

    /// Runs `completion`'s prompt and picks its first token; it decodes with the others from
    /// the next step on.
    pub fn add(&mut self, mut completion: Completion, tag: T) -> Result<()> {
        let (logits, cache) = self
            .model
            .prefill(&completion.ids, self.compute, &self.device);
        completion.push(&host_values(logits), self.tokenizer)?;
        match &mut self.cache {
            Some(batch) => batch.join(cache),
            None => self.cache = Some(cache),
        }
        self.running.push((completion, tag));
        Ok(())
    }

    /// Sequences in the batch, finished or not.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    /// Whether no sequence is in the batch.
    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Keeps the sequences for which `keep` is true, returning the others.
    pub fn retain(
        &mut self,
        mut keep: impl FnMut(&mut Completion, &mut T) -> bool,
    ) -> Vec<(Completion, T)> {
        let mut kept = Vec::new();
        let mut gone = Vec::new();
        let mut running = Vec::with_capacity(self.running.len());
        for (row, (mut completion, mut tag)) in self.running.drain(..).enumerate() {
            if keep(&mut completion, &mut tag) {
                kept.push(row);
                running.push((completion, tag));
            } else {
                gone.push((completion, tag));
            }
        }
        self.running = running;
        self.cache = self.cache.take().and_then(|cache| cache.retain(&kept));
        gone
    }

    /// Decodes one token for every sequence in the batch. Finished ones are computed too
    /// but left as they are: [`retain`](Self::retain) them out first.
    pub fn step(&mut self) -> Result<()> {
        let Some(cache) = self.cache.as_mut() else {
            return Ok(());
        };
        let tokens: Vec<u32> = self.running.iter().map(|(c, _)| c.last_token()).collect();
        let logits = self
            .model
            .decode(&tokens, cache, self.compute, &self.device);
        let vocab = logits.dims()[1];
        let logits = host_values(logits);
        for ((completion, _), row) in self.running.iter_mut().zip(logits.chunks(vocab)) {
            if completion.finish.is_none() {
                completion.push(row, self.tokenizer)?;
            }
        }
        Ok(())
    }
}

/// A tensor's values as float32 on the host.
fn host_values<B: Kernels, const D: usize>(t: burn::tensor::Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("float values")
}

/// Answers every prompt, up to `max_batch` of them decoded together (continuous batching:
/// the next prompt joins as soon as one finishes). `done` gets each finished answer with its
/// prompt's index, in the order they finish.
#[allow(clippy::too_many_arguments)]
pub fn generate_all<B: Kernels>(
    model: &StageModel<B>,
    tokenizer: &Tokenizer,
    prompts: impl IntoIterator<Item = Vec<u32>>,
    options: &GenerationOptions,
    max_batch: usize,
    compute: DType,
    device: &B::Device,
    mut done: impl FnMut(usize, Completion) -> Result<()>,
) -> Result<()> {
    let max_len = model.config().max_position_embeddings;
    let mut pending = prompts.into_iter().enumerate().peekable();
    let mut decoder = Decoder::new(model, tokenizer, compute, device.clone());
    loop {
        while decoder.len() < max_batch.max(1) {
            let Some((index, prompt)) = pending.next() else {
                break;
            };
            decoder.add(Completion::new(prompt, options.clone(), max_len)?, index)?;
        }
        for (completion, index) in decoder.retain(|c, _| c.finish().is_none()) {
            done(index, completion)?;
        }
        if decoder.is_empty() {
            if pending.peek().is_none() {
                return Ok(());
            }
            continue;
        }
        decoder.step()?;
    }
}

#[cfg(test)]
mod tests {
    use super::partial_suffix;

    #[test]
    fn a_partial_stop_string_is_held_back() {
        assert_eq!(partial_suffix("answer <|e", "<|end|>"), 3);
        assert_eq!(partial_suffix("answer", "<|end|>"), 0);
        assert_eq!(partial_suffix("x<", "<|end|>"), 1);
    }
}
