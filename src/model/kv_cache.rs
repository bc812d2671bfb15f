//! Keys and values of the tokens already seen, so that decoding a token runs the model on that
//! token alone. One cache holds a batch of sequences of different lengths (continuous batching:
//! sequences join after their prompt and leave when done), each layer's keys and values padded to
//! one capacity. Mistral's sliding window makes it a rolling cache: position `p` is stored at
//! `p % window`, overwriting the key the window no longer sees.

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, IndexingUpdateOp, Int, Tensor, TensorData};

use super::layers::in_dtype;

/// Capacity a new cache starts from; it doubles as sequences grow.
const MIN_CAPACITY: usize = 64;

/// One layer's cached keys and values, `[rows, kv_heads, capacity, head_dim]`, rotated keys.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
}

/// The cache of a batch of sequences, one row each.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<LayerCache<B>>,
    /// Tokens each row has seen: the position of its next token.
    lengths: Vec<usize>,
    /// Key slots per row.
    capacity: usize,
    /// The sliding window, when the model has one (the capacity never exceeds it).
    window: Option<usize>,
}

/// Where one decoding step writes each row's new key, and which slots it may read.
#[derive(Debug, Clone)]
pub struct DecodeStep<B: Backend> {
    /// `[rows * kv_heads, 3]`: the `(row, head, slot)` each new key and value goes to.
    write: Tensor<B, 2, Int>,
    /// `[rows, 1, 1, capacity]`: true at the slots a row's query may not see.
    blocked: Tensor<B, 4, Bool>,
}

impl<B: Backend> DecodeStep<B> {
    /// `[rows, 1, 1, capacity]`: true where a row's query may not see the slot.
    pub fn blocked(&self) -> &Tensor<B, 4, Bool> {
        &self.blocked
    }
}

impl<B: Backend> KvCache<B> {
    /// A one-row cache from a prompt's keys and values (`[1, kv_heads, seq, head_dim]` per
    /// layer, positions `0..seq`). With a sliding window only the last `window` are kept.
    pub fn from_prompt(layers: Vec<(Tensor<B, 4>, Tensor<B, 4>)>, window: Option<usize>) -> Self {
        let seq = layers.first().map_or(0, |(k, _)| k.dims()[2]);
        let capacity = grown_capacity(seq + 1, window);
        let layers = layers
            .into_iter()
            .map(|(keys, values)| LayerCache {
                keys: place_prompt(keys, capacity, window),
                values: place_prompt(values, capacity, window),
            })
            .collect();
        Self {
            layers,
            lengths: vec![seq],
            capacity,
            window,
        }
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.lengths.len()
    }

    /// Tokens each row has seen (the position its next token takes).
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Layer `index`'s keys and values.
    pub fn layer(&self, index: usize) -> &LayerCache<B> {
        &self.layers[index]
    }

    /// Adds the rows of `other` after this cache's rows.
    pub fn join(&mut self, other: Self) {
        let capacity = self.capacity.max(other.capacity);
        self.set_capacity(capacity);
        let other = {
            let mut other = other;
            other.set_capacity(capacity);
            other
        };
        for (mine, theirs) in self.layers.iter_mut().zip(other.layers) {
            mine.keys = Tensor::cat(vec![mine.keys.clone(), theirs.keys], 0);
            mine.values = Tensor::cat(vec![mine.values.clone(), theirs.values], 0);
        }
        self.lengths.extend(other.lengths);
    }

