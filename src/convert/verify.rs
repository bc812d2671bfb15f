//! The self-check after a conversion: the source and the converted model run the same probe
//! tokens part by part (embedding, each layer, head), and any difference fails the conversion.
//! One part of one model is in memory at a time, so checking a large model needs about one
//! layer's memory in float32.

use burn::tensor::{ElementConversion, Tensor};
use pp_stages::StageSlice;

use crate::checkpoint::{ModelFiles, OwnedWeights, WeightSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::kernels::Kernels;
use crate::model::names::{Part, EMBED};
use crate::model::{token_tensor, AttentionInputs, ModelConfig, StageModel, TokenLayout};

/// Tokens in the probe sequence.
const PROBE_TOKENS: usize = 16;

/// What the self-check compared.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VerifyReport {
    /// Length of the probe sequence.
    pub probe_tokens: usize,
    /// Model parts compared (embedding, layers, head).
    pub parts: usize,
    /// Largest absolute difference seen in any part's output (0 when the conversion is exact).
    pub max_abs_diff: f32,
}

/// Runs `source` and `converted` side by side. With `cast`, the source's weights are first
/// rounded to that dtype, as the conversion did, so the comparison is exact either way.
pub fn verify<B: Kernels>(
    source: &ModelFiles,
    converted: &ModelFiles,
    cast: Option<DType>,
    device: &B::Device,
) -> Result<VerifyReport> {
    let fail = |message: String| Error::Checkpoint {
        path: converted.info.dir.clone(),
        message: format!("self-check failed: {message}"),
    };
    let cfg = &source.info.config;
    let same_config = ModelConfig {
        dtype: cfg.dtype,
        ..converted.info.config.clone()
    } == *cfg;
    if !same_config {
        return Err(fail(
            "the converted config.json differs from the source's".into(),
        ));
    }
    let ids: Vec<u32> = (0..PROBE_TOKENS)
        .map(|i| ((i * 7919 + 1) % cfg.vocab_size) as u32)
        .collect();
    let inputs = AttentionInputs::<B>::new(cfg, &TokenLayout::contiguous(1, PROBE_TOKENS), device);
    let parts = std::iter::once(Part::Embedding)
        .chain((0..cfg.num_layers).map(Part::Layer))
        .chain(std::iter::once(Part::Head));
    let source_names = source.weights.names();
    let mut hidden: Option<Tensor<B, 3>> = None;
    let mut max_abs_diff = 0.0f32;
    let mut compared = 0;
    for part in parts {
        crate::interrupt::check()?;
        let slice = match part {
            Part::Embedding => StageSlice {
                embedding: true,
                layers: 0..0,
                head: false,
            },
            Part::Layer(i) => StageSlice {
                embedding: false,
                layers: i..i + 1,
                head: false,
            },
            Part::Head => StageSlice {
                embedding: false,
                layers: cfg.num_layers..cfg.num_layers,
                head: true,
            },
        };
        // One model in memory at a time: the source's part runs, is dropped, then the
        // converted part runs on the same input.
        let input = hidden.take();
        let run = |weights: &dyn WeightSource| -> Result<Tensor<B, 3>> {
            let model = StageModel::<B>::load(cfg, slice.clone(), weights, device)?;
            Ok(match (part, input.clone()) {
                (Part::Embedding, _) => {
                    model.embed(token_tensor(&ids, 1, PROBE_TOKENS, device), &inputs)
                }
                (Part::Layer(_), Some(h)) => model.run_layers(h, &inputs),
                (Part::Head, Some(h)) => model.logits(h, &inputs),
                (_, None) => unreachable!("the embedding runs first"),
            })
        };
        let want = match cast {
            None => run(source.weights.as_ref())?,
            Some(_) => {
                // The source's weights rounded as the conversion rounded them.
                let mut names: Vec<String> = source_names
                    .iter()
                    .filter(|n| Part::of(n) == part)
                    .cloned()
                    .collect();
                if part == Part::Head && cfg.tie_word_embeddings {
                    names.push(EMBED.to_string());
                }
                run(&OwnedWeights::copy_from(
                    source.weights.as_ref(),
                    &names,
                    cast,
                )?)?
            }
        };
        // The configs are equal but for the dtype, checked above; the probe's rotary tables
        // (`inputs`) are the source's for both.
        let got = run(converted.weights.as_ref())?;
        let scale: f32 = want.clone().abs().max().into_scalar().elem();
        let diff: f32 = (want.clone() - got).abs().max().into_scalar().elem();
        // Identical weights through identical kernels give identical outputs; the slack only
        // absorbs summation-order noise a threaded kernel could introduce.
        let within = diff <= 1e-6 * scale.max(1.0);
        if !within {
            let what = match part {
                Part::Embedding => "the embedding output".to_string(),
                Part::Layer(i) => format!("the output of layer {i}"),
                Part::Head => "the logits".to_string(),
            };
            return Err(fail(format!(
                "{what} of the converted model differs from the source's (max |Δ| = {diff:e})"
            )));
        }
        max_abs_diff = max_abs_diff.max(diff);
        compared += 1;
        hidden = Some(want);
    }
    Ok(VerifyReport {
        probe_tokens: PROBE_TOKENS,
        parts: compared,
        max_abs_diff,
    })
}
