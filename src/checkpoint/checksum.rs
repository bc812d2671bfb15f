//! Tensor checksums: xxh3-64 over a tensor's stored bytes, written as 16 hex digits. Fast enough
//! (several GB/s on one core) to check every tensor on every load.

use xxhash_rust::xxh3::Xxh3;

use super::WeightSource;
use crate::error::{Error, Result};

/// The algorithm the native format names in its manifest.
pub const ALGORITHM: &str = "xxh3-64";

/// A checksum computed over bytes fed in pieces.
#[derive(Default, Clone)]
pub struct Checksum(Xxh3);

impl Checksum {
    /// Feeds the next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The checksum of everything fed so far, as 16 hex digits.
    pub fn hex(&self) -> String {
        to_hex(self.0.digest())
    }
}

/// The checksum of `bytes` as 16 hex digits.
pub fn of(bytes: &[u8]) -> String {
    to_hex(xxhash_rust::xxh3::xxh3_64(bytes))
}

fn to_hex(value: u64) -> String {
    format!("{value:016x}")
}

/// Fails, naming the file and tensor, if `actual` is not the checksum `source` records for `name`.
pub fn verify(source: &dyn WeightSource, name: &str, actual: &str) -> Result<()> {
    match source.expected_checksum(name) {
        Some(expected) if expected != actual => Err(Error::Checkpoint {
            path: source.file_of(name).to_path_buf(),
            message: format!(
                "checksum mismatch in tensor `{name}` (stored {expected}, computed {actual}); \
                 the file is corrupt"
            ),
        }),
        _ => Ok(()),
    }
}