    /// Keeps only the rows `keep` (in that order); `None` when none is kept.
    pub fn retain(mut self, keep: &[usize]) -> Option<Self> {
        if keep.is_empty() {
            return None;
        }
        if keep.iter().copied().eq(0..self.rows()) {
            return Some(self);
        }
        let device = self.layers[0].keys.device();
        let index: Vec<i64> = keep.iter().map(|&r| r as i64).collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [keep.len()]), &device);
        for layer in &mut self.layers {
            layer.keys = layer.keys.clone().select(0, index.clone());
            layer.values = layer.values.clone().select(0, index.clone());
        }
        self.lengths = keep.iter().map(|&r| self.lengths[r]).collect();
        Some(self)
    }

    /// Prepares a step that adds one token to every row: grows the cache if a row has no free
    /// slot, and says where each new key goes and which slots each row sees.
    pub fn begin_step(&mut self) -> DecodeStep<B> {
        let longest = self.lengths.iter().max().map_or(0, |l| l + 1);
        let wanted = grown_capacity(longest, self.window);
        if wanted > self.capacity {
            self.set_capacity(wanted);
        }
        let (rows, capacity) = (self.rows(), self.capacity);
        let heads = self.layers[0].keys.dims()[1];
        let mut write = Vec::with_capacity(rows * heads * 3);
        let mut blocked = vec![true; rows * capacity];
        for (row, &position) in self.lengths.iter().enumerate() {
            let slot = position % capacity;
            for head in 0..heads {
                write.extend([row as i64, head as i64, slot as i64]);
            }
            // A rolling cache is full once it has wrapped; otherwise slots past the new token
            // are empty.
            let seen = (position + 1).min(capacity);
            blocked[row * capacity..row * capacity + seen].fill(false);
        }
        let device = self.layers[0].keys.device();
        DecodeStep {
            write: Tensor::from_data(TensorData::new(write, [rows * heads, 3]), &device),
            blocked: Tensor::from_data(TensorData::new(blocked, [rows, 1, 1, capacity]), &device),
        }
    }

    /// Writes layer `index`'s new keys and values (`[rows, kv_heads, 1, head_dim]`) where
    /// `step` says, and returns the layer's cache to attend over.
    pub fn append(
        &mut self,
        index: usize,
        step: &DecodeStep<B>,
        keys: Tensor<B, 4>,
        values: Tensor<B, 4>,
    ) -> &LayerCache<B> {
        let layer = &mut self.layers[index];
        let [rows, heads, _, dim] = keys.dims();
        // Moved out rather than cloned: a tensor held once is written in place, touching only
        // the new slots.
        let write = |cache: &mut Tensor<B, 4>, new: Tensor<B, 4>| {
            let held = std::mem::replace(cache, Tensor::empty([0, 0, 0, 0], &new.device()));
            *cache = held.scatter_nd(
                step.write.clone(),
                new.reshape([rows * heads, dim]),
                IndexingUpdateOp::Assign,
            );
        };
        write(&mut layer.keys, keys);
        write(&mut layer.values, values);
        layer
    }

    /// Ends a step begun with [`begin_step`](Self::begin_step): every row saw one more token.
    pub fn end_step(&mut self) {
        for length in &mut self.lengths {
            *length += 1;
        }
    }

    /// Pads (or, never below what rows hold, keeps) every layer to `capacity` slots.
    fn set_capacity(&mut self, capacity: usize) {
        if capacity == self.capacity {
            return;
        }
        for layer in &mut self.layers {
            layer.keys = pad_slots(layer.keys.clone(), capacity);
            layer.values = pad_slots(layer.values.clone(), capacity);
        }
        self.capacity = capacity;
    }
}

impl<B: Backend> LayerCache<B> {
    /// `[rows, kv_heads, capacity, head_dim]` rotated keys.
    pub fn keys(&self) -> Tensor<B, 4> {
        self.keys.clone()
    }

    /// `[rows, kv_heads, capacity, head_dim]` values.
    pub fn values(&self) -> Tensor<B, 4> {
        self.values.clone()
    }
}

/// Slots for `tokens` tokens: doubling from [`MIN_CAPACITY`] (so growing copies the cache
/// rarely), never past the sliding window.
fn grown_capacity(tokens: usize, window: Option<usize>) -> usize {
    let capacity = tokens.max(MIN_CAPACITY).next_power_of_two();
    window.map_or(capacity, |w| capacity.min(w))
}

