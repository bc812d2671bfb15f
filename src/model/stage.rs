//! A contiguous slice of the decoder — embedding, a run of layers, the head — that one pipeline
//! stage owns. The whole model is the slice that owns everything.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use pp_stages::StageSlice;

use super::config::ModelConfig;
use super::context::{AttentionInputs, TokenLayout};
use super::kv_cache::KvCache;
use super::layers::{in_dtype, load_param, DecoderLayer, Linear, RmsNorm};
use super::names::{Part, EMBED, FINAL_NORM, LM_HEAD};
use crate::checkpoint::WeightSource;
use crate::error::{Error, Result};
use crate::kernels::{Kernels, LossTargets};

/// Token embedding table.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    /// `[vocab, hidden]`.
    pub weight: Param<Tensor<B, 2>>,
}

/// Leaves every parameter as it is.
struct Unchanged;

impl<B: Backend> ModuleMapper<B> for Unchanged {}

/// The layers of the model one stage owns, with weights loaded for just those parts.
#[derive(Module, Debug)]
pub struct StageModel<B: Backend> {
    /// `model.embed_tokens` when the stage is first.
    pub embed_tokens: Option<Embedding<B>>,
    /// The stage's decoder layers, `slice.layers` in model numbering.
    pub layers: Vec<DecoderLayer<B>>,
    /// `model.norm` when the stage is last.
    pub norm: Option<RmsNorm<B>>,
    /// `lm_head` when the stage is last. With tied embeddings and the embedding in the same
    /// stage it is absent and the embedding table is used, so both uses share one parameter.
    pub lm_head: Option<Linear<B>>,
    #[module(skip)]
    slice: StageSlice,
    #[module(skip)]
    config: ModelConfig,
}

impl<B: Backend> StageModel<B> {
    /// Loads the parts of `slice` from `source` onto `device`.
    pub fn load(
        config: &ModelConfig,
        slice: StageSlice,
        source: &dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load_mapped(config, slice, source, device, &mut Unchanged)
    }

    /// Loads as [`load`](Self::load), passing each part through `mapper` as soon as it is on
    /// the device: a mapper that cuts parameters to shards (FSDP) never has more than one part
    /// whole on the device.
    pub fn load_mapped<M: ModuleMapper<B>>(
        config: &ModelConfig,
        slice: StageSlice,
        source: &dyn WeightSource,
        device: &B::Device,
        mapper: &mut M,
    ) -> Result<Self> {
        slice
            .validate(config.num_layers)
            .map_err(|e| Error::Config {
                path: "stage".into(),
                message: e.to_string(),
            })?;
        let (vocab, hidden) = (config.vocab_size, config.hidden_size);
        let embed_tokens = if slice.embedding {
            let embedding = Embedding {
                weight: load_param(source, EMBED, [vocab, hidden], device)?,
            };
            Some(embedding.map(mapper))
        } else {
            None
        };
        let layers = slice
            .layers
            .clone()
            .map(|i| Ok(DecoderLayer::load(source, i, config, device)?.map(mapper)))
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = if slice.head {
            let norm = RmsNorm::load(source, FINAL_NORM, config, device)?.map(mapper);
            // Tied models store no lm_head; a last stage without the embedding keeps its own copy.
            let lm_head = match (config.tie_word_embeddings, slice.embedding) {
                (true, true) => None,
                (true, false) => Some(Linear {
                    weight: load_param(source, EMBED, [vocab, hidden], device)?,
                }),
                (false, _) => Some(Linear {
                    weight: load_param(source, LM_HEAD, [vocab, hidden], device)?,
                }),
            };
            (Some(norm), lm_head.map(|head| head.map(mapper)))
        } else {
            (None, None)
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            slice,
            config: config.clone(),
        })
    }

    /// Loads the whole model (the slice that owns every part).
    pub fn load_whole(
        config: &ModelConfig,
        source: &dyn WeightSource,
        device: &B::Device,
    ) -> Result<Self> {
        Self::load(config, StageSlice::whole(config.num_layers), source, device)
    }

    /// The parts this stage owns.
    pub fn slice(&self) -> &StageSlice {
        &self.slice
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The parts this stage runs, in forward order (layers numbered as in the whole model).
    pub fn parts(&self) -> Vec<Part> {
        let embedding = self.slice.embedding.then_some(Part::Embedding);
        let layers = self.slice.layers.clone().map(Part::Layer);
        let head = self.slice.head.then_some(Part::Head);
        embedding.into_iter().chain(layers).chain(head).collect()
    }

    /// Visits the parameters `part` uses. The head of a tied model without its own output
    /// weight uses the embedding table.
    pub fn visit_part<V: ModuleVisitor<B>>(&self, part: Part, visitor: &mut V) {
        match part {
            Part::Embedding => self.embed_tokens.visit(visitor),
            Part::Layer(i) => self.layers[i - self.slice.layers.start].visit(visitor),
            Part::Head => {
                self.norm.visit(visitor);
                match &self.lm_head {
                    Some(head) => head.visit(visitor),
                    None => self.embed_tokens.visit(visitor),
                }
            }
        }
    }

    /// Maps the parameters `part` uses (see [`visit_part`](Self::visit_part)).
    pub fn map_part<M: ModuleMapper<B>>(&mut self, part: Part, mapper: &mut M) {
        match part {
            Part::Embedding => self.embed_tokens = self.embed_tokens.take().map(|m| m.map(mapper)),
            Part::Layer(i) => {
                let local = i - self.slice.layers.start;
                self.layers[local] = self.layers[local].clone().map(mapper);
            }
            Part::Head => {
                self.norm = self.norm.take().map(|m| m.map(mapper));
                if self.lm_head.is_some() {
                    self.lm_head = self.lm_head.take().map(|m| m.map(mapper));
                } else {
                    self.embed_tokens = self.embed_tokens.take().map(|m| m.map(mapper));
                }
            }
        }
    }

    /// The same model with every weight in `dtype` (inference in bfloat16 stores and reads
    /// half the bytes, instead of casting float32 weights at every use).
    pub fn with_weights_in(self, dtype: DType) -> Self {
        struct Cast(DType);
        impl<B: Backend> ModuleMapper<B> for Cast {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let (id, tensor, mapper) = param.consume();
                Param::from_mapped_value(id, super::layers::in_dtype(tensor, self.0), mapper)
            }
        }
        self.map(&mut Cast(dtype))
    }

    /// Every parameter with its Hugging Face name, in module order.
    pub fn named_params(&self) -> Vec<(String, ParamId)> {
        let mut collector = NameCollector {
            path: Vec::new(),
            first_layer: self.slice.layers.start,
            tied_head: self.config.tie_word_embeddings,
            names: Vec::new(),
        };
        self.visit(&mut collector);
        collector.names
    }
}

