//! Model configuration: `HfConfig` mirrors a Hugging Face `config.json` (both the transformers 4
//! and 5 layouts); it resolves once into [`ModelConfig`], so layers never see an `Option`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// The decoder families `pp` implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 2, 3, 3.1, 3.2 (`LlamaForCausalLM`).
    Llama,
    /// Mistral (`MistralForCausalLM`), with optional sliding-window attention.
    Mistral,
}

impl Architecture {
    /// The transformers class name.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
        }
    }
}

/// How rotary frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor of every frequency.
        factor: f64,
    },
    /// NTK-aware scaling that raises the base once the sequence exceeds the trained context.
    Dynamic {
        /// Context multiplier.
        factor: f64,
    },
    /// Llama 3.1's piecewise scaling of low, medium and high frequencies.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelength boundary (as a divisor of the original context) of the low band.
        low_freq_factor: f64,
        /// Wavelength boundary (as a divisor of the original context) of the high band.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// Rotary position embedding parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeConfig {
    /// The base of the geometric frequency progression.
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

/// A resolved decoder configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Llama or Mistral.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head; may differ from `hidden_size / num_heads`.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Rotary embeddings.
    pub rope: RopeConfig,
    /// The longest context the model supports.
    pub max_position_embeddings: usize,
    /// Mistral's sliding window: a token attends to at most this many tokens, itself included.
    pub sliding_window: Option<usize>,
    /// Whether the output projection is the transposed input embedding.
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint says its weights are stored in.
    pub dtype: DType,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    /// Padding token.
    pub pad_token_id: Option<u32>,
}

/// `config.json` as transformers writes it; only the fields `pp` reads.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers 5 keeps `rope_theta` and the scaling here.
    rope_parameters: Option<Value>,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    sliding_window: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    /// transformers 4 name of the storage dtype.
    torch_dtype: Option<String>,
    /// transformers 5 name of the storage dtype.
    dtype: Option<String>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    pad_token_id: Option<Value>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    2048
}

impl ModelConfig {
    /// Reads and resolves a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_hf_json(&text).map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Resolves the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> std::result::Result<Self, String> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| format!("not a valid model config: {e}"))?;
        Self::from_hf_value(&value)
    }

    /// Resolves a parsed Hugging Face `config.json`.
    pub fn from_hf_value(value: &Value) -> std::result::Result<Self, String> {
        let hf =
            HfConfig::deserialize(value).map_err(|e| format!("not a valid model config: {e}"))?;
        hf.resolve()
    }

    /// Number of parameters of the whole model.
    pub fn num_params(&self) -> u64 {
        let embedding = self.embedding_params();
        let head = if self.tie_word_embeddings {
            0
        } else {
            embedding
        };
        embedding + self.num_layers as u64 * self.layer_params() + self.hidden_size as u64 + head
    }

    /// Parameters of the embedding (also the size of an untied output projection).
    pub fn embedding_params(&self) -> u64 {
        (self.vocab_size * self.hidden_size) as u64
    }

    /// Parameters of one decoder layer.
    pub fn layer_params(&self) -> u64 {
        let (h, d) = (self.hidden_size as u64, self.head_dim as u64);
        let q_and_o = 2 * h * self.num_heads as u64 * d;
        let k_and_v = 2 * h * self.num_kv_heads as u64 * d;
        let mlp = 3 * h * self.intermediate_size as u64;
        q_and_o + k_and_v + mlp + 2 * h
    }
}

