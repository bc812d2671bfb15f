//! Estimates of the memory that full fine-tuning needs: weights, gradients, optimizer state and
//! saved activations. `pp inspect` prints them; they are estimates, not measurements.

use serde::Serialize;

use pp_stages::schedule::{simulate, Costs, ScheduleError};
use pp_stages::{PartCosts, Partition, Schedule, StageSlice};

use crate::dtype::DType;
use crate::kernels;
use crate::model::ModelConfig;
use crate::train::optim::Optimizer;
use crate::train::runtime::MemorySavers;

/// Bytes of float32 optimizer state per element.
const STATE_BYTES: u64 = 4;

/// Memory for training one whole model on one device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MemoryEstimate {
    /// Sequence length the activation figures assume (one sequence per micro-batch).
    pub seq_len: usize,
    /// The trained weights.
    pub weights: u64,
    /// One gradient per weight, in the weight dtype.
    pub gradients: u64,
    /// AdamW's two float32 moments per weight.
    pub adamw_state: u64,
    /// Adafactor's factored float32 second moment (row and column statistics per matrix).
    pub adafactor_state: u64,
    /// Activations kept for backward, per token, for the whole model without checkpointing.
    pub activations_per_token: u64,
    /// Activations kept per token when each layer keeps only its input (activation checkpointing).
    pub checkpointed_activations_per_token: u64,
    /// The largest short-lived buffer for one sequence: one layer's recomputed activations
    /// with an attention tile, or a chunk of the head's logits, whichever is larger.
    pub largest_transient: u64,
}

impl MemoryEstimate {
    /// Estimates for `cfg` trained in `dtype` on sequences of `seq_len` tokens.
    pub fn new(cfg: &ModelConfig, dtype: DType, seq_len: usize) -> Self {
        let bytes = dtype.size() as u64;
        let params = cfg.num_params();
        let h = cfg.hidden_size as u64;
        let per_layer = layer_activations_per_token(cfg, dtype);
        let layers = cfg.num_layers as u64;
        let tiles = transients(cfg, 1, seq_len);
        Self {
            seq_len,
            weights: params * bytes,
            gradients: params * bytes,
            adamw_state: 2 * STATE_BYTES * params,
            adafactor_state: STATE_BYTES * adafactor_elements(cfg),
            activations_per_token: layers * per_layer,
            checkpointed_activations_per_token: layers * h * bytes,
            largest_transient: tiles.head.max(per_layer * seq_len as u64 + tiles.attention),
        }
    }

    /// Peak with AdamW and every activation kept.
    pub fn adamw_total(&self) -> u64 {
        self.weights
            + self.gradients
            + self.adamw_state
            + self.activations_per_token * self.seq_len as u64
            + self.largest_transient
    }

    /// Peak with Adafactor and activation checkpointing.
    pub fn adafactor_checkpointed_total(&self) -> u64 {
        self.weights
            + self.gradients
            + self.adafactor_state
            + self.checkpointed_activations_per_token * self.seq_len as u64
            + self.largest_transient
    }
}

/// What autodiff keeps per token in one layer: both norms' inputs (the residual stream) and
/// outputs (4h: the fused RMSNorm keeps no statistics), q/k/v before and after rotation
/// (2(q + 2kv)), the attention output (q), the MLP's gate,
/// up and gated product (3i: the fused SwiGLU keeps no sigmoid or activated gate), and the tiled
/// attention's float32 log-sum-exp per head. Nothing grows with the sequence: the scores exist
/// one tile at a time.
fn layer_activations_per_token(cfg: &ModelConfig, dtype: DType) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (q, kv) = (
        (cfg.num_heads * cfg.head_dim) as u64,
        (cfg.num_kv_heads * cfg.head_dim) as u64,
    );
    dtype.size() as u64 * (4 * h + 2 * (q + 2 * kv) + q + 3 * i)
        + STATE_BYTES * cfg.num_heads as u64
}

