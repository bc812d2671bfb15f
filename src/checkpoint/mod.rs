//! Reading model weights. A [`WeightSource`] hands out tensors by their Hugging Face name as
//! borrowed views of memory-mapped files, so a pipeline stage touches only the bytes of the
//! tensors it owns.

mod hf;
mod synthetic;

pub use hf::SafetensorsWeights;
pub use synthetic::SyntheticWeights;

use std::path::Path;

use crate::dtype::DType;
use crate::error::{Error, Result};

/// A tensor as stored: dtype, shape and little-endian bytes borrowed from a mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    /// Storage dtype.
    pub dtype: DType,
    /// Dimensions.
    pub shape: &'a [usize],
    /// Raw bytes, `shape.iter().product() * dtype.size()` of them.
    pub bytes: &'a [u8],
}

impl TensorView<'_> {
    /// The values upcast to float32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.dtype.to_f32(self.bytes)
    }
}

/// Where a model's tensors come from (a Hugging Face checkpoint, or `pp`'s native format).
pub trait WeightSource {
    /// The tensor called `name` (Hugging Face naming), or a checkpoint error naming it.
    fn tensor(&self, name: &str) -> Result<TensorView<'_>>;
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    /// The file that holds `name`, for error messages.
    fn file_of(&self, name: &str) -> &Path;
}

/// Reads `name` and checks it has `shape`, returning float32 values.
pub fn read_f32(source: &dyn WeightSource, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let view = source.tensor(name)?;
    if view.shape != shape {
        return Err(Error::Checkpoint {
            path: source.file_of(name).to_path_buf(),
            message: format!(
                "tensor `{name}` has shape {:?}, but the config implies {shape:?}",
                view.shape
            ),
        });
    }
    Ok(view.to_f32())
}

/// A model directory opened for reading: its configuration and weights.
pub struct ModelFiles {
    /// The directory.
    pub dir: std::path::PathBuf,
    /// The resolved model configuration.
    pub config: crate::model::ModelConfig,
    /// The tensors.
    pub weights: Box<dyn WeightSource>,
}

/// The configuration file of a Hugging Face model directory.
pub const HF_CONFIG_FILE: &str = "config.json";

/// Opens a model directory: its `config.json` and safetensors weights.
pub fn open(dir: &Path) -> Result<ModelFiles> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    let config_path = dir.join(HF_CONFIG_FILE);
    if !config_path.exists() {
        return Err(Error::Config {
            path: config_path,
            message: "not found; a model directory needs a config.json".into(),
        });
    }
    let config = crate::model::ModelConfig::from_hf_file(&config_path)?;
    let weights = SafetensorsWeights::open(dir)?;
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        weights: Box::new(weights),
    })
}
