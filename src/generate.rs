//! Text generation, to look at what a trained model answers: greedy, or sampled
//! (`crate::sampling`). Each new token re-runs the whole sequence (no key/value cache yet):
//! simple and exact, and fast enough for small models and short answers.

use crate::error::Result;
use crate::kernels::Kernels;
use crate::model::{token_tensor, AttentionInputs, StageModel, TokenLayout};
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
    /// Stop when the text ends with any of these strings (cut from the output).
    pub stop_strings: Vec<String>,
}

/// Continues `prompt` (token ids) and returns the new text.
pub fn generate<B: Kernels>(
    model: &StageModel<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerationOptions,
    device: &B::Device,
) -> Result<String> {
    let context = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(crate::Error::Usage("the prompt has no tokens".into()));
    }
    if prompt.len() >= context {
        return Err(crate::Error::Usage(format!(
            "the prompt has {} tokens, which fills the model's context of {context}",
            prompt.len()
        )));
    }
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut ids = prompt.to_vec();
    let mut new = Vec::new();
    let mut text = String::new();
    while new.len() < options.max_new_tokens && ids.len() < context {
        let seq = ids.len();
        let inputs = AttentionInputs::new(model.config(), &TokenLayout::contiguous(1, seq), device);
        let logits = model.forward(token_tensor(&ids, 1, seq, device), &inputs);
        let vocab = logits.dims()[2];
        let last = logits
            .slice([0..1, seq - 1..seq, 0..vocab])
            .reshape([vocab]);
        let logits = last
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .expect("float logits");
        let next = sampler.next(&logits, &ids);
        if options.stop_tokens.contains(&next) {
            break;
        }
        ids.push(next);
        new.push(next);
        text = tokenizer.decode(&new, false)?;
        if let Some(cut) = options
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
            break;
        }
    }
    Ok(text)
}
