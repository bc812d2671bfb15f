//! Estimates of the memory that full fine-tuning needs: weights, gradients, optimizer state and
//! saved activations. `pp inspect` prints them; they are estimates, not measurements.

use serde::Serialize;

use pp_stages::PartCosts;

use crate::dtype::DType;
use crate::model::ModelConfig;

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
    /// The largest short-lived buffer: one layer's recomputed activations or the logits and
    /// their log-softmax, whichever is larger, for one sequence.
    pub largest_transient: u64,
}

impl MemoryEstimate {
    /// Estimates for `cfg` trained in `dtype` on sequences of `seq_len` tokens.
    pub fn new(cfg: &ModelConfig, dtype: DType, seq_len: usize) -> Self {
        let bytes = dtype.size() as u64;
        let params = cfg.num_params();
        let h = cfg.hidden_size as u64;
        let per_layer = layer_activations_per_token(cfg, dtype, seq_len);
        let layers = cfg.num_layers as u64;
        let logits = logits_bytes(cfg, seq_len);
        Self {
            seq_len,
            weights: params * bytes,
            gradients: params * bytes,
            adamw_state: 2 * STATE_BYTES * params,
            adafactor_state: STATE_BYTES * adafactor_elements(cfg),
            activations_per_token: layers * per_layer,
            checkpointed_activations_per_token: layers * h * bytes,
            largest_transient: logits.max(per_layer * seq_len as u64),
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

/// What autodiff keeps per token in one layer: the residual and both norms' inputs and outputs
/// (6h), q/k/v before and after rotation (2(q + 2kv)), the attention output (q), the MLP's gate,
/// up, activated gate and product (4i) and, for attention, the scores and probabilities of this
/// token against every key (2 · heads · seq).
fn layer_activations_per_token(cfg: &ModelConfig, dtype: DType, seq_len: usize) -> u64 {
    let (h, i) = (cfg.hidden_size as u64, cfg.intermediate_size as u64);
    let (q, kv) = (
        (cfg.num_heads * cfg.head_dim) as u64,
        (cfg.num_kv_heads * cfg.head_dim) as u64,
    );
    dtype.size() as u64
        * (6 * h + 2 * (q + 2 * kv) + q + 4 * i + 2 * cfg.num_heads as u64 * seq_len as u64)
}

/// The float32 logits of one sequence and their log-softmax.
fn logits_bytes(cfg: &ModelConfig, seq_len: usize) -> u64 {
    2 * STATE_BYTES * cfg.vocab_size as u64 * seq_len as u64
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
    /// micro-batch's saved activations, and the head's logits.
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
                layer * per_param + layer_activations_per_token(cfg, dtype, seq_len) * seq,
                head * per_param + logits_bytes(cfg, seq_len),
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
    let (v, h, i) = (
        cfg.vocab_size as u64,
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
    );
    let (q, kv) = (
        (cfg.num_heads * cfg.head_dim) as u64,
        (cfg.num_kv_heads * cfg.head_dim) as u64,
    );
    let matrix = |r: u64, c: u64| r + c;
    let layer =
        matrix(q, h) + 2 * matrix(kv, h) + matrix(h, q) + 2 * matrix(i, h) + matrix(h, i) + 2 * h;
    let embedding = matrix(v, h);
    let head = if cfg.tie_word_embeddings {
        0
    } else {
        embedding
    };
    embedding + cfg.num_layers as u64 * layer + h + head
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
    fn formats_sizes() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(human_count(8_030_261_248), "8.03B");
    }
}
