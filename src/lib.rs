//! `pp`: pipeline-parallel fine-tuning of Llama and Mistral models on Burn.
//!
//! The library holds the model ([`model`]), checkpoint reading ([`checkpoint`]), tokenization
//! and chat templates ([`tokenizer`]), datasets ([`data`]) and the commands built on them.
//! The `pp` binary is a thin command-line layer over it.

pub mod checkpoint;
pub mod cluster;
pub mod convert;
pub mod data;
pub mod device;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod generate;
pub mod interrupt;
pub mod kernels;
pub mod model;
pub mod plan;
pub mod sampling;
pub mod serve;
pub mod tokenizer;
pub mod tool_calls;
pub mod train;

pub use error::{Error, Result};
