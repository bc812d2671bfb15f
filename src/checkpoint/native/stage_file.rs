//! One stage's data file: an 8-byte magic, the header's length (u64, little-endian), a `bincode`
//! [`StageHeader`], then each tensor's raw little-endian bytes at a 64-byte-aligned offset.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use pp_stages::StageSlice;
use serde::{Deserialize, Serialize};

use super::{stage_file_name, StageEntry, TensorEntry, FORMAT_VERSION};
use crate::checkpoint::checksum::Checksum;
use crate::checkpoint::{TensorSink, TensorSpec};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"PPSTAGE\0";
/// Magic and header length.
const PREAMBLE: usize = 16;
/// Every tensor starts at a multiple of this, so a mapped tensor can be read in place as its
/// element type by SIMD code.
pub const ALIGN: u64 = 64;
/// Headers larger than this are corrupt (a 405B model's largest stage has a few thousand tensors).
const HEADER_LIMIT: usize = 64 << 20;

/// The header of a stage file; it repeats the manifest's entries for the stage so that a stage
/// file describes itself and a file from a different conversion is caught.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageHeader {
    /// The format version.
    pub format_version: u32,
    /// Index of the stage.
    pub stage: u32,
    /// The stage's tensors in file order.
    pub tensors: Vec<TensorEntry>,
}

/// Fixed-width integers keep the header's length independent of the values in it, so the final
/// header (with checksums) overwrites the placeholder written before the data exactly.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<HEADER_LIMIT>()
}

fn encode(header: &StageHeader) -> Vec<u8> {
    bincode::serde::encode_to_vec(header, bincode_config())
        .expect("a header of strings and integers always encodes")
}

/// A stage file mapped for reading, its header checked against the manifest.
pub(super) struct MappedStage {
    path: PathBuf,
    map: Mmap,
    tensors: Vec<TensorEntry>,
}

impl MappedStage {
    pub(super) fn open(path: &Path, index: usize, entry: &StageEntry) -> Result<Self> {
        let bad = |message: String| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if size != entry.bytes {
            return Err(bad(format!(
                "{size} bytes, but the manifest says {} (truncated or overwritten)",
                entry.bytes
            )));
        }
        // SAFETY: read-only map of a file pp does not modify while reading; see hf.rs.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if map.len() < PREAMBLE || &map[..8] != MAGIC {
            return Err(bad("not a pp stage file (bad magic bytes)".into()));
        }
        let header_len = u64::from_le_bytes(map[8..16].try_into().expect("8 bytes")) as usize;
        let header_bytes = map
            .get(PREAMBLE..PREAMBLE.saturating_add(header_len))
            .ok_or_else(|| bad(format!("header length {header_len} runs past the end")))?;
        let (header, _): (StageHeader, usize) =
            bincode::serde::decode_from_slice(header_bytes, bincode_config())
                .map_err(|e| bad(format!("corrupt header: {e}")))?;
        if header.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is not supported; this pp reads version {FORMAT_VERSION}",
                header.format_version
            )));
        }
        if header.stage as usize != index || header.tensors != entry.tensors {
            return Err(bad(format!(
                "the file's header does not match stage {index} of the manifest \
                 (a stage file from another checkpoint?)"
            )));
        }
        let data_start = (PREAMBLE + header_len) as u64;
        if let Some(t) = header
            .tensors
            .iter()
            .find(|t| t.offset < data_start || t.offset + t.length > size)
        {
            return Err(bad(format!(
                "tensor `{}` lies outside the data section",
                t.name
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            tensors: header.tensors,
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub(super) fn bytes(&self, range: Range<usize>) -> &[u8] {
        &self.map[range]
    }

    pub(super) fn release(&self, range: Range<usize>) {
        crate::checkpoint::release_pages(&self.map, range);
    }
}

/// Writes a stage file as a [`TensorSink`]; [`finish`](Self::finish) then fills in the
/// checksums and syncs the file.
pub struct StageFileWriter {
    path: PathBuf,
    file_name: String,
    out: BufWriter<File>,
    stage: usize,
    slice: StageSlice,
    tensors: Vec<TensorEntry>,
    /// Index of the tensor being written, or of the next one.
    next: usize,
    /// Bytes written so far.
    position: u64,
    current: Option<Checksum>,
    header_len: usize,
}

impl StageFileWriter {
    /// Creates `dir/stage-NNN.bin` for the tensors `layout`, in that order.
    pub fn create(
        dir: &Path,
        stage: usize,
        slice: StageSlice,
        layout: Vec<TensorSpec>,
    ) -> Result<Self> {
        let mut tensors: Vec<TensorEntry> = layout
            .into_iter()
            .map(|spec| TensorEntry {
                length: spec.bytes(),
                name: spec.name,
                dtype: spec.dtype,
                shape: spec.shape,
                offset: 0,
                checksum: "0".repeat(16),
            })
            .collect();
        let mut header = StageHeader {
            format_version: FORMAT_VERSION,
            stage: stage as u32,
            tensors: tensors.clone(),
        };
        let header_len = encode(&header).len();
        let mut offset = (PREAMBLE + header_len) as u64;
        for tensor in &mut tensors {
            offset = offset.next_multiple_of(ALIGN);
            tensor.offset = offset;
            offset += tensor.length;
        }
        header.tensors = tensors.clone();
        let file_name = stage_file_name(stage);
        let path = dir.join(&file_name);
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut writer = Self {
            out: BufWriter::with_capacity(1 << 20, file),
            path,
            file_name,
            stage,
            slice,
            tensors,
            next: 0,
            position: 0,
            current: None,
            header_len,
        };
        writer.put(MAGIC)?;
        writer.put(&(header_len as u64).to_le_bytes())?;
        writer.put(&encode(&header))?;
        Ok(writer)
    }

    /// Writes the final header, syncs the file to disk and returns its manifest entry.
    pub fn finish(mut self) -> Result<StageEntry> {
        assert_eq!(self.next, self.tensors.len(), "every tensor was written");
        let header = encode(&StageHeader {
            format_version: FORMAT_VERSION,
            stage: self.stage as u32,
            tensors: self.tensors.clone(),
        });
        assert_eq!(header.len(), self.header_len, "fixed-width header");
        let io = |e| Error::io(&self.path, e);
        self.out.flush().map_err(io)?;
        let file = self.out.get_mut();
        file.seek(SeekFrom::Start(PREAMBLE as u64)).map_err(io)?;
        file.write_all(&header).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(StageEntry {
            file: self.file_name,
            slice: self.slice,
            bytes: self.position,
            tensors: self.tensors,
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.position += bytes.len() as u64;
        Ok(())
    }
}

impl TensorSink for StageFileWriter {
    fn computes_checksums(&self) -> bool {
        true
    }

    fn begin(&mut self, name: &str) -> Result<()> {
        let entry = &self.tensors[self.next];
        assert_eq!(entry.name, name, "tensors are written in layout order");
        let padding = entry.offset - self.position;
        self.put(&vec![0; padding as usize])?;
        self.current = Some(Checksum::default());
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.current
            .as_mut()
            .expect("write() between begin() and end()")
            .update(bytes);
        self.put(bytes)
    }

    fn end(&mut self) -> Result<Option<String>> {
        let checksum = self.current.take().expect("end() after begin()").hex();
        let entry = &mut self.tensors[self.next];
        assert_eq!(
            self.position,
            entry.offset + entry.length,
            "tensor `{}` written with the wrong length",
            entry.name
        );
        entry.checksum = checksum.clone();
        self.next += 1;
        Ok(Some(checksum))
    }
}
