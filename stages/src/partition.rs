//! How a model's parts are divided among pipeline stages: explicit layer boundaries, or a split
//! that balances a per-part cost so that no stage is much heavier than the others.

use serde::{Deserialize, Serialize};

use crate::slice::{SliceError, StageSlice};

/// Why a partition cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartitionError {
    /// Zero stages were asked for.
    #[error("a partition needs at least one stage")]
    NoStages,
    /// More stages than layers: some stage would own no layer.
    #[error("{stages} stages need at least {stages} layers, but the model has {num_layers}")]
    TooManyStages {
        /// Stages asked for.
        stages: usize,
        /// Layers in the model.
        num_layers: usize,
    },
    /// Explicit boundaries that are not strictly increasing or fall outside `0..=num_layers`.
    #[error("split points must increase strictly within 0..={num_layers}; got {split:?}")]
    BadSplit {
        /// The split points given.
        split: Vec<usize>,
        /// Layers in the model.
        num_layers: usize,
    },
    /// A stage's slice is invalid on its own.
    #[error("stage {stage}: {source}")]
    Slice {
        /// Index of the stage.
        stage: usize,
        /// What is wrong with it.
        source: SliceError,
    },
    /// The slices do not cover the model exactly once, in order.
    #[error("stage {stage}: {message}")]
    NotATiling {
        /// Index of the first stage that breaks the tiling.
        stage: usize,
        /// What is wrong.
        message: String,
    },
}

/// The cost of each part of the model, in any unit (parameters, bytes, seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct PartCosts {
    /// The token embedding (always in the first stage).
    pub embedding: f64,
    /// Each decoder layer, in order.
    pub layers: Vec<f64>,
    /// The final norm, output projection and loss (always in the last stage).
    pub head: f64,
}

/// The stages of a pipeline, first to last; together they own every part exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Partition {
    stages: Vec<StageSlice>,
}

impl Partition {
    /// Checks that `stages` tile a model of `num_layers` layers: the first owns the embedding,
    /// the last the head, and the layer ranges follow each other without gaps or overlap.
    pub fn new(stages: Vec<StageSlice>, num_layers: usize) -> Result<Self, PartitionError> {
        if stages.is_empty() {
            return Err(PartitionError::NoStages);
        }
        let last = stages.len() - 1;
        let mut next_layer = 0;
        for (stage, slice) in stages.iter().enumerate() {
            slice
                .validate(num_layers)
                .map_err(|source| PartitionError::Slice { stage, source })?;
            let broken = |message: String| Err(PartitionError::NotATiling { stage, message });
            if slice.embedding != (stage == 0) {
                return broken("the embedding belongs to the first stage only".into());
            }
            if slice.head != (stage == last) {
                return broken("the head belongs to the last stage only".into());
            }
            if slice.layers.start != next_layer {
                return broken(format!(
                    "starts at layer {}, but the previous stage ends before layer {next_layer}",
                    slice.layers.start
                ));
            }
            next_layer = slice.layers.end;
        }
        if next_layer != num_layers {
            return Err(PartitionError::NotATiling {
                stage: last,
                message: format!("ends before layer {next_layer}, not after the last layer"),
            });
        }
        Ok(Self { stages })
    }

    /// Stages that start at the given layers: `split = [10, 20]` on a 32-layer model gives
    /// layers `0..10`, `10..20` and `20..32`. A split at 0 (or at `num_layers`) makes a stage that
    /// owns only the embedding (or only the head).
    pub fn from_split(split: &[usize], num_layers: usize) -> Result<Self, PartitionError> {
        let bad = || PartitionError::BadSplit {
            split: split.to_vec(),
            num_layers,
        };
        let increasing = split.windows(2).all(|w| w[0] < w[1]);
        if !increasing || split.last().is_some_and(|&s| s > num_layers) {
            return Err(bad());
        }
        let bounds: Vec<usize> = std::iter::once(0)
            .chain(split.iter().copied())
            .chain(std::iter::once(num_layers))
            .collect();
        let last = bounds.len() - 2;
        let stages = bounds
            .windows(2)
            .enumerate()
            .map(|(stage, w)| StageSlice {
                embedding: stage == 0,
                layers: w[0]..w[1],
                head: stage == last,
            })
            .collect();
        // A split of [0] on a one-stage-wide model would leave an empty middle; `new` rejects it.
        Self::new(stages, num_layers).map_err(|_| bad())
    }