/// `[1, heads, seq, dim]` of positions `0..seq` into `capacity` slots: zero-padded, or with a
/// window, the last `capacity` positions each at `position % capacity`.
fn place_prompt<B: Backend>(
    t: Tensor<B, 4>,
    capacity: usize,
    window: Option<usize>,
) -> Tensor<B, 4> {
    let seq = t.dims()[2];
    if seq <= capacity {
        return pad_slots(t, capacity);
    }
    debug_assert_eq!(
        Some(capacity),
        window,
        "only a rolling cache drops positions"
    );
    let first = seq - capacity;
    // Position `first + i` goes to slot `(first + i) % capacity`: a rotation of the kept ones.
    let split = capacity - first % capacity;
    let kept = t.narrow(2, first, capacity);
    if split == capacity {
        return kept;
    }
    Tensor::cat(
        vec![
            kept.clone().narrow(2, split, capacity - split),
            kept.narrow(2, 0, split),
        ],
        2,
    )
}

/// `t` `[rows, heads, slots, dim]` zero-padded to `capacity` slots.
fn pad_slots<B: Backend>(t: Tensor<B, 4>, capacity: usize) -> Tensor<B, 4> {
    let [rows, heads, slots, dim] = t.dims();
    if slots >= capacity {
        return t;
    }
    let padding = in_dtype(
        Tensor::<B, 4>::zeros([rows, heads, capacity - slots, dim], &t.device()),
        t.dtype(),
    );
    Tensor::cat(vec![t, padding], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    /// A one-layer, one-head, one-dim cache whose keys are their positions.
    fn cache_of(seq: usize, window: Option<usize>) -> KvCache<B> {
        let positions: Vec<f32> = (0..seq).map(|p| p as f32).collect();
        let t = Tensor::<B, 4>::from_data(
            TensorData::new(positions, [1, 1, seq, 1]),
            &Default::default(),
        );
        KvCache::from_prompt(vec![(t.clone(), t)], window)
    }

    fn slots(cache: &KvCache<B>) -> Vec<f32> {
        cache.layer(0).keys().into_data().to_vec().unwrap()
    }

    #[test]
    fn a_rolling_cache_keeps_the_window_at_position_modulo_window() {
        let cache = cache_of(11, Some(4));
        // Positions 7..11 at slots 3, 0, 1, 2.
        assert_eq!(slots(&cache), vec![8.0, 9.0, 10.0, 7.0]);
        let mut cache = cache;
        let step = cache.begin_step();
        let new = Tensor::<B, 4>::from_data(
            TensorData::new(vec![11.0f32], [1, 1, 1, 1]),
            &Default::default(),
        );
        cache.append(0, &step, new.clone(), new);
        cache.end_step();
        assert_eq!(slots(&cache), vec![8.0, 9.0, 10.0, 11.0]);
        let blocked: Vec<bool> = step.blocked().clone().into_data().to_vec().unwrap();
        assert_eq!(blocked, vec![false; 4]);
    }

    #[test]
    fn rows_of_different_lengths_join_grow_and_leave() {
        let mut cache = cache_of(3, None);
        cache.join(cache_of(70, None));
        assert_eq!(cache.lengths(), &[3, 70]);
        assert_eq!(cache.capacity, 128);
        let step = cache.begin_step();
        let blocked: Vec<bool> = step.blocked().clone().into_data().to_vec().unwrap();
        assert_eq!(blocked.iter().filter(|b| !**b).count(), 4 + 71);
        assert!(
            !blocked[3] && blocked[4],
            "row 0 sees its 3 tokens and the new one"
        );
        let new = Tensor::<B, 4>::from_data(
            TensorData::new(vec![-1.0f32, -2.0], [2, 1, 1, 1]),
            &Default::default(),
        );
        cache.append(0, &step, new.clone(), new);
        cache.end_step();
        let values = slots(&cache);
        assert_eq!((values[3], values[128 + 70]), (-1.0, -2.0));
        let cache = cache.retain(&[1]).unwrap();
        assert_eq!(cache.lengths(), &[71]);
        assert_eq!(slots(&cache)[69..71], [69.0, -2.0]);
        assert!(cache.retain(&[]).is_none());
    }
}