impl HfConfig {
    fn resolve(self) -> std::result::Result<ModelConfig, String> {
        let architecture = self.architecture()?;
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!(
                    "hidden_act `{act}` is not supported (Llama and Mistral use `silu`)"
                ));
            }
        }
        if self.attention_bias || self.mlp_bias {
            return Err("attention_bias / mlp_bias = true is not supported".into());
        }
        let num_kv_heads = self.num_key_value_heads.unwrap_or(self.num_attention_heads);
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", num_kv_heads),
        ] {
            if value == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(num_kv_heads) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                self.num_attention_heads
            ));
        }
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if self.hidden_size.is_multiple_of(self.num_attention_heads) => {
                self.hidden_size / self.num_attention_heads
            }
            None => {
                return Err(format!(
                    "hidden_size ({}) is not divisible by num_attention_heads ({}); set head_dim",
                    self.hidden_size, self.num_attention_heads
                ))
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim must be even and positive, got {head_dim}"
            ));
        }
        let dtype_name = self.dtype.as_deref().or(self.torch_dtype.as_deref());
        let dtype = match dtype_name {
            None => DType::F32,
            Some(name) => DType::from_torch_name(name).ok_or_else(|| {
                format!("dtype `{name}` is not supported (float32, bfloat16 or float16)")
            })?,
        };
        let rope = self.rope()?;
        // Only Mistral uses a sliding window; Llama configs never set one.
        let sliding_window = match architecture {
            Architecture::Mistral => self.sliding_window,
            Architecture::Llama => None,
        };
        if sliding_window == Some(0) {
            return Err("sliding_window must be positive".into());
        }
        Ok(ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope,
            max_position_embeddings: self.max_position_embeddings,
            sliding_window,
            tie_word_embeddings: self.tie_word_embeddings,
            dtype,
            bos_token_id: token_ids(self.bos_token_id.as_ref(), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(self.eos_token_id.as_ref(), "eos_token_id")?,
            pad_token_id: token_ids(self.pad_token_id.as_ref(), "pad_token_id")?
                .first()
                .copied(),
        })
    }

    fn architecture(&self) -> std::result::Result<Architecture, String> {
        let from_class = self.architectures.iter().find_map(|a| match a.as_str() {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            _ => None,
        });
        let from_type = match self.model_type.as_deref() {
            Some("llama") => Some(Architecture::Llama),
            Some("mistral") => Some(Architecture::Mistral),
            _ => None,
        };
        from_class.or(from_type).ok_or_else(|| {
            let named = self
                .architectures
                .first()
                .cloned()
                .or_else(|| self.model_type.clone())
                .unwrap_or_else(|| "none given".into());
            format!("architecture `{named}` is not supported (pp trains LlamaForCausalLM and MistralForCausalLM)")
        })
    }

    /// Reads RoPE from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4).
    fn rope(&self) -> std::result::Result<RopeConfig, String> {
        let params = self
            .rope_parameters
            .as_ref()
            .or(self.rope_scaling.as_ref())
            .filter(|v| !v.is_null());
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.rope_theta)
            .unwrap_or(10_000.0);
        let Some(params) = params else {
            return Ok(RopeConfig {
                theta,
                scaling: RopeScaling::Default,
            });
        };
        let kind = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let number = |key: &str| {
            params
                .get(key)
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("rope `{kind}` scaling needs a numeric `{key}`"))
        };
        let scaling = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: number("factor")?,
            },
            "dynamic" => RopeScaling::Dynamic {
                factor: number("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: number("factor")?,
                low_freq_factor: number("low_freq_factor")?,
                high_freq_factor: number("high_freq_factor")?,
                original_max_position_embeddings: number("original_max_position_embeddings")?,
            },
            other => {
                return Err(format!(
                    "rope_type `{other}` is not supported (default, linear, dynamic or llama3)"
                ))
            }
        };
        Ok(RopeConfig { theta, scaling })
    }
}

/// Token ids in `config.json` are a number, a list of numbers, or null.
fn token_ids(value: Option<&Value>, field: &str) -> std::result::Result<Vec<u32>, String> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("{field} must be a token id or a list of them, got {v}"))
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3_TF5: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32",
        "vocab_size": 384, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 128, "tie_word_embeddings": false, "eos_token_id": [1, 3],
        "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0, "rope_type": "llama3"}
    }"#;

    #[test]
    fn reads_the_transformers_5_layout() {
        let cfg = ModelConfig::from_hf_json(LLAMA3_TF5).unwrap();
        assert_eq!(cfg.architecture, Architecture::Llama);
        assert_eq!(cfg.rope.theta, 500000.0);
        assert!(matches!(cfg.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(cfg.eos_token_ids, vec![1, 3]);
        assert_eq!(cfg.num_kv_heads, 2);
    }

    #[test]
    fn reads_the_transformers_4_layout() {
        let text = r#"{"architectures": ["MistralForCausalLM"], "torch_dtype": "bfloat16",
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rope_theta": 1000.0, "rope_scaling": {"type": "linear",
            "factor": 2.0}, "sliding_window": 4}"#;
        let cfg = ModelConfig::from_hf_json(text).unwrap();
        assert_eq!(cfg.dtype, DType::BF16);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.num_kv_heads, 2);
        assert_eq!(cfg.sliding_window, Some(4));
        assert_eq!(
            cfg.rope,
            RopeConfig {
                theta: 1000.0,
                scaling: RopeScaling::Linear { factor: 2.0 }
            }
        );
    }

    #[test]
    fn unknown_rope_type_and_architecture_are_errors() {
        let yarn = LLAMA3_TF5.replace("\"llama3\"", "\"yarn\"");
        let err = ModelConfig::from_hf_json(&yarn).unwrap_err();
        assert!(err.contains("rope_type `yarn`"), "{err}");
        let gpt2 = LLAMA3_TF5
            .replace("LlamaForCausalLM", "GPT2LMHeadModel")
            .replace("\"llama\"", "\"gpt2\"");
        let err = ModelConfig::from_hf_json(&gpt2).unwrap_err();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn missing_field_is_named() {
        let err =
            ModelConfig::from_hf_json(r#"{"architectures": ["LlamaForCausalLM"]}"#).unwrap_err();
        assert!(err.contains("vocab_size"), "{err}");
    }

    #[test]
    fn counts_parameters_like_transformers() {
        // llama3-tiny: 384*64 (embed) + 4 layers + 64 (norm) + 384*64 (lm_head).
        let cfg = ModelConfig::from_hf_json(LLAMA3_TF5).unwrap();
        let layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160 + 2 * 64;
        assert_eq!(cfg.num_params(), 2 * 384 * 64 + 4 * layer + 64);
    }
}