/// The tiled kernels' short-lived buffers, in bytes.
struct Transients {
    /// Attention's backward: a tile's scores, probabilities and their two gradients.
    attention: u64,
    /// The head loss's backward: a chunk's logits, probabilities and their gradient.
    head: u64,
}

/// The transients of `rows` rows of `seq_len` tokens.
fn transients(cfg: &ModelConfig, rows: usize, seq_len: usize) -> Transients {
    let attention = kernels::attention_tile_elements(rows, cfg.num_heads, seq_len);
    let head = kernels::head_tile_elements(rows * seq_len, cfg.vocab_size);
    Transients {
        attention: 4 * STATE_BYTES * attention as u64,
        head: 3 * STATE_BYTES * head as u64,
    }
}

/// What a pipeline partition balances across stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Balance {
    /// The same number of decoder layers per stage.
    Layers,
    /// The same number of parameters per stage, the embedding and output matrices included.
    Params,
    /// The same estimated training memory per stage: weights, gradients and AdamW state, one
    /// micro-batch's saved activations, and the head loss's chunk of logits.
    Memory,
}

impl std::str::FromStr for Balance {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "layers" => Ok(Balance::Layers),
            "params" => Ok(Balance::Params),
            "memory" => Ok(Balance::Memory),
            other => Err(format!(
                "unknown balance `{other}` (expected layers, params or memory)"
            )),
        }
    }
}

/// The cost of each model part under `balance`, for sequences of `seq_len` tokens trained in
/// `dtype`. The head always counts a full output matrix: with tied embeddings the last stage
/// holds its own copy as soon as there is more than one stage.
pub fn part_costs(cfg: &ModelConfig, balance: Balance, dtype: DType, seq_len: usize) -> PartCosts {
    let layers = cfg.num_layers;
    let (embedding, layer, head) = (
        cfg.embedding_params(),
        cfg.layer_params(),
        cfg.embedding_params() + cfg.hidden_size as u64,
    );
    let (embedding, layer, head) = match balance {
        Balance::Layers => (0, 1, 0),
        Balance::Params => (embedding, layer, head),
        Balance::Memory => {
            // Weights and gradients in the training dtype, two float32 moments.
            let per_param = 2 * dtype.size() as u64 + 2 * STATE_BYTES;
            let seq = seq_len as u64;
            (
                embedding * per_param,
                layer * per_param + layer_activations_per_token(cfg, dtype) * seq,
                head * per_param + transients(cfg, 1, seq_len).head,
            )
        }
    };
    PartCosts {
        embedding: embedding as f64,
        layers: vec![layer as f64; layers],
        head: head as f64,
    }
}

/// Elements of Adafactor's state: rows + columns per matrix, the full size of vectors.
fn adafactor_elements(cfg: &ModelConfig) -> u64 {
    let head = if cfg.tie_word_embeddings {
        cfg.hidden_size as u64
    } else {
        adafactor_matrix_elements(cfg) + cfg.hidden_size as u64
    };
    adafactor_matrix_elements(cfg) + cfg.num_layers as u64 * adafactor_layer_elements(cfg) + head
}

/// Adafactor's state elements of the embedding (or an output) matrix.
fn adafactor_matrix_elements(cfg: &ModelConfig) -> u64 {
    (cfg.vocab_size + cfg.hidden_size) as u64
}

/// Adafactor's state elements of one decoder layer.
fn adafactor_layer_elements(cfg: &ModelConfig) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (q, kv) = (
        (cfg.num_heads * cfg.head_dim) as u64,
        (cfg.num_kv_heads * cfg.head_dim) as u64,
    );
    let matrix = |r: u64, c: u64| r + c;
    matrix(q, h) + 2 * matrix(kv, h) + matrix(h, q) + 2 * matrix(i, h) + matrix(h, i) + 2 * h
}

