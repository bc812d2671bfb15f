//! `pp`'s native checkpoint format (specified in `docs/format.md`): a `manifest.json` with the
//! model config, the partition into stages and an index of every tensor, plus one data file per
//! stage, so that a stage process maps only its own file.

mod stage_file;

pub use stage_file::{StageFileWriter, StageHeader};

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use pp_stages::{Partition, StageSlice};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{TensorView, WeightSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::ModelConfig;
use stage_file::MappedStage;

/// What the manifest's `format` field says.
pub const FORMAT_NAME: &str = "pp-native";
/// The format version this build writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";

/// The data file of stage `index`.
pub fn stage_file_name(index: usize) -> String {
    format!("stage-{index:03}.bin")
}

/// Everything about a native checkpoint except the tensor bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// The version of this layout; readers refuse versions newer than they know.
    pub format_version: u32,
    /// The dtype every weight is stored in.
    pub dtype: DType,
    /// Whether the output projection is the input embedding. When the embedding and the head are
    /// in different stages, both stages hold a copy of `model.embed_tokens.weight`.
    pub tied_embeddings: bool,
    /// The checksum algorithm of [`TensorEntry::checksum`].
    pub checksum: String,
    /// `config.json` as transformers reads it, its dtype field set to `dtype`.
    pub config: Value,
    /// Tokenizer, chat template and generation files stored beside the manifest.
    pub files: Vec<String>,
    /// The stages, first to last.
    pub stages: Vec<StageEntry>,
}

/// One stage: what it owns and where its tensors are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageEntry {
    /// The data file, relative to the checkpoint directory.
    pub file: String,
    /// The parts of the model the stage owns.
    pub slice: StageSlice,
    /// Size of the data file in bytes.
    pub bytes: u64,
    /// The stage's tensors in file order.
    pub tensors: Vec<TensorEntry>,
}

/// Where one tensor is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Hugging Face name.
    pub name: String,
    /// Storage dtype.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Byte offset of the first element from the start of the stage file.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Checksum of the bytes, 16 hex digits.
    pub checksum: String,
}

impl TensorEntry {
    /// The bytes the tensor occupies in its stage file.
    pub fn range(&self) -> Range<usize> {
        self.offset as usize..(self.offset + self.length) as usize
    }
}

impl Manifest {
    /// The partition recorded by the stages.
    pub fn partition(&self, num_layers: usize) -> std::result::Result<Partition, String> {
        let slices = self.stages.iter().map(|s| s.slice.clone()).collect();
        Partition::new(slices, num_layers).map_err(|e| e.to_string())
    }
}

/// A native checkpoint directory whose manifest has been read and checked. Stage files are
/// mapped only when asked for with [`NativeCheckpoint::weights`].
pub struct NativeCheckpoint {
    dir: PathBuf,
    manifest: Manifest,
    config: ModelConfig,
    partition: Partition,
}

