//! Model checkpoints: Hugging Face directories and `pp`'s native stage-partitioned format.
//! A [`WeightSource`] hands out tensors by their Hugging Face name as borrowed views of
//! memory-mapped files, so a pipeline stage touches only the bytes of the tensors it owns.

pub mod checksum;
mod hf;
pub mod hf_writer;
pub mod native;
mod owned;

pub use hf::SafetensorsWeights;
pub use native::{NativeCheckpoint, NativeWeights};
pub use owned::OwnedWeights;

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;

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

/// A tensor to be written: its name, storage dtype and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Hugging Face name.
    pub name: String,
    /// Storage dtype.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Size of the stored bytes.
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// A file being written tensor by tensor, each streamed in pieces: `begin`, any number of
/// `write`s, `end`, in the order the writer was created with.
pub trait TensorSink {
    /// Starts the next tensor, which must be `name`.
    fn begin(&mut self, name: &str) -> Result<()>;
    /// Appends bytes of the current tensor.
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Ends the current tensor; returns the checksum of its bytes if the sink computes one.
    fn end(&mut self) -> Result<Option<String>>;
    /// Whether [`end`](Self::end) returns checksums.
    fn computes_checksums(&self) -> bool {
        false
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
    /// The checksum the checkpoint records for `name` (see [`checksum`]), if it records one.
    fn expected_checksum(&self, _name: &str) -> Option<&str> {
        None
    }
    /// Says that bytes `range` of `name` will not be read again soon, so that a memory-mapped
    /// source can drop those pages from the process's resident memory (they stay in the page
    /// cache). Streaming a large checkpoint through a map stays within bounded memory this way.
    fn release(&self, _name: &str, _range: Range<usize>) {}
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
    // Hash only what the checkpoint can be checked against (Hugging Face files record nothing).
    if source.expected_checksum(name).is_some() {
        checksum::verify(source, name, &checksum::of(view.bytes))?;
    }
    let values = view.to_f32();
    source.release(name, 0..view.bytes.len());
    Ok(values)
}

/// The on-disk layout of a model directory.
pub enum Format {
    /// A Hugging Face directory: `config.json` and safetensors weights.
    HuggingFace,
    /// `pp`'s native format, partitioned into stages.
    Native(Box<NativeCheckpoint>),
}

/// What a model directory holds, read from its `config.json` or `manifest.json` alone.
pub struct ModelInfo {
    /// The directory.
    pub dir: PathBuf,
    /// Which format it is in.
    pub format: Format,
    /// `config.json` as transformers reads it (for a native checkpoint, the copy in its manifest).
    pub hf_config: Value,
    /// The resolved model configuration.
    pub config: crate::model::ModelConfig,
}

impl ModelInfo {
    /// Stages of a native checkpoint; a Hugging Face directory is one.
    pub fn stage_count(&self) -> usize {
        match &self.format {
            Format::Native(native) => native.partition().len(),
            Format::HuggingFace => 1,
        }
    }
}

/// A model directory opened for reading: what it is, and its weights.
pub struct ModelFiles {
    /// Format and configuration.
    pub info: ModelInfo,
    /// The tensors (every stage's, for a native checkpoint).
    pub weights: Box<dyn WeightSource>,
}

/// The configuration file of a Hugging Face model directory.
pub const HF_CONFIG_FILE: &str = "config.json";

/// Reads what a model directory is without touching its weights: native when it holds a
/// `manifest.json`, Hugging Face otherwise. A pipeline machine that holds one stage file of a
/// native checkpoint can describe it.
pub fn describe(dir: &Path) -> Result<ModelInfo> {
    if !dir.is_dir() {
        return Err(Error::io(
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
        ));
    }
    if dir.join(native::MANIFEST_FILE).exists() {
        let checkpoint = NativeCheckpoint::open(dir)?;
        return Ok(ModelInfo {
            dir: dir.to_path_buf(),
            hf_config: checkpoint.manifest().config.clone(),
            config: checkpoint.config().clone(),
            format: Format::Native(Box::new(checkpoint)),
        });
    }
    let config_path = dir.join(HF_CONFIG_FILE);
    if !config_path.exists() {
        return Err(Error::Config {
            path: config_path,
            message: "not found; a model directory needs a config.json (Hugging Face) or a \
                      manifest.json (pp native)"
                .into(),
        });
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config_error = |message: String| Error::Config {
        path: config_path.clone(),
        message,
    };
    let hf_config: Value = serde_json::from_str(&text)
        .map_err(|e| config_error(format!("not a valid model config: {e}")))?;
    let config = crate::model::ModelConfig::from_hf_value(&hf_config).map_err(config_error)?;
    Ok(ModelInfo {
        dir: dir.to_path_buf(),
        format: Format::HuggingFace,
        hf_config,
        config,
    })
}

/// Opens a model directory in either format, with every tensor mapped.
pub fn open(dir: &Path) -> Result<ModelFiles> {
    let info = describe(dir)?;
    let weights: Box<dyn WeightSource> = match &info.format {
        Format::Native(checkpoint) => Box::new(checkpoint.all_weights()?),
        Format::HuggingFace => Box::new(SafetensorsWeights::open(dir)?),
    };
    Ok(ModelFiles { info, weights })
}

/// Writes `value` as pretty-printed JSON and syncs it to disk.
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    text.push('\n');
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(path)?;
        std::io::Write::write_all(&mut file, text.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|e| Error::io(path, e))
}

/// Drops the pages of `range` of a read-only file map from the resident set.
pub(crate) fn release_pages(map: &memmap2::Mmap, range: Range<usize>) {
    #[cfg(unix)]
    if !range.is_empty() {
        // SAFETY: `map` is a read-only mapping of a file. MADV_DONTNEED only unmaps our copies
        // of the pages; the next access faults them back in from the page cache or the file, so
        // no byte seen through the map changes. memmap2 widens the range to page boundaries.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
        };
    }
    #[cfg(not(unix))]
    let _ = (map, range);
}