/// A training configuration to plan memory for.
#[derive(Debug, Clone)]
pub struct TrainingSetup {
    /// Dtype of the activations (the compute dtype); weights and gradients are float32.
    pub dtype: DType,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per micro-batch.
    pub micro_batch_size: usize,
    /// The update rule (its state size).
    pub optimizer: Optimizer,
    /// Which memory savers are on.
    pub savers: MemorySavers,
    /// Micro-batches whose activations each stage holds at once ([`in_flight`]; one stage
    /// alone holds one).
    pub in_flight: Vec<usize>,
}

/// Micro-batches whose activations each stage of `schedule` holds at once: the peak over its
/// rank's action list of forwards whose backward is not complete (under zero-bubble, until W:
/// the saved linear inputs and their output gradients wait for it), shared by the rank's
/// stages.
pub fn in_flight(schedule: &Schedule) -> Result<Vec<usize>, ScheduleError> {
    let run = simulate(schedule, &Costs::unit())?;
    Ok((0..schedule.stages())
        .map(|stage| {
            let rank = schedule.stage_ranks[stage];
            run.peak_activations[rank].div_ceil(schedule.stages_of(rank).len())
        })
        .collect())
}

/// Bytes a stage or a device holds at its peak, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Memory {
    /// Weights (float32 master weights).
    pub weights: u64,
    /// Gradients alive at once: all of them, or with optimizer-in-backward the largest
    /// part's.
    pub gradients: u64,
    /// Optimizer state in float32.
    pub optimizer_state: u64,
    /// Activations saved for backward on the device, for every micro-batch in flight.
    pub activations: u64,
    /// Activations offloaded to host memory (not in the device total).
    pub host_activations: u64,
    /// The largest short-lived buffer: one layer recomputed with an attention tile, or a
    /// chunk of the head's logits, their probabilities and gradient.
    pub transient: u64,
    /// Device total.
    pub total: u64,
}

impl Memory {
    fn new(
        weights: u64,
        gradients: u64,
        optimizer_state: u64,
        activations: u64,
        host_activations: u64,
        transient: u64,
    ) -> Self {
        Self {
            weights,
            gradients,
            optimizer_state,
            activations,
            host_activations,
            transient,
            total: weights + gradients + optimizer_state + activations + transient,
        }
    }
}

/// Estimated peak memory of one pipeline stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StagePlan {
    /// The parts the stage owns.
    pub slice: StageSlice,
    /// Parameters it holds.
    pub params: u64,
    #[serde(flatten)]
    pub memory: Memory,
    /// Micro-batches whose activations the stage holds at once (1F1B: stages before the last
    /// hold more; GPipe: every stage holds them all).
    pub in_flight: usize,
}

/// Estimated peak memory of one device: one stage, or several under interleaved 1F1B and
/// ZB-V.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DevicePlan {
    /// The stages it runs, in model order.
    pub stages: Vec<usize>,
    #[serde(flatten)]
    pub memory: Memory,
}

/// The device that runs `stages` of `plans`: weights, optimizer state and saved activations
/// add up; transients come one stage at a time, and so do gradients under
/// optimizer-in-backward (one part's at a time).
pub fn device_plan(plans: &[StagePlan], stages: Vec<usize>, savers: &MemorySavers) -> DevicePlan {
    let each = |field: fn(&Memory) -> u64| stages.iter().map(move |&s| field(&plans[s].memory));
    let gradients = if savers.optimizer_in_backward {
        each(|m| m.gradients).max().unwrap_or(0)
    } else {
        each(|m| m.gradients).sum()
    };
    let memory = Memory::new(
        each(|m| m.weights).sum(),
        gradients,
        each(|m| m.optimizer_state).sum(),
        each(|m| m.activations).sum(),
        each(|m| m.host_activations).sum(),
        each(|m| m.transient).max().unwrap_or(0),
    );
    DevicePlan { stages, memory }
}

