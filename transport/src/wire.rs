//! How tensor values are laid out on the wire: float32 as computed, or narrower to move fewer
//! bytes over slow links (bfloat16, float16, or float8 E4M3 with one float32 scale per row).
//! Activations and gradients may travel narrow; per-rank sums never do (see [`crate::Kind`]).

use serde::{Deserialize, Serialize};

/// The number type of tensor values on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum WireDType {
    /// IEEE float32: exact.
    #[default]
    F32,
    /// bfloat16: float32's range, 8 bits of precision; exact for bf16 training.
    Bf16,
    /// IEEE float16: 11 bits of precision, a narrow range.
    F16,
    /// float8 E4M3 scaled per row (the last dimension) so that each row's largest magnitude
    /// maps to E4M3's largest: a quarter of float32's bytes.
    Fp8,
}

impl std::str::FromStr for WireDType {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            "fp8" => Ok(Self::Fp8),
            other => Err(format!(
                "`{other}` is not a wire dtype (f32, bf16, f16, fp8)"
            )),
        }
    }
}

/// E4M3's largest finite magnitude.
const FP8_MAX: f32 = 448.0;

impl WireDType {
    /// Appends `values` (rows of `row` values) in this type.
    pub(crate) fn encode(self, values: &[f32], row: usize, out: &mut Vec<u8>) {
        match self {
            Self::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            Self::Bf16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
            Self::F16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes())),
            Self::Fp8 => {
                for chunk in values.chunks(row.max(1)) {
                    let largest = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let scale = if largest > 0.0 {
                        largest / FP8_MAX
                    } else {
                        1.0
                    };
                    out.extend_from_slice(&scale.to_le_bytes());
                    out.extend(
                        chunk
                            .iter()
                            .map(|&v| float8::F8E4M3::from_f32(v / scale).to_bits()),
                    );
                }
            }
        }
    }

    /// Reads `count` values (rows of `row`) back as float32; `None` when the bytes do not
    /// hold exactly that many.
    pub(crate) fn decode(self, bytes: &[u8], count: usize, row: usize) -> Option<Vec<f32>> {
        if bytes.len() != self.encoded_len(count, row) {
            return None;
        }
        Some(match self {
            Self::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            Self::Bf16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Self::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Self::Fp8 => {
                let mut values = Vec::with_capacity(count);
                let mut rest = bytes;
                while !rest.is_empty() {
                    let scale = f32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
                    let width = row.max(1).min(count - values.len());
                    values.extend(
                        rest[4..4 + width]
                            .iter()
                            .map(|&b| float8::F8E4M3::from_bits(b).to_f32() * scale),
                    );
                    rest = &rest[4 + width..];
                }
                values
            }
        })
    }

    /// Bytes that `count` values in rows of `row` take.
    pub fn encoded_len(self, count: usize, row: usize) -> usize {
        match self {
            Self::F32 => 4 * count,
            Self::Bf16 | Self::F16 => 2 * count,
            Self::Fp8 => count + 4 * count.div_ceil(row.max(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_dtype_round_trips_within_its_precision() {
        let values: Vec<f32> = (0..60)
            .map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 5 - 2))
            .collect();
        for (wire, bound) in [
            (WireDType::F32, 0.0),
            (WireDType::Bf16, 1.0 / 256.0),
            (WireDType::F16, 1.0 / 2048.0),
            // E4M3 keeps 3 mantissa bits: within 1/16 of each row's largest value.
            (WireDType::Fp8, 1.0 / 16.0),
        ] {
            let mut bytes = Vec::new();
            wire.encode(&values, 12, &mut bytes);
            let back = wire.decode(&bytes, values.len(), 12).unwrap();
            for (row, (got, want)) in back.chunks(12).zip(values.chunks(12)).enumerate() {
                let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (g, w) in got.iter().zip(want) {
                    let allowed = match wire {
                        WireDType::Fp8 => bound * largest,
                        _ => bound * w.abs(),
                    };
                    assert!((g - w).abs() <= allowed, "{wire:?} row {row}: {g} for {w}");
                }
            }
            assert!(wire.decode(&bytes[1..], values.len(), 12).is_none());
        }
    }
}