impl<B: Kernels> StageModel<B> {
    /// Token ids `[batch, seq]` to embeddings `[batch, seq, hidden]` in the compute dtype.
    /// Panics if the stage does not own the embedding; callers check [`StageSlice::is_first`].
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>, inputs: &AttentionInputs<B>) -> Tensor<B, 3> {
        let table = self
            .embed_tokens
            .as_ref()
            .expect("stage owns the embedding");
        inputs.compute(burn::tensor::module::embedding(
            table.weight.val(),
            input_ids,
        ))
    }

    /// Runs the stage's decoder layers on hidden states `[batch, seq, hidden]` (from the
    /// previous stage in any dtype; computed in the block's).
    pub fn run_layers(&self, hidden: Tensor<B, 3>, inputs: &AttentionInputs<B>) -> Tensor<B, 3> {
        self.layers
            .iter()
            .fold(inputs.compute(hidden), |h, layer| layer.forward(h, inputs))
    }

    /// The final norm's output `[batch, seq, hidden]` and the output weight `[vocab, hidden]`,
    /// both in the compute dtype. Panics if the stage does not own the head; callers check
    /// [`StageSlice::is_last`].
    fn head_inputs(
        &self,
        hidden: Tensor<B, 3>,
        inputs: &AttentionInputs<B>,
    ) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let norm = self.norm.as_ref().expect("stage owns the head");
        let hidden = norm.forward(inputs.compute(hidden));
        let weight = match (&self.lm_head, &self.embed_tokens) {
            (Some(head), _) => head.weight.val(),
            (None, Some(tied)) => tied.weight.val(),
            (None, None) => unreachable!("load() gives a head stage an output weight"),
        };
        let weight = in_dtype(weight, hidden.dtype());
        (hidden, weight)
    }

    /// Final norm and output projection: `[batch, seq, hidden] -> [batch, seq, vocab]`, in the
    /// compute dtype.
    pub fn logits(&self, hidden: Tensor<B, 3>, inputs: &AttentionInputs<B>) -> Tensor<B, 3> {
        let (hidden, weight) = self.head_inputs(hidden, inputs);
        Linear {
            weight: Param::from_tensor(weight),
        }
        .forward(hidden)
    }

    /// Final norm, output projection and summed cross-entropy `[1]` against `targets`, fused
    /// so that no `[tokens, vocab]` logits exist (see [`crate::kernels::head_loss`]).
    pub fn head_loss(
        &self,
        hidden: Tensor<B, 3>,
        inputs: &AttentionInputs<B>,
        targets: &LossTargets<B>,
    ) -> Tensor<B, 1> {
        let (hidden, weight) = self.head_inputs(hidden, inputs);
        let [batch, seq, dim] = hidden.dims();
        B::head_loss(hidden.reshape([batch * seq, dim]), weight, targets)
    }

    /// The whole slice for a stage that owns every part: ids `[batch, seq]` to the summed
    /// loss `[1]` against `targets`.
    pub fn loss_sum(
        &self,
        input_ids: Tensor<B, 2, Int>,
        inputs: &AttentionInputs<B>,
        targets: &LossTargets<B>,
    ) -> Tensor<B, 1> {
        let hidden = self.run_layers(self.embed(input_ids, inputs), inputs);
        self.head_loss(hidden, inputs, targets)
    }

    /// The whole slice for a stage that owns every part: ids `[batch, seq]` to logits.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        inputs: &AttentionInputs<B>,
    ) -> Tensor<B, 3> {
        self.logits(
            self.run_layers(self.embed(input_ids, inputs), inputs),
            inputs,
        )
    }

    /// Runs a prompt (token ids) through the whole model and keeps every layer's keys and
    /// values: the logits of its last token `[vocab]` and the cache to decode from. Computes in
    /// `compute` (float32, or bfloat16 on devices that have it).
    pub fn prefill(
        &self,
        prompt: &[u32],
        compute: DType,
        device: &B::Device,
    ) -> (Tensor<B, 1>, KvCache<B>) {
        let seq = prompt.len();
        let inputs = AttentionInputs::new(&self.config, &TokenLayout::contiguous(1, seq), device)
            .computing_in(compute);
        let mut kept = Vec::with_capacity(self.layers.len());
        let hidden = self.layers.iter().fold(
            self.embed(token_tensor(prompt, 1, seq, device), &inputs),
            |h, layer| {
                let (h, kv) = layer.forward_keeping(h, &inputs);
                kept.push(kv);
                h
            },
        );
        let last = hidden.narrow(1, seq - 1, 1);
        let vocab = self.config.vocab_size;
        let logits = self.logits(last, &inputs).reshape([vocab]);
        (
            logits,
            KvCache::from_prompt(kept, self.config.sliding_window),
        )
    }

    /// Decodes one token for every row of `cache` (`tokens[row]` is the row's newest token,
    /// not yet in the cache): the next logits `[rows, vocab]`. The cache then holds the tokens.
    pub fn decode(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<B>,
        compute: DType,
        device: &B::Device,
    ) -> Tensor<B, 2> {
        let rows = tokens.len();
        assert_eq!(rows, cache.rows(), "one token per cached row");
        let layout = TokenLayout {
            batch: rows,
            seq: 1,
            positions: cache.lengths().to_vec(),
            documents: vec![0; rows],
        };
        let inputs = AttentionInputs::new(&self.config, &layout, device).computing_in(compute);
        let step = cache.begin_step();
        let hidden = self.layers.iter().enumerate().fold(
            self.embed(token_tensor(tokens, rows, 1, device), &inputs),
            |h, (index, layer)| layer.decode(h, &inputs, cache, index, &step),
        );
        cache.end_step();
        self.logits(hidden, &inputs)
            .reshape([rows, self.config.vocab_size])
    }
}

/// Token ids as a device tensor `[batch, seq]`.
pub fn token_tensor<B: Backend>(
    ids: &[u32],
    batch: usize,
    seq: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
}

/// Turns module paths (`layers.0.self_attn.q_proj.weight`) into checkpoint names
/// (`model.layers.7.self_attn.q_proj.weight` for a stage starting at layer 7).
struct NameCollector {
    path: Vec<String>,
    first_layer: usize,
    tied_head: bool,
    names: Vec<(String, ParamId)>,
}

impl NameCollector {
    fn hf_name(&self) -> String {
        let mut parts = self.path.clone();
        match parts[0].as_str() {
            "lm_head" if self.tied_head => EMBED.to_string(),
            "lm_head" => parts.join("."),
            "layers" => {
                let local: usize = parts[1].parse().expect("layer paths are indexed");
                parts[1] = (local + self.first_layer).to_string();
                format!("model.{}", parts.join("."))
            }
            _ => format!("model.{}", parts.join(".")),
        }
    }
}

impl<B: Backend> ModuleVisitor<B> for NameCollector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.names.push((self.hf_name(), param.id));
    }
}