/// Every rank's [`device_plan`] under `schedule`.
pub fn per_device(
    plans: &[StagePlan],
    schedule: &Schedule,
    savers: &MemorySavers,
) -> Vec<DevicePlan> {
    (0..schedule.ranks)
        .map(|rank| device_plan(plans, schedule.stages_of(rank), savers))
        .collect()
}

/// Per-stage peak memory of training `cfg` under `setup`, with the micro-batches in flight on
/// each stage of `partition` that `setup` gives (each keeps its graph, or with checkpointing
/// its parts' inputs).
pub fn plan_training(
    cfg: &ModelConfig,
    partition: &Partition,
    setup: &TrainingSetup,
) -> Vec<StagePlan> {
    partition
        .stages()
        .iter()
        .zip(&setup.in_flight)
        .map(|(slice, &in_flight)| stage_plan(cfg, slice, in_flight, setup))
        .collect()
}

/// Peak memory of one stage that owns `slice` and holds `in_flight` micro-batches' activations.
pub fn stage_plan(
    cfg: &ModelConfig,
    slice: &StageSlice,
    in_flight: usize,
    setup: &TrainingSetup,
) -> StagePlan {
    let bytes = setup.dtype.size() as u64;
    // The runtime keeps every parameter and its gradient in float32 on the device (the master
    // weights; bf16 compute casts them where they are used), whatever the training dtype.
    let param_bytes = STATE_BYTES;
    let tokens = (setup.seq_len * setup.micro_batch_size) as u64;
    let h = cfg.hidden_size as u64;
    let layer_full = layer_activations_per_token(cfg, setup.dtype) * tokens;
    let layer_input = h * bytes * tokens;
    let tiles = transients(cfg, setup.micro_batch_size, setup.seq_len);
    // The head keeps its normed input and each token's float32 log-sum-exp.
    let head_saved = (h * bytes + STATE_BYTES) * tokens;
    let checkpointing = setup.savers.checkpoint_activations || setup.savers.offload_activations;
    let layers = slice.layers.len() as u64;
    let embedding = if slice.embedding {
        cfg.embedding_params()
    } else {
        0
    };
    let own_output = !(cfg.tie_word_embeddings && slice.embedding);
    let head = if slice.head {
        h + if own_output {
            cfg.embedding_params()
        } else {
            0
        }
    } else {
        0
    };
    let params = embedding + layers * cfg.layer_params() + head;
    let largest_part = embedding
        .max(head)
        .max(if layers > 0 { cfg.layer_params() } else { 0 });
    let gradients = param_bytes
        * if setup.savers.optimizer_in_backward {
            largest_part
        } else {
            params
        };
    let optimizer_state = STATE_BYTES
        * match setup.optimizer {
            Optimizer::AdamW { .. } => 2 * params,
            Optimizer::Sgd { momentum, .. } if momentum != 0.0 => params,
            Optimizer::Sgd { .. } => 0,
            Optimizer::Adafactor { .. } => {
                let matrices = u64::from(slice.embedding) + u64::from(slice.head && own_output);
                matrices * adafactor_matrix_elements(cfg)
                    + layers * adafactor_layer_elements(cfg)
                    + if slice.head { h } else { 0 }
            }
        };
    let saved_per_micro_batch = if checkpointing {
        layer_input * (layers + u64::from(slice.head))
    } else {
        layer_full * layers + if slice.head { head_saved } else { 0 }
    };
    let saved = saved_per_micro_batch * in_flight as u64;
    let (activations, host_activations) = if setup.savers.offload_activations {
        (0, saved)
    } else {
        (saved, 0)
    };
    let layer_transient = layer_full + tiles.attention;
    let transient = if slice.head {
        tiles.head.max(layer_transient)
    } else if layers > 0 {
        layer_transient
    } else {
        layer_input
    };
    StagePlan {
        slice: slice.clone(),
        params,
        memory: Memory::new(
            params * param_bytes,
            gradients,
            optimizer_state,
            activations,
            host_activations,
            transient,
        ),
        in_flight,
    }
}