impl NativeCheckpoint {
    /// Reads and checks `dir/manifest.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |message: String| Error::Checkpoint {
            path: path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        // Check the format and version before the fields, so that a newer layout is named as
        // such rather than reported as a missing field.
        if value.get("format").and_then(Value::as_str) != Some(FORMAT_NAME) {
            return Err(bad(format!(
                "not a pp checkpoint manifest (no \"format\": \"{FORMAT_NAME}\")"
            )));
        }
        match value.get("format_version").and_then(Value::as_u64) {
            Some(v) if v == u64::from(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(bad(format!(
                    "format version {v} is not supported; this pp reads version {FORMAT_VERSION}"
                )))
            }
            None => return Err(bad("missing \"format_version\"".into())),
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| bad(format!("malformed manifest: {e}")))?;
        if manifest.checksum != super::checksum::ALGORITHM {
            return Err(bad(format!(
                "unknown checksum algorithm `{}`",
                manifest.checksum
            )));
        }
        let config =
            ModelConfig::from_hf_value(&manifest.config).map_err(|message| Error::Config {
                path: path.clone(),
                message,
            })?;
        let partition = manifest.partition(config.num_layers).map_err(&bad)?;
        for stage in &manifest.stages {
            check_file_name(&stage.file).map_err(&bad)?;
            for tensor in &stage.tensors {
                let elements: usize = tensor.shape.iter().product();
                if (elements * tensor.dtype.size()) as u64 != tensor.length {
                    return Err(bad(format!(
                        "tensor `{}` has shape {:?} but {} bytes",
                        tensor.name, tensor.shape, tensor.length
                    )));
                }
            }
        }
        for file in &manifest.files {
            check_file_name(file).map_err(&bad)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            config,
            partition,
        })
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The resolved model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The stages the checkpoint is partitioned into.
    pub fn partition(&self) -> &Partition {
        &self.partition
    }

    /// Maps the data files of `stages` (and no others) and checks their headers.
    pub fn weights(&self, stages: &[usize]) -> Result<NativeWeights> {
        let mut mapped = Vec::with_capacity(stages.len());
        let mut location = BTreeMap::new();
        for &index in stages {
            let entry = self
                .manifest
                .stages
                .get(index)
                .ok_or_else(|| Error::Checkpoint {
                    path: self.dir.join(MANIFEST_FILE),
                    message: format!(
                        "there is no stage {index}; the checkpoint has {} stages",
                        self.manifest.stages.len()
                    ),
                })?;
            let stage = MappedStage::open(&self.dir.join(&entry.file), index, entry)?;
            for (i, tensor) in entry.tensors.iter().enumerate() {
                // A tied embedding is in two stages; either copy serves.
                location
                    .entry(tensor.name.clone())
                    .or_insert((mapped.len(), i));
            }
            mapped.push(stage);
        }
        Ok(NativeWeights {
            stages: mapped,
            location,
        })
    }

    /// Maps every stage's data file.
    pub fn all_weights(&self) -> Result<NativeWeights> {
        let all: Vec<usize> = (0..self.manifest.stages.len()).collect();
        self.weights(&all)
    }
}

/// Stage files and extra files are plain names inside the checkpoint directory.
fn check_file_name(name: &str) -> std::result::Result<(), String> {
    let plain = !name.is_empty()
        && !name.contains(['/', '\\'])
        && name != "."
        && name != ".."
        && name != MANIFEST_FILE;
    if plain {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid file name inside the checkpoint"
        ))
    }
}

/// The tensors of the mapped stages of a native checkpoint.
pub struct NativeWeights {
    stages: Vec<MappedStage>,
    /// Tensor name → (index into `stages`, index into that stage's tensors).
    location: BTreeMap<String, (usize, usize)>,
}

impl NativeWeights {
    fn entry(&self, name: &str) -> Option<(&MappedStage, &TensorEntry)> {
        let &(stage, tensor) = self.location.get(name)?;
        let stage = &self.stages[stage];
        Some((stage, &stage.tensors()[tensor]))
    }
}

impl WeightSource for NativeWeights {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let Some((stage, entry)) = self.entry(name) else {
            let path = self
                .stages
                .first()
                .map(|s| s.path().to_path_buf())
                .unwrap_or_default();
            return Err(Error::Checkpoint {
                path,
                message: format!("tensor `{name}` is not in the mapped stages"),
            });
        };
        Ok(TensorView {
            dtype: entry.dtype,
            shape: &entry.shape,
            bytes: stage.bytes(entry.range()),
        })
    }

    fn names(&self) -> Vec<String> {
        self.location.keys().cloned().collect()
    }

    fn file_of(&self, name: &str) -> &Path {
        self.entry(name)
            .map(|(stage, _)| stage.path())
            .unwrap_or_else(|| Path::new(""))
    }

    fn expected_checksum(&self, name: &str) -> Option<&str> {
        self.entry(name).map(|(_, entry)| entry.checksum.as_str())
    }

    fn release(&self, name: &str, range: Range<usize>) {
        if let Some((stage, entry)) = self.entry(name) {
            let start = entry.offset as usize + range.start;
            stage.release(start..start + range.len());
        }
    }
}
