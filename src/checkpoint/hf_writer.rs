//! Writing Hugging Face safetensors shards tensor by tensor, streaming each tensor's bytes, with
//! the `model.safetensors.index.json` that transformers' `from_pretrained` reads.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde_json::json;

use super::hf::INDEX_FILE;
use super::{TensorSink, TensorSpec};
use crate::dtype::DType;
use crate::error::{Error, Result};

/// transformers' default `max_shard_size` ("5GB").
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// Splits `tensors`, in order, into shards of at most `max_bytes` (a tensor larger than that gets
/// a shard of its own), named as transformers names them.
pub fn plan_shards(tensors: Vec<TensorSpec>, max_bytes: u64) -> Vec<(String, Vec<TensorSpec>)> {
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut current_bytes = 0;
    for tensor in tensors {
        let bytes = tensor.bytes();
        match shards.last_mut() {
            Some(shard) if current_bytes + bytes <= max_bytes => {
                current_bytes += bytes;
                shard.push(tensor);
            }
            _ => {
                current_bytes = bytes;
                shards.push(vec![tensor]);
            }
        }
    }
    let count = shards.len();
    shards
        .into_iter()
        .enumerate()
        .map(|(i, shard)| {
            (
                format!("model-{:05}-of-{count:05}.safetensors", i + 1),
                shard,
            )
        })
        .collect()
}

/// Writes `model.safetensors.index.json` for `shards`.
pub fn write_index(dir: &Path, shards: &[(String, Vec<TensorSpec>)]) -> Result<()> {
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0;
    for (file, tensors) in shards {
        for tensor in tensors {
            weight_map.insert(tensor.name.clone(), file.clone());
            total_size += tensor.bytes();
        }
    }
    let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    super::write_json(&dir.join(INDEX_FILE), &index)
}

/// One safetensors file written as a [`TensorSink`].
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    tensors: Vec<TensorSpec>,
    next: usize,
    /// Bytes of tensor data still expected for the current tensor.
    remaining: u64,
}

impl SafetensorsWriter {
    /// Creates `path` for `tensors` and writes its header.
    pub fn create(path: &Path, tensors: Vec<TensorSpec>) -> Result<Self> {
        let mut offset = 0;
        let infos = tensors
            .iter()
            .map(|t| {
                let start = offset as usize;
                offset += t.bytes();
                let info = TensorInfo {
                    dtype: safetensors_dtype(t.dtype),
                    shape: t.shape.clone(),
                    data_offsets: (start, offset as usize),
                };
                (t.name.clone(), info)
            })
            .collect();
        // transformers refuses files whose metadata lacks a known "format".
        let format = HashMap::from([("format".to_string(), "pt".to_string())]);
        let metadata = Metadata::new(Some(format), infos).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("cannot lay out safetensors header: {e}"),
        })?;
        let mut header = serde_json::to_vec(&metadata).expect("metadata serializes");
        // The data section starts 8-byte aligned; the format pads the header with spaces.
        header.resize(header.len().next_multiple_of(8), b' ');
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut writer = Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, file),
            tensors,
            next: 0,
            remaining: 0,
        };
        writer.put(&(header.len() as u64).to_le_bytes())?;
        writer.put(&header)?;
        Ok(writer)
    }

    /// Flushes and syncs the file to disk.
    pub fn finish(mut self) -> Result<()> {
        assert_eq!(self.next, self.tensors.len(), "every tensor was written");
        let io = |e| Error::io(&self.path, e);
        self.out.flush().map_err(io)?;
        self.out.get_ref().sync_all().map_err(io)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))
    }
}

impl TensorSink for SafetensorsWriter {
    fn begin(&mut self, name: &str) -> Result<()> {
        let spec = &self.tensors[self.next];
        assert_eq!(spec.name, name, "tensors are written in layout order");
        self.remaining = spec.bytes();
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.remaining = self
            .remaining
            .checked_sub(bytes.len() as u64)
            .expect("no more bytes than the tensor holds");
        self.put(bytes)
    }

    fn end(&mut self) -> Result<Option<String>> {
        assert_eq!(self.remaining, 0, "tensor written in full");
        self.next += 1;
        Ok(None)
    }
}

fn safetensors_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
    }
}
