//! Llama and Mistral decoders on Burn, generic over the backend, built from stage slices.

pub mod config;
pub mod context;
pub mod kv_cache;
pub mod layers;
pub mod loss;
pub mod names;
pub mod rope;
pub mod stage;

pub use config::{Architecture, ModelConfig};
pub use context::{AttentionInputs, TokenLayout};
pub use kv_cache::KvCache;
pub use stage::{token_tensor, StageModel};
