//! The contiguous slice of model parts that one pipeline stage owns.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Why a stage slice is not valid for a model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SliceError {
    /// The slice owns nothing at all.
    #[error("a stage must own at least one part (embedding, a layer or the head)")]
    Empty,
    /// The layer range runs past the model's last layer.
    #[error("layers {start}..{end} are out of range for a model with {num_layers} layers")]
    LayersOutOfRange {
        /// First layer of the slice.
        start: usize,
        /// One past the last layer of the slice.
        end: usize,
        /// Layers in the model.
        num_layers: usize,
    },
    /// The slice is not contiguous in the part line (for example embedding + head with no
    /// layers in between, or a head without the last layer).
    #[error("the parts of a stage must be contiguous: {0}")]
    NotContiguous(String),
}

/// The parts of the model a stage owns: optionally the embedding, a contiguous range of decoder
/// layers, and optionally the head (final norm + output projection + loss).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageSlice {
    /// Whether the stage owns the token embedding (it then consumes token ids).
    pub embedding: bool,
    /// The decoder layers the stage owns, in model numbering.
    pub layers: Range<usize>,
    /// Whether the stage owns the final norm, the output projection and the loss.
    pub head: bool,
}

/// In words: `embedding + layers 0-9`, `layer 10`, `layers 20-31 + head`.
impl std::fmt::Display for StageSlice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.embedding {
            parts.push("embedding".to_string());
        }
        match self.layers.len() {
            0 => {}
            1 => parts.push(format!("layer {}", self.layers.start)),
            _ => parts.push(format!(
                "layers {}-{}",
                self.layers.start,
                self.layers.end - 1
            )),
        }
        if self.head {
            parts.push("head".to_string());
        }
        write!(f, "{}", parts.join(" + "))
    }
}

impl StageSlice {
    /// The slice that owns the whole model: the single-device case.
    pub fn whole(num_layers: usize) -> Self {
        Self {
            embedding: true,
            layers: 0..num_layers,
            head: true,
        }
    }

    /// Checks that the slice is non-empty, in range and contiguous for a model of `num_layers`.
    pub fn validate(&self, num_layers: usize) -> Result<(), SliceError> {
        let Range { start, end } = self.layers.clone();
        if start > end || end > num_layers {
            return Err(SliceError::LayersOutOfRange {
                start,
                end,
                num_layers,
            });
        }
        let has_layers = start < end;
        if !self.embedding && !has_layers && !self.head {
            return Err(SliceError::Empty);
        }
        if self.embedding && start != 0 && has_layers {
            return Err(SliceError::NotContiguous(format!(
                "the embedding is followed by layer {start}, not layer 0"
            )));
        }
        if self.head && has_layers && end != num_layers {
            return Err(SliceError::NotContiguous(format!(
                "the head follows layer {}, not the last layer {}",
                end - 1,
                num_layers - 1
            )));
        }
        if self.embedding && self.head && !has_layers && num_layers > 0 {
            return Err(SliceError::NotContiguous(
                "a stage with the embedding and the head must own every layer".into(),
            ));
        }
        Ok(())
    }

    /// Whether this stage is the first of the pipeline (it reads token ids).
    pub fn is_first(&self) -> bool {
        self.embedding
    }

    /// Whether this stage is the last of the pipeline (it computes logits and the loss).
    pub fn is_last(&self) -> bool {
        self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_model_is_valid() {
        assert_eq!(StageSlice::whole(4).validate(4), Ok(()));
    }

    #[test]
    fn slices_read_as_their_parts() {
        assert_eq!(
            StageSlice::whole(4).to_string(),
            "embedding + layers 0-3 + head"
        );
        let one = StageSlice {
            embedding: false,
            layers: 2..3,
            head: false,
        };
        assert_eq!(one.to_string(), "layer 2");
        let head_only = StageSlice {
            embedding: false,
            layers: 4..4,
            head: true,
        };
        assert_eq!(head_only.to_string(), "head");
    }

    #[test]
    fn middle_and_edge_slices_are_valid() {
        let first = StageSlice {
            embedding: true,
            layers: 0..2,
            head: false,
        };
        let middle = StageSlice {
            embedding: false,
            layers: 2..3,
            head: false,
        };
        let last = StageSlice {
            embedding: false,
            layers: 3..4,
            head: true,
        };
        let head_only = StageSlice {
            embedding: false,
            layers: 4..4,
            head: true,
        };
        for slice in [first, middle, last, head_only] {
            assert_eq!(slice.validate(4), Ok(()), "{slice:?}");
        }
    }

    #[test]
    fn rejects_gaps_and_out_of_range() {
        let gap_after_embedding = StageSlice {
            embedding: true,
            layers: 1..2,
            head: false,
        };
        assert!(matches!(
            gap_after_embedding.validate(4),
            Err(SliceError::NotContiguous(_))
        ));
        let gap_before_head = StageSlice {
            embedding: false,
            layers: 1..2,
            head: true,
        };
        assert!(matches!(
            gap_before_head.validate(4),
            Err(SliceError::NotContiguous(_))
        ));
        let too_far = StageSlice {
            embedding: false,
            layers: 3..5,
            head: false,
        };
        assert_eq!(
            too_far.validate(4),
            Err(SliceError::LayersOutOfRange {
                start: 3,
                end: 5,
                num_layers: 4
            })
        );
        let empty = StageSlice {
            embedding: false,
            layers: 2..2,
            head: false,
        };
        assert_eq!(empty.validate(4), Err(SliceError::Empty));
    }
}