    /// The contiguous split into `num_stages` stages, each owning at least one layer, that
    /// minimises the cost of the most expensive stage (ties go to the split whose stages start
    /// earliest).
    pub fn balanced(costs: &PartCosts, num_stages: usize) -> Result<Self, PartitionError> {
        // prefix[i] = cost of layers 0..i.
        let prefix: Vec<f64> = std::iter::once(0.0)
            .chain(costs.layers.iter().scan(0.0, |sum, c| {
                *sum += c;
                Some(*sum)
            }))
            .collect();
        Self::min_max(costs.layers.len(), num_stages, |_, slice| {
            let mut cost = prefix[slice.layers.end] - prefix[slice.layers.start];
            if slice.embedding {
                cost += costs.embedding;
            }
            if slice.head {
                cost += costs.head;
            }
            Some(cost)
        })
        .map(|found| found.expect("every split is allowed"))
    }

    /// The contiguous split into `num_stages` stages, each owning at least one layer, that
    /// minimises the largest `cost(stage, slice)`, where a cost of `None` rules that slice out
    /// for that stage (it does not fit there). Costs may differ by stage, as when stages run on
    /// devices of different speeds. `Ok(None)` when no split is allowed. Exact, by dynamic
    /// programming over layer boundaries; ties go to the split whose stages start earliest.
    pub fn min_max(
        num_layers: usize,
        num_stages: usize,
        cost: impl Fn(usize, &StageSlice) -> Option<f64>,
    ) -> Result<Option<Self>, PartitionError> {
        if num_stages == 0 {
            return Err(PartitionError::NoStages);
        }
        if num_stages > num_layers {
            return Err(PartitionError::TooManyStages {
                stages: num_stages,
                num_layers,
            });
        }
        let last = num_stages - 1;
        let stage_cost = |stage: usize, begin: usize, end: usize| {
            let slice = StageSlice {
                embedding: stage == 0,
                layers: begin..end,
                head: stage == last,
            };
            cost(stage, &slice).unwrap_or(f64::INFINITY)
        };
        // best[s][e]: the smallest possible maximum stage cost when stages 0..=s own layers 0..e;
        // start[s][e]: where stage s then begins.
        let mut best = vec![vec![f64::INFINITY; num_layers + 1]; num_stages];
        let mut start = vec![vec![0usize; num_layers + 1]; num_stages];
        for (end, best) in best[0].iter_mut().enumerate().skip(1) {
            *best = stage_cost(0, 0, end);
        }
        for s in 1..num_stages {
            for end in (s + 1)..=num_layers {
                for begin in s..end {
                    let cost = best[s - 1][begin].max(stage_cost(s, begin, end));
                    if cost < best[s][end] {
                        best[s][end] = cost;
                        start[s][end] = begin;
                    }
                }
            }
        }
        if best[last][num_layers].is_infinite() {
            return Ok(None);
        }
        let mut split = vec![0; last];
        let mut end = num_layers;
        for s in (1..num_stages).rev() {
            end = start[s][end];
            split[s - 1] = end;
        }
        Self::from_split(&split, num_layers).map(Some)
    }

    /// The stages, first to last.
    pub fn stages(&self) -> &[StageSlice] {
        &self.stages
    }

    /// Number of stages.
    pub fn len(&self) -> usize {
        self.stages.len()
    }

    /// Always false: a partition has at least one stage.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// The stage that owns decoder layer `layer`.
    pub fn stage_of_layer(&self, layer: usize) -> Option<usize> {
        self.stages.iter().position(|s| s.layers.contains(&layer))
    }

