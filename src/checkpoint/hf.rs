//! Hugging Face safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Files are memory-mapped; headers are validated on open.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, TensorInfo};
use serde::Deserialize;

use super::{TensorView, WeightSource};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The index transformers writes next to sharded weights.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";

/// One memory-mapped safetensors file and its parsed header.
struct MappedFile {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    tensors: HashMap<String, (DType, Vec<usize>, std::ops::Range<usize>)>,
}

/// The tensors of a Hugging Face checkpoint directory.
pub struct SafetensorsWeights {
    files: Vec<MappedFile>,
    /// Tensor name → index into `files`.
    location: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl SafetensorsWeights {
    /// Opens the safetensors weights in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let file_names: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
                path: index_path.clone(),
                message: format!("not a valid shard index: {e}"),
            })?;
            let mut names: Vec<String> = index.weight_map.into_values().collect();
            names.sort();
            names.dedup();
            names
        } else if dir.join(SINGLE_FILE).exists() {
            vec![SINGLE_FILE.to_string()]
        } else {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                message: format!("no {SINGLE_FILE} or {INDEX_FILE} in the model directory"),
            });
        };
        let mut files = Vec::with_capacity(file_names.len());
        let mut location = BTreeMap::new();
        for name in file_names {
            let file = MappedFile::open(&dir.join(&name))?;
            for tensor in file.tensors.keys() {
                if location.insert(tensor.clone(), files.len()).is_some() {
                    return Err(Error::Checkpoint {
                        path: file.path.clone(),
                        message: format!("tensor `{tensor}` is stored in more than one shard"),
                    });
                }
            }
            files.push(file);
        }
        Ok(Self { files, location })
    }
}

impl MappedFile {
    fn open(path: &Path) -> Result<Self> {
        let handle = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; pp never writes to input checkpoints, and a checkpoint
        // changed by another process while mapped is outside what any loader can defend against.
        let map = unsafe { Mmap::map(&handle) }.map_err(|e| Error::io(path, e))?;
        let corrupt = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            corrupt(format!(
                "not a valid safetensors file (truncated or corrupt header): {e}"
            ))
        })?;
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            let TensorInfo {
                dtype,
                shape,
                data_offsets: (start, end),
            } = info;
            let dtype = match dtype {
                Dtype::F32 => DType::F32,
                Dtype::BF16 => DType::BF16,
                Dtype::F16 => DType::F16,
                other => {
                    return Err(corrupt(format!(
                        "tensor `{name}` has dtype {other:?}; pp reads F32, BF16 and F16"
                    )))
                }
            };
            tensors.insert(name, (dtype, shape.clone(), *start..*end));
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header_len,
            tensors,
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        let Some(&file_index) = self.location.get(name) else {
            let path = match self.files.as_slice() {
                [only] => only.path.clone(),
                _ => self
                    .files
                    .first()
                    .and_then(|f| f.path.parent())
                    .map(|dir| dir.join(INDEX_FILE))
                    .unwrap_or_default(),
            };
            return Err(Error::Checkpoint {
                path,
                message: format!("tensor `{name}` is missing"),
            });
        };
        let file = &self.files[file_index];
        let (dtype, shape, range) = &file.tensors[name];
        // 8 bytes of header length, then the JSON header, then the data section.
        let data_start = 8 + file.header_len;
        Ok(TensorView {
            dtype: *dtype,
            shape,
            bytes: &file.map[data_start + range.start..data_start + range.end],
        })
    }

    fn names(&self) -> Vec<String> {
        self.location.keys().cloned().collect()
    }

    fn release(&self, name: &str, range: std::ops::Range<usize>) {
        if let Some(&i) = self.location.get(name) {
            let file = &self.files[i];
            let start = 8 + file.header_len + file.tensors[name].2.start + range.start;
            super::release_pages(&file.map, start..start + range.len());
        }
    }

    fn file_of(&self, name: &str) -> &Path {
        self.location
            .get(name)
            .map(|&i| self.files[i].path.as_path())
            .unwrap_or_else(|| Path::new(""))
    }
}