/// `1234567` → `1.2 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `8030261248` → `8.03B`.
pub fn human_count(count: u64) -> String {
    match count {
        c if c >= 1_000_000_000 => format!("{:.2}B", c as f64 / 1e9),
        c if c >= 1_000_000 => format!("{:.1}M", c as f64 / 1e6),
        c if c >= 1_000 => format!("{:.1}K", c as f64 / 1e3),
        c => c.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pp_stages::ScheduleKind;

    /// Llama-3-8B's config.json.
    const LLAMA3_8B: &str = r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
        "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}"#;

    #[test]
    fn llama3_8b_has_its_published_size() {
        let cfg = ModelConfig::from_hf_json(LLAMA3_8B).unwrap();
        assert_eq!(cfg.num_params(), 8_030_261_248);
        let m = MemoryEstimate::new(&cfg, DType::BF16, 4096);
        assert_eq!(m.weights, 2 * 8_030_261_248);
        assert_eq!(m.adamw_state, 8 * 8_030_261_248);
        // Factored state is tiny next to the weights.
        assert!(m.adafactor_state * 1000 < m.weights);
        assert!(m.adafactor_checkpointed_total() < m.adamw_total());
    }

    #[test]
    fn memory_balance_gives_the_ends_fewer_layers() {
        let cfg = ModelConfig::from_hf_json(LLAMA3_8B).unwrap();
        let costs = part_costs(&cfg, Balance::Memory, DType::BF16, 4096);
        // Llama-3-8B's head (output matrix, its state and the logits) outweighs a layer.
        assert!(costs.head > 1.5 * costs.layers[0]);
        let p = pp_stages::Partition::balanced(&costs, 4).unwrap();
        let sizes: Vec<usize> = p.stages().iter().map(|s| s.layers.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 32);
        assert!(sizes[3] < sizes[1] && sizes[0] < sizes[1], "{sizes:?}");
        let even = part_costs(&cfg, Balance::Layers, DType::BF16, 4096);
        let p = pp_stages::Partition::balanced(&even, 4).unwrap();
        assert!(p.stages().iter().all(|s| s.layers.len() == 8));
    }

    #[test]
    fn savers_leave_llama3_8b_at_4096_tokens_little_beside_its_float32_weights() {
        let cfg = ModelConfig::from_hf_json(LLAMA3_8B).unwrap();
        let whole = Partition::from_split(&[], cfg.num_layers).unwrap();
        let adafactor = Optimizer::Adafactor {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            weight_decay: 0.0,
        };
        let plan = |savers| {
            plan_training(
                &cfg,
                &whole,
                &TrainingSetup {
                    dtype: DType::BF16,
                    seq_len: 4096,
                    micro_batch_size: 1,
                    optimizer: adafactor.clone(),
                    savers,
                    in_flight: vec![1],
                },
            )[0]
            .clone()
        };
        let plain = plan(MemorySavers::default());
        let all = plan(MemorySavers {
            checkpoint_activations: true,
            offload_activations: true,
            optimizer_in_backward: true,
        });
        assert_eq!(plain.memory.weights, 4 * 8_030_261_248);
        assert!(
            plain.memory.total > 60 << 30,
            "plain: {}",
            human_bytes(plain.memory.total)
        );
        // Beside the float32 weights (30 GiB) the savers leave under 3 GiB: one part's
        // gradients (the head's 2 GiB) and the tiled kernels' chunks (no whole logits or score
        // matrix). The weights keep 8B off a 24 GB card.
        assert!(
            all.memory.total - all.memory.weights < 3 << 30,
            "all savers: {}",
            human_bytes(all.memory.total)
        );
        assert!(
            all.memory.transient < 3 << 29,
            "{}",
            human_bytes(all.memory.transient)
        );
        assert!(all.memory.total > 24 << 30);
        assert_eq!(all.memory.activations, 0);
        assert_eq!(all.memory.host_activations, 33 * 4096 * 4096 * 2);
        // Optimizer-in-backward keeps one part's gradients: the head (output matrix and norm).
        assert_eq!(all.memory.gradients, 4 * (128_256 * 4096 + 4096));
    }

    #[test]
    fn pipeline_stages_hold_what_their_schedule_keeps_in_flight() {
        let cfg = ModelConfig::from_hf_json(LLAMA3_8B).unwrap();
        let partition = Partition::from_split(&[16], cfg.num_layers).unwrap();
        let plans = |kind| {
            let schedule = Schedule::new(kind, 2, 8, 1).unwrap();
            let setup = TrainingSetup {
                dtype: DType::BF16,
                seq_len: 1024,
                micro_batch_size: 1,
                optimizer: Optimizer::Sgd {
                    momentum: 0.0,
                    weight_decay: 0.0,
                },
                savers: MemorySavers::default(),
                in_flight: in_flight(&schedule).unwrap(),
            };
            plan_training(&cfg, &partition, &setup)
        };
        let one_f_one_b = plans(ScheduleKind::OneFOneB);
        assert_eq!((one_f_one_b[0].in_flight, one_f_one_b[1].in_flight), (2, 1));
        assert_eq!(
            one_f_one_b[0].params + one_f_one_b[1].params,
            cfg.num_params()
        );
        assert_eq!(one_f_one_b[0].memory.optimizer_state, 0);
        // GPipe runs every forward first: each stage holds all eight micro-batches.
        let gpipe = plans(ScheduleKind::Gpipe);
        assert_eq!((gpipe[0].in_flight, gpipe[1].in_flight), (8, 8));
        assert_eq!(
            gpipe[0].memory.activations,
            4 * one_f_one_b[0].memory.activations
        );
    }

    #[test]
    fn devices_of_interleaved_and_zbv_add_up_their_stages() {
        let cfg = ModelConfig::from_hf_json(LLAMA3_8B).unwrap();
        let partition = Partition::from_split(&[8, 16, 24], cfg.num_layers).unwrap();
        for (kind, first_device) in [
            (ScheduleKind::Interleaved, vec![0, 2]),
            (ScheduleKind::ZbV, vec![0, 3]),
        ] {
            let schedule = Schedule::new(kind, 2, 4, 2).unwrap();
            let mut savers = MemorySavers::default();
            for in_backward in [false, true] {
                savers.optimizer_in_backward = in_backward;
                let setup = TrainingSetup {
                    dtype: DType::BF16,
                    seq_len: 1024,
                    micro_batch_size: 1,
                    optimizer: Optimizer::AdamW {
                        betas: (0.9, 0.999),
                        eps: 1e-8,
                        weight_decay: 0.0,
                    },
                    savers,
                    in_flight: in_flight(&schedule).unwrap(),
                };
                let stages = plan_training(&cfg, &partition, &setup);
                let devices = per_device(&stages, &schedule, &savers);
                assert_eq!(devices[0].stages, first_device);
                let [a, b] = [first_device[0], first_device[1]];
                let device = &devices[0];
                assert_eq!(
                    device.memory.weights,
                    stages[a].memory.weights + stages[b].memory.weights
                );
                assert_eq!(
                    device.memory.activations,
                    stages[a].memory.activations + stages[b].memory.activations
                );
                assert_eq!(
                    device.memory.transient,
                    stages[a].memory.transient.max(stages[b].memory.transient)
                );
                let gradients = if in_backward {
                    stages[a].memory.gradients.max(stages[b].memory.gradients)
                } else {
                    stages[a].memory.gradients + stages[b].memory.gradients
                };
                assert_eq!(device.memory.gradients, gradients);
                assert_eq!(
                    devices.iter().map(|d| d.memory.weights).sum::<u64>(),
                    stages.iter().map(|p| p.memory.weights).sum::<u64>()
                );
            }
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(human_count(8_030_261_248), "8.03B");
    }
}