    /// The layers at which stages after the first begin (the `--split` that rebuilds this).
    pub fn split_points(&self) -> Vec<usize> {
        self.stages[1..].iter().map(|s| s.layers.start).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_ranges(p: &Partition) -> Vec<std::ops::Range<usize>> {
        p.stages().iter().map(|s| s.layers.clone()).collect()
    }

    #[test]
    fn split_points_make_contiguous_stages() {
        let p = Partition::from_split(&[10, 20], 32).unwrap();
        assert_eq!(layer_ranges(&p), vec![0..10, 10..20, 20..32]);
        assert!(p.stages()[0].embedding && !p.stages()[0].head);
        assert!(p.stages()[2].head && !p.stages()[2].embedding);
        assert_eq!(p.split_points(), vec![10, 20]);
        assert_eq!(p.stage_of_layer(15), Some(1));
        // Embedding-only and head-only stages are allowed when asked for explicitly.
        let edges = Partition::from_split(&[0, 4], 4).unwrap();
        assert_eq!(layer_ranges(&edges), vec![0..0, 0..4, 4..4]);
    }

    #[test]
    fn rejects_bad_splits() {
        assert!(Partition::from_split(&[20, 10], 32).is_err());
        assert!(Partition::from_split(&[10, 10], 32).is_err());
        assert!(Partition::from_split(&[33], 32).is_err());
    }

    #[test]
    fn equal_layers_split_evenly() {
        let costs = PartCosts {
            embedding: 0.0,
            layers: vec![1.0; 12],
            head: 0.0,
        };
        let p = Partition::balanced(&costs, 3).unwrap();
        assert_eq!(layer_ranges(&p), vec![0..4, 4..8, 8..12]);
    }

    #[test]
    fn a_heavy_head_gets_fewer_layers() {
        // The head costs as much as three layers: the last stage should take fewer layers.
        let costs = PartCosts {
            embedding: 0.5,
            layers: vec![1.0; 16],
            head: 3.0,
        };
        let p = Partition::balanced(&costs, 4).unwrap();
        let ranges = layer_ranges(&p);
        assert!(ranges[3].len() < ranges[1].len(), "{ranges:?}");
        // No other split has a lighter heaviest stage.
        let max_cost = |r: &[std::ops::Range<usize>]| {
            r.iter()
                .enumerate()
                .map(|(s, r)| {
                    r.len() as f64 + if s == 0 { 0.5 } else { 0.0 } + if s == 3 { 3.0 } else { 0.0 }
                })
                .fold(0.0, f64::max)
        };
        let found = max_cost(&ranges);
        for a in 1..14 {
            for b in a + 1..15 {
                for c in b + 1..16 {
                    let other = [0..a, a..b, b..c, c..16];
                    assert!(found <= max_cost(&other), "{other:?} beats {ranges:?}");
                }
            }
        }
    }

    #[test]
    fn slower_stages_get_fewer_layers_and_misfits_are_avoided() {
        // Stage 1 runs twice as fast: it should take two thirds of the layers.
        let speed = [2.0, 1.0];
        let p = Partition::min_max(12, 2, |stage, slice| {
            Some(slice.layers.len() as f64 * speed[stage])
        })
        .unwrap()
        .unwrap();
        assert_eq!(layer_ranges(&p), vec![0..4, 4..12]);
        // Stage 1 cannot hold more than 6 layers: the split moves to the best that fits.
        let p = Partition::min_max(12, 2, |stage, slice| {
            (stage == 0 || slice.layers.len() <= 6)
                .then(|| slice.layers.len() as f64 * speed[stage])
        })
        .unwrap()
        .unwrap();
        assert_eq!(layer_ranges(&p), vec![0..6, 6..12]);
        // Neither stage can hold more than 5 of 12 layers: nothing fits.
        let p = Partition::min_max(12, 2, |_, slice| (slice.layers.len() <= 5).then_some(1.0));
        assert_eq!(p, Ok(None));
    }

    #[test]
    fn too_many_stages_is_an_error() {
        let costs = PartCosts {
            embedding: 1.0,
            layers: vec![1.0; 2],
            head: 1.0,
        };
        assert_eq!(
            Partition::balanced(&costs, 3),
            Err(PartitionError::TooManyStages {
                stages: 3,
                num_layers: 2
            })
        );
        assert_eq!(
            Partition::balanced(&costs, 0),
            Err(PartitionError::NoStages)
        );
    }

    #[test]
    fn new_rejects_gaps_and_misplaced_parts() {
        let stage = |embedding, layers, head| StageSlice {
            embedding,
            layers,
            head,
        };
        assert!(
            Partition::new(vec![stage(true, 0..2, false), stage(false, 3..4, true)], 4).is_err()
        );
        assert!(
            Partition::new(vec![stage(true, 0..2, true), stage(false, 2..4, true)], 4).is_err()
        );
        assert!(
            Partition::new(vec![stage(true, 0..2, false), stage(false, 2..3, true)], 4).is_err()
        );
        assert!(
            Partition::new(vec![stage(true, 0..2, false), stage(false, 2..4, true)], 4).is_ok()
        );
    }
}
