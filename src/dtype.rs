//! Storage dtypes of checkpoint tensors, and their conversion to float32.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The element type a tensor is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE float32.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE float16.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The name transformers writes in `config.json` (`torch_dtype` / `dtype`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
        }
    }

    /// The same dtype as Burn names it.
    pub fn burn(self) -> burn::tensor::DType {
        match self {
            DType::F32 => burn::tensor::DType::F32,
            DType::BF16 => burn::tensor::DType::BF16,
            DType::F16 => burn::tensor::DType::F16,
        }
    }

    /// Parses the name transformers writes in `config.json`.
    pub fn from_torch_name(name: &str) -> Option<Self> {
        match name {
            "float32" | "float" => Some(DType::F32),
            "bfloat16" => Some(DType::BF16),
            "float16" | "half" => Some(DType::F16),
            _ => None,
        }
    }

    /// Converts little-endian stored bytes of this dtype to float32 values.
    ///
    /// `bytes.len()` must be a multiple of [`DType::size`]; callers check shapes first.
    pub fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }
}

impl DType {
    /// `value` rounded to this dtype (round to nearest even), as a float32.
    pub fn round(self, value: f32) -> f32 {
        match self {
            DType::F32 => value,
            DType::BF16 => half::bf16::from_f32(value).to_f32(),
            DType::F16 => half::f16::from_f32(value).to_f32(),
        }
    }

    /// Appends `bytes` (stored as `self`) to `out`, converted to `to`. Same-dtype casts copy the
    /// bytes; narrowing rounds to nearest even, as `torch.Tensor.to` does.
    pub fn cast(self, bytes: &[u8], to: DType, out: &mut Vec<u8>) {
        use half::{bf16, f16};
        let start = out.len();
        out.resize(start + bytes.len() / self.size() * to.size(), 0);
        let dst = &mut out[start..];
        // One monomorphic loop per pair, so each compiles to a tight (often vectorised) loop.
        match (self, to) {
            _ if self == to => dst.copy_from_slice(bytes),
            (DType::BF16, DType::F32) => map_elements(bytes, dst, |b: [u8; 2]| {
                bf16::from_le_bytes(b).to_f32().to_le_bytes()
            }),
            (DType::F16, DType::F32) => map_elements(bytes, dst, |b: [u8; 2]| {
                f16::from_le_bytes(b).to_f32().to_le_bytes()
            }),
            (DType::F32, DType::BF16) => map_elements(bytes, dst, |b: [u8; 4]| {
                bf16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
            }),
            (DType::F32, DType::F16) => map_elements(bytes, dst, |b: [u8; 4]| {
                f16::from_f32(f32::from_le_bytes(b)).to_le_bytes()
            }),
            (DType::BF16, DType::F16) => map_elements(bytes, dst, |b: [u8; 2]| {
                f16::from_f32(bf16::from_le_bytes(b).to_f32()).to_le_bytes()
            }),
            (DType::F16, DType::BF16) => map_elements(bytes, dst, |b: [u8; 2]| {
                bf16::from_f32(f16::from_le_bytes(b).to_f32()).to_le_bytes()
            }),
            _ => unreachable!("every pair of distinct dtypes is listed"),
        }
    }
}

/// Applies `f` to every `S`-byte element of `src`, writing `D`-byte elements to `dst`.
fn map_elements<const S: usize, const D: usize>(
    src: &[u8],
    dst: &mut [u8],
    f: impl Fn([u8; S]) -> [u8; D],
) {
    for (from, to) in src.chunks_exact(S).zip(dst.chunks_exact_mut(D)) {
        to.copy_from_slice(&f(from.try_into().expect("S bytes")));
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        })
    }
}

impl FromStr for DType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::BF16),
            "f16" => Ok(DType::F16),
            other => DType::from_torch_name(other)
                .ok_or_else(|| format!("unknown dtype `{other}` (expected f32, bf16 or f16)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_each_storage_dtype_to_f32() {
        let one_and_minus_half_bf16 = [0x80, 0x3f, 0x00, 0xbf];
        assert_eq!(
            DType::BF16.to_f32(&one_and_minus_half_bf16),
            vec![1.0, -0.5]
        );
        let one_and_minus_half_f16 = [0x00, 0x3c, 0x00, 0xb8];
        assert_eq!(DType::F16.to_f32(&one_and_minus_half_f16), vec![1.0, -0.5]);
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(DType::F32.to_f32(&bytes), vec![1.5, -2.0]);
    }

    #[test]
    fn casts_round_to_nearest_even() {
        // Both values lie halfway between two bfloat16 neighbours and go to the even one:
        // 1 + 2^-8 down to 1, 1 + 3·2^-8 up to 1 + 2^-6.
        let values: Vec<u8> = [1.0f32 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut bf16 = Vec::new();
        DType::F32.cast(&values, DType::BF16, &mut bf16);
        assert_eq!(DType::BF16.to_f32(&bf16), vec![1.0, 1.015625]);
        let mut back = Vec::new();
        DType::BF16.cast(&bf16, DType::F32, &mut back);
        assert_eq!(DType::F32.to_f32(&back), vec![1.0, 1.015625]);
        let mut same = Vec::new();
        DType::F16.cast(&[1, 2, 3, 4], DType::F16, &mut same);
        assert_eq!(same, vec![1, 2, 3, 4]);
    }

    #[test]
    fn parses_cli_and_torch_names() {
        assert_eq!("bf16".parse::<DType>(), Ok(DType::BF16));
        assert_eq!("float16".parse::<DType>(), Ok(DType::F16));
        assert!("int8".parse::<DType>().is_err());
    }
}
