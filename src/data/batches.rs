//! Examples to training sequences (truncated or refused at `--max-len`, optionally packed), the
//! seeded order they are visited in, and micro-batches ready for the model.

use std::cell::RefCell;
use std::path::Path;

use super::{dataset_error, Example};
use crate::error::{Error, Result};
use crate::model::loss::{Targets, IGNORE_INDEX};
use crate::model::TokenLayout;

/// How examples become sequences.
#[derive(Debug, Clone, Copy)]
pub struct SequenceOptions {
    /// Longest sequence.
    pub max_len: usize,
    /// Cut longer rows to `max_len` (else they are an error).
    pub truncate: bool,
    /// Put several rows in one sequence, each attending only to itself.
    pub pack: bool,
}

/// One model input row: one example, or several packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels aligned with `input_ids`.
    pub labels: Vec<i64>,
    /// Lengths of the documents packed in it, in order (one for an unpacked row).
    pub documents: Vec<usize>,
}

impl Sequence {
    /// Positions whose next token is scored.
    pub fn scored_tokens(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// The sequences of a dataset.
#[derive(Debug, Clone)]
pub struct SequenceSet {
    sequences: Vec<Sequence>,
    /// The order of the epoch last asked for: drawn once per epoch, not once per step.
    order: RefCell<Option<EpochOrder>>,
}

/// The visiting order of one epoch.
#[derive(Debug, Clone)]
struct EpochOrder {
    epoch: u64,
    seed: Option<u64>,
    order: Vec<usize>,
}

impl SequenceSet {
    /// Builds the sequences of `examples` (read from `path`). Rows left with nothing to score
    /// (for example, a prompt that fills `max_len`) are dropped with a warning.
    pub fn build(examples: Vec<Example>, options: SequenceOptions, path: &Path) -> Result<Self> {
        let mut rows = Vec::with_capacity(examples.len());
        let mut dropped = 0usize;
        for mut example in examples {
            if example.input_ids.len() > options.max_len {
                if !options.truncate {
                    return Err(Error::Dataset {
                        path: path.to_path_buf(),
                        line: example.line,
                        message: format!(
                            "the row has {} tokens, more than --max-len {} (drop --no-truncate \
                             to cut long rows)",
                            example.input_ids.len(),
                            options.max_len
                        ),
                    });
                }
                example.input_ids.truncate(options.max_len);
                example.labels.truncate(options.max_len);
            }
            let sequence = Sequence {
                documents: vec![example.input_ids.len()],
                input_ids: example.input_ids,
                labels: example.labels,
            };
            if sequence.scored_tokens() == 0 {
                dropped += 1;
            } else {
                rows.push(sequence);
            }
        }
        if dropped > 0 {
            tracing::warn!(
                "{}: {dropped} rows have no scored token within --max-len {} and were skipped",
                path.display(),
                options.max_len
            );
        }
        if rows.is_empty() {
            return Err(dataset_error(
                path,
                "no row has a token to learn from (every label is -100 within --max-len)".into(),
            ));
        }
        let sequences = if options.pack {
            pack(rows, options.max_len)
        } else {
            rows
        };
        Ok(Self {
            sequences,
            order: RefCell::new(None),
        })
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    /// Whether there are none (never, for a built set).
    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    /// Every sequence, in file order.
    pub fn all(&self) -> impl Iterator<Item = &Sequence> {
        self.sequences.iter()
    }

    /// The sequences of optimizer step `step` (0-based) with `batch_size` sequences per step.
    /// Each epoch visits every sequence once, in an order drawn from `seed` and the epoch, so
    /// the step number alone says where a resumed run continues. The last batch of an epoch
    /// may be smaller.
    pub fn step(
        &self,
        step: u64,
        batch_size: usize,
        shuffle: Option<u64>,
    ) -> (u64, Vec<&Sequence>) {
        let per_epoch = self.steps_per_epoch(batch_size);
        let epoch = step / per_epoch;
        let index = (step % per_epoch) as usize;
        let mut cached = self.order.borrow_mut();
        if cached
            .as_ref()
            .is_none_or(|c| c.epoch != epoch || c.seed != shuffle)
        {
            let mut order: Vec<usize> = (0..self.len()).collect();
            if let Some(seed) = shuffle {
                shuffle_in_place(&mut order, seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            }
            *cached = Some(EpochOrder {
                epoch,
                seed: shuffle,
                order,
            });
        }
        let order = &cached.as_ref().expect("set above").order;
        let start = index * batch_size;
        let end = (start + batch_size).min(self.len());
        (
            epoch,
            order[start..end]
                .iter()
                .map(|&i| &self.sequences[i])
                .collect(),
        )
    }

    /// Optimizer steps in one pass over the data.
    pub fn steps_per_epoch(&self, batch_size: usize) -> u64 {
        self.len().div_ceil(batch_size.max(1)) as u64
    }
}

/// Greedy packing in order: each row joins the current sequence if it fits, else starts the
/// next. A document's first label becomes `-100`, so no position predicts across a boundary.
fn pack(rows: Vec<Sequence>, max_len: usize) -> Vec<Sequence> {
    let mut packed: Vec<Sequence> = Vec::new();
    for row in rows {
        match packed.last_mut() {
            Some(current) if current.input_ids.len() + row.input_ids.len() <= max_len => {
                let mut labels = row.labels;
                labels[0] = IGNORE_INDEX;
                current.input_ids.extend(row.input_ids);
                current.labels.extend(labels);
                current.documents.extend(row.documents);
            }
            _ => packed.push(row),
        }
    }
    packed
}

/// Fisher–Yates with splitmix64: written out rather than taken from `rand` so that the order
/// for a seed never changes with a dependency upgrade, which resumed runs rely on.
fn shuffle_in_place(items: &mut [usize], seed: u64) {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..items.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Holds out `fraction` of `examples` (at least one, chosen by `seed`) for validation.
pub fn split_validation(
    mut examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let count = ((examples.len() as f64 * fraction).round() as usize).clamp(1, examples.len() - 1);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    shuffle_in_place(&mut order, seed.rotate_left(17) ^ 0x5EED);
    let mut held = vec![false; examples.len()];
    for &i in &order[..count] {
        held[i] = true;
    }
    let mut validation = Vec::with_capacity(count);
    let mut index = 0;
    examples.retain(|e| {
        let keep = !held[index];
        index += 1;
        if !keep {
            validation.push(e.clone());
        }
        keep
    });
    (examples, validation)
}

/// Sequences padded to a common length, with their layout and shifted targets.
#[derive(Debug, Clone)]
pub struct MicroBatch {
    /// Token ids, row-major `[batch, seq]`.
    pub input_ids: Vec<u32>,
    /// Where each token sits: positions restart and attention stays within each document.
    pub layout: TokenLayout,
    /// What each position predicts.
    pub targets: Targets,
}

impl MicroBatch {
    /// Pads `sequences` on the right with `pad_id` to the longest of them.
    pub fn new(sequences: &[&Sequence], pad_id: u32) -> Self {
        let batch = sequences.len();
        let seq = sequences
            .iter()
            .map(|s| s.input_ids.len())
            .max()
            .unwrap_or(0);
        let mut input_ids = Vec::with_capacity(batch * seq);
        let mut labels = Vec::with_capacity(batch * seq);
        let mut positions = Vec::with_capacity(batch * seq);
        let mut documents = Vec::with_capacity(batch * seq);
        for sequence in sequences {
            let pad = seq - sequence.input_ids.len();
            input_ids.extend_from_slice(&sequence.input_ids);
            input_ids.extend(std::iter::repeat_n(pad_id, pad));
            labels.extend_from_slice(&sequence.labels);
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            for (doc, &len) in sequence.documents.iter().enumerate() {
                positions.extend(0..len);
                documents.extend(std::iter::repeat_n(doc as u32, len));
            }
            // Padding is a document of its own; nothing scored attends to it.
            positions.extend(0..pad);
            documents.extend(std::iter::repeat_n(u32::MAX, pad));
        }
        Self {
            targets: Targets::from_labels(&labels, batch, seq),
            input_ids,
            layout: TokenLayout {
                batch,
                seq,
                positions,
                documents,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(len: usize, line: usize) -> Example {
        Example {
            input_ids: (0..len as u32).collect(),
            labels: (0..len as i64).collect(),
            line,
        }
    }

    fn options(max_len: usize, truncate: bool, pack: bool) -> SequenceOptions {
        SequenceOptions {
            max_len,
            truncate,
            pack,
        }
    }

    #[test]
    fn packing_keeps_documents_apart() {
        let rows = vec![example(3, 1), example(4, 2), example(6, 3)];
        let set = SequenceSet::build(rows, options(8, true, true), Path::new("d")).unwrap();
        assert_eq!(set.len(), 2);
        let first = &set.sequences[0];
        assert_eq!(first.documents, vec![3, 4]);
        assert_eq!(
            first.labels[3], IGNORE_INDEX,
            "no prediction across documents"
        );
        let batch = MicroBatch::new(&[first, &set.sequences[1]], 9);
        assert_eq!(batch.layout.seq, 7);
        assert_eq!(&batch.layout.positions[..7], &[0, 1, 2, 0, 1, 2, 3]);
        assert_eq!(&batch.layout.documents[..7], &[0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(&batch.input_ids[7..], &[0, 1, 2, 3, 4, 5, 9]);
        // 5 scored in the packed row (none across the boundary), 5 in the other.
        assert_eq!(batch.targets.count, 10);
    }

    #[test]
    fn long_rows_are_cut_or_refused() {
        let set = SequenceSet::build(
            vec![example(10, 1)],
            options(4, true, false),
            Path::new("d"),
        );
        assert_eq!(set.unwrap().sequences[0].input_ids.len(), 4);
        let err = SequenceSet::build(
            vec![example(10, 7)],
            options(4, false, false),
            Path::new("d"),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("d:7: the row has 10 tokens"),
            "{err}"
        );
    }

    #[test]
    fn epochs_visit_every_sequence_once_in_a_seeded_order() {
        let rows = (0..10).map(|i| example(2 + i, i + 1)).collect();
        let set = SequenceSet::build(rows, options(64, true, false), Path::new("d")).unwrap();
        let epoch = |first_step: u64, seed| -> Vec<usize> {
            (first_step..first_step + 4)
                .flat_map(|s| set.step(s, 3, seed).1)
                .map(|s| s.input_ids.len())
                .collect()
        };
        let mut seen = epoch(0, Some(1));
        assert_ne!(seen, (2..12).collect::<Vec<_>>(), "shuffled");
        assert_eq!(seen, epoch(0, Some(1)), "reproducible");
        assert_ne!(seen, epoch(4, Some(1)), "each epoch has its own order");
        seen.sort();
        assert_eq!(seen, (2..12).collect::<Vec<_>>());
        assert_eq!(epoch(0, None), (2..12).collect::<Vec<_>>());
        assert_eq!(set.step(4, 3, None).0, 1);
    }

    #[test]
    fn validation_split_is_disjoint_and_seeded() {
        let rows: Vec<Example> = (0..20).map(|i| example(2, i + 1)).collect();
        let (train, val) = split_validation(rows.clone(), 0.25, 3);
        assert_eq!((train.len(), val.len()), (15, 5));
        assert!(val.iter().all(|v| !train.iter().any(|t| t.line == v.line)));
        assert_eq!(split_validation(rows, 0.25, 3).1, val);
    }
}
