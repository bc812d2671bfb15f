//! Collective operations over a group of ranks: all-reduce, reduce-scatter, all-gather,
//! broadcast and barrier, behind one trait ([`Collectives`]), so data parallelism does not care
//! what moves the bytes.
//!
//! [`RingCollectives`] runs the ring algorithms over any [`Transport`] (QUIC between processes,
//! channels between threads): each rank sends to its successor and receives from its
//! predecessor, so every link carries `2 (n-1)/n` of the buffer in an all-reduce, whatever the
//! group size. Buffers are cut into slabs of at most [`SLAB`] values, each its own ring pass, so
//! a message never exceeds a slab's share and a large bucket is never copied whole.
//! [`GroupView`] lets a subset of a transport's ranks act as a group of their own (the
//! replicas of one pipeline stage), with its own rank numbers.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{Kind, Tag, TensorMessage, Transport, TransportError};

/// The most values one ring pass moves: larger buffers go in several passes.
pub const SLAB: usize = 1 << 22;

/// Collective operations within one group. Every member must call the same operations in the
/// same order (as with NCCL or `torch.distributed`); sums are float32.
pub trait Collectives: Send + Sync {
    /// This rank's position in the group.
    fn rank(&self) -> usize;
    /// How many ranks the group has.
    fn size(&self) -> usize;
    /// Replaces `values` by their element-wise sum over the group.
    fn all_reduce(&self, values: &mut [f32]) -> Result<(), TransportError>;
    /// The element-wise sum over the group of `values`, but only this rank's shard of it
    /// ([`shard_range`] of the length, by rank).
    fn reduce_scatter(&self, values: &[f32]) -> Result<Vec<f32>, TransportError>;
    /// Every rank's shard put together: `shard` is this rank's [`shard_range`] of a buffer of
    /// `len` values.
    fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>, TransportError>;
    /// Replaces `values` by `root`'s on every rank.
    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), TransportError>;
    /// Returns once every rank of the group has called it.
    fn barrier(&self) -> Result<(), TransportError> {
        self.all_reduce(&mut [0.0])
    }
}

/// The values of a `len`-long buffer that rank `index` of `parts` holds: contiguous, the first
/// `len % parts` ranks one value more.
pub fn shard_range(len: usize, parts: usize, index: usize) -> Range<usize> {
    let (base, extra) = (len / parts, len % parts);
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

/// Some of a transport's ranks as a group of their own: rank `i` of the view is
/// `members[i]` of the transport. Messages keep their tags, so a view's members must not
/// exchange the same tags through another view at the same time; errors name transport ranks.
pub struct GroupView {
    inner: Arc<dyn Transport>,
    members: Vec<usize>,
    rank: usize,
}

impl GroupView {
    /// The view of `members` (transport ranks, in group order); the transport's own rank must
    /// be one of them.
    pub fn new(inner: Arc<dyn Transport>, members: Vec<usize>) -> Self {
        let rank = members
            .iter()
            .position(|&m| m == inner.rank())
            .expect("a group view holds its own rank");
        Self {
            inner,
            members,
            rank,
        }
    }

    fn member_checked(&self, rank: usize) -> Result<usize, TransportError> {
        self.members
            .get(rank)
            .copied()
            .ok_or(TransportError::UnknownRank {
                rank,
                world_size: self.members.len(),
            })
    }
}

impl Transport for GroupView {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn send(&self, to: usize, message: TensorMessage) -> Result<(), TransportError> {
        self.inner.send(self.member_checked(to)?, message)
    }

    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
    ) -> Result<TensorMessage, TransportError> {
        self.inner.recv(self.member_checked(from)?, tag, timeout)
    }

    fn links(&self) -> Vec<crate::LinkTraffic> {
        let all = self.inner.links();
        self.members
            .iter()
            .map(|&m| all.get(m).copied().unwrap_or_default())
            .collect()
    }
}

/// Ring collectives over a transport (or a [`GroupView`] of one).
pub struct RingCollectives {
    transport: Arc<dyn Transport>,
    /// Numbers the group's operations; the same on every member, since all call the same
    /// operations in the same order. A message's tag is (operation, ring step, channel and
    /// slab).
    operations: AtomicU64,
    /// Tells apart instances over the same group used from different threads (each numbers
    /// its own operations).
    channel: u32,
    timeout: Duration,
}

impl RingCollectives {
    /// Collectives among all of `transport`'s ranks; a peer silent for `timeout` fails the
    /// operation.
    pub fn new(transport: Arc<dyn Transport>, timeout: Duration) -> Self {
        Self {
            transport,
            operations: AtomicU64::new(0),
            channel: 0,
            timeout,
        }
    }

    /// The same group on another channel (below 256): its operations never meet this one's,
    /// so another thread may run them at the same time.
    pub fn on_channel(mut self, channel: u8) -> Self {
        self.channel = u32::from(channel);
        self
    }

    fn next(&self) -> usize {
        (self.rank() + 1) % self.size()
    }

    fn previous(&self) -> usize {
        (self.rank() + self.size() - 1) % self.size()
    }

    fn tag(&self, operation: u64, step: usize, slab: usize) -> Tag {
        Tag {
            step: operation,
            microbatch: step as u32,
            stage: self.channel << 24 | slab as u32,
            kind: Kind::Collective,
        }
    }

    /// Sends `values` to the next rank and returns what the previous rank sent with the same
    /// tag.
    fn shift(&self, tag: Tag, values: &[f32]) -> Result<Vec<f32>, TransportError> {
        let message = TensorMessage {
            tag,
            shape: vec![values.len()],
            values: values.to_vec(),
        };
        self.transport.send(self.next(), message)?;
        Ok(self
            .transport
            .recv(self.previous(), tag, self.timeout)?
            .values)
    }

    /// The slabs of a `len`-long buffer (at least one, so empty buffers still meet): index and
    /// range.
    fn slabs(len: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
        (0..len.div_ceil(SLAB).max(1)).map(move |i| (i, i * SLAB..((i + 1) * SLAB).min(len)))
    }

    fn operation(&self) -> u64 {
        self.operations.fetch_add(1, Ordering::Relaxed)
    }
}

impl Collectives for RingCollectives {
    fn rank(&self) -> usize {
        self.transport.rank()
    }

    fn size(&self) -> usize {
        self.transport.world_size()
    }

    fn all_reduce(&self, values: &mut [f32]) -> Result<(), TransportError> {
        let operation = self.operation();
        if self.size() == 1 {
            return Ok(());
        }
        let n = self.size();
        for (index, range) in Self::slabs(values.len()) {
            let slab = &mut values[range];
            let pieces: Vec<_> = (0..n).map(|r| shard_range(slab.len(), n, r)).collect();
            self.ring_reduce(operation, index, slab, &pieces)?;
            self.ring_gather(operation, n - 1, index, slab, &pieces)?;
        }
        Ok(())
    }

    fn reduce_scatter(&self, values: &[f32]) -> Result<Vec<f32>, TransportError> {
        let operation = self.operation();
        let (n, rank) = (self.size(), self.rank());
        let mut sums = values.to_vec();
        if n > 1 {
            // Slab by slab in the same cut as `shard_range` of the whole: each slab's shards are
            // contiguous pieces of each rank's shard of the whole.
            for (index, range) in Self::slabs(values.len() / n + 1) {
                let pieces = self.pieces(values.len(), &range);
                let mut slab: Vec<f32> = pieces
                    .iter()
                    .flat_map(|piece| values[piece.clone()].iter().copied())
                    .collect();
                self.ring_reduce(operation, index, &mut slab, &pieces)?;
                sums[pieces[rank].clone()].copy_from_slice(&slab[local(&pieces, rank)]);
            }
        }
        Ok(sums[shard_range(values.len(), n, rank)].to_vec())
    }

    fn all_gather(&self, shard: &[f32], len: usize) -> Result<Vec<f32>, TransportError> {
        let operation = self.operation();
        let (n, rank) = (self.size(), self.rank());
        let own = shard_range(len, n, rank);
        assert_eq!(shard.len(), own.len(), "a shard of its buffer");
        let mut whole = vec![0.0; len];
        whole[own].copy_from_slice(shard);
        if n > 1 {
            for (index, range) in Self::slabs(len / n + 1) {
                let pieces = self.pieces(len, &range);
                let mut slab: Vec<f32> = pieces
                    .iter()
                    .flat_map(|piece| whole[piece.clone()].iter().copied())
                    .collect();
                self.ring_gather(operation, 0, index, &mut slab, &pieces)?;
                let mut at = 0;
                for piece in &pieces {
                    whole[piece.clone()].copy_from_slice(&slab[at..at + piece.len()]);
                    at += piece.len();
                }
            }
        }
        Ok(whole)
    }

    fn broadcast(&self, values: &mut [f32], root: usize) -> Result<(), TransportError> {
        let operation = self.operation();
        let (n, rank) = (self.size(), self.rank());
        // Down the ring from the root, slab by slab, so the hops overlap.
        let position = (rank + n - root) % n;
        for (index, range) in Self::slabs(values.len()) {
            let tag = self.tag(operation, 0, index);
            if position > 0 {
                let incoming = self
                    .transport
                    .recv(self.previous(), tag, self.timeout)?
                    .values;
                values[range.clone()].copy_from_slice(&incoming);
            }
            if position + 1 < n {
                self.transport.send(
                    self.next(),
                    TensorMessage {
                        tag,
                        shape: vec![range.len()],
                        values: values[range].to_vec(),
                    },
                )?;
            }
        }
        Ok(())
    }
}

impl RingCollectives {
    /// The reduce-scatter half of a ring all-reduce on one slab laid out as `pieces`, one per
    /// rank: afterwards this rank's piece holds the group's sum (the others partial sums).
    fn ring_reduce(
        &self,
        operation: u64,
        slab_index: usize,
        slab: &mut [f32],
        pieces: &[Range<usize>],
    ) -> Result<(), TransportError> {
        let (n, rank) = (self.size(), self.rank());
        // Piece c starts at rank c+1 and gathers one contribution per hop, ending at rank c.
        for step in 0..n - 1 {
            let send = (rank + 2 * n - step - 1) % n;
            let receive = (rank + 2 * n - step - 2) % n;
            let tag = self.tag(operation, step, slab_index);
            let incoming = self.shift(tag, &slab[local(pieces, send)])?;
            slab[local(pieces, receive)]
                .iter_mut()
                .zip(incoming)
                .for_each(|(t, v)| *t += v);
        }
        Ok(())
    }

    /// The all-gather half on one slab laid out as `pieces`: this rank's piece is complete;
    /// afterwards every piece is. Ring steps are numbered from `first_step`, so an all-reduce's
    /// gather never meets its reduce's messages.
    fn ring_gather(
        &self,
        operation: u64,
        first_step: usize,
        slab_index: usize,
        slab: &mut [f32],
        pieces: &[Range<usize>],
    ) -> Result<(), TransportError> {
        let (n, rank) = (self.size(), self.rank());
        for step in 0..n - 1 {
            let send = (rank + n - step) % n;
            let receive = (rank + 2 * n - step - 1) % n;
            let tag = self.tag(operation, first_step + step, slab_index);
            let incoming = self.shift(tag, &slab[local(pieces, send)])?;
            slab[local(pieces, receive)].copy_from_slice(&incoming);
        }
        Ok(())
    }

    /// The pieces of `window` (offsets within each rank's shard of a `len`-long buffer), as
    /// absolute ranges, one per rank: reduce-scatter's and all-gather's slabs follow the whole
    /// buffer's shards.
    fn pieces(&self, len: usize, window: &Range<usize>) -> Vec<Range<usize>> {
        (0..self.size())
            .map(|r| sub_range(shard_range(len, self.size(), r), window))
            .collect()
    }
}

/// The part of `shard` that falls in the window `window` of every shard (offsets within each
/// shard), as absolute positions.
fn sub_range(shard: Range<usize>, window: &Range<usize>) -> Range<usize> {
    let start = (shard.start + window.start).min(shard.end);
    let end = (shard.start + window.end).min(shard.end);
    start..end
}

/// Piece `index`'s range within a slab made of `pieces` laid end to end.
fn local(pieces: &[Range<usize>], index: usize) -> Range<usize> {
    let start: usize = pieces[..index].iter().map(ExactSizeIterator::len).sum();
    start..start + pieces[index].len()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::InProcessHub;

    /// Runs `body` on every rank of an in-process group of `n`, each in its own thread.
    pub(crate) fn on_ranks<T: Send + 'static>(
        n: usize,
        body: impl Fn(RingCollectives) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = InProcessHub::connect(n)
            .into_iter()
            .map(|transport| {
                let body = body.clone();
                std::thread::spawn(move || {
                    body(RingCollectives::new(
                        Arc::new(transport),
                        Duration::from_secs(10),
                    ))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Rank r's values: distinct per rank and position.
    pub(crate) fn values(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| (rank * 1000 + i) as f32).collect()
    }

    pub(crate) fn sum(n: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (0..n).map(|r| (r * 1000 + i) as f32).sum())
            .collect()
    }

    #[test]
    fn shards_tile_the_buffer() {
        for (len, parts) in [(10, 3), (2, 3), (0, 2), (7, 7)] {
            let ranges: Vec<_> = (0..parts).map(|i| shard_range(len, parts, i)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[parts - 1].end, len);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(pair[0].len() >= pair[1].len());
            }
        }
    }

    #[test]
    fn all_reduce_sums_over_every_rank_for_any_length() {
        for n in [1, 2, 3, 4] {
            for len in [0, 1, 5, 17, SLAB + 3] {
                let results = on_ranks(n, move |c| {
                    let mut v = values(c.rank(), len);
                    c.all_reduce(&mut v).unwrap();
                    // A second operation right after must not meet the first's messages.
                    let mut w = values(c.rank(), 3);
                    c.all_reduce(&mut w).unwrap();
                    (v, w)
                });
                for (v, w) in results {
                    assert!(v == sum(n, len), "all-reduce of {len} over {n}");
                    assert_eq!(w, sum(n, 3));
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce() {
        for n in [1, 2, 3] {
            for len in [2, 11, SLAB * 2 + 5] {
                let results = on_ranks(n, move |c| {
                    let shard = c.reduce_scatter(&values(c.rank(), len)).unwrap();
                    let whole = c.all_gather(&shard, len).unwrap();
                    (c.rank(), shard, whole)
                });
                let want = sum(n, len);
                for (rank, shard, whole) in results {
                    assert!(
                        shard == want[shard_range(len, n, rank)],
                        "shard {rank} of {n}"
                    );
                    assert!(whole == want, "gather of {len} over {n}");
                }
            }
        }
    }

    #[test]
    fn broadcast_copies_the_roots_values() {
        let results = on_ranks(3, |c| {
            let mut v = values(c.rank(), SLAB + 9);
            c.broadcast(&mut v, 1).unwrap();
            c.barrier().unwrap();
            v
        });
        for v in results {
            assert!(v == values(1, SLAB + 9));
        }
    }

    #[test]
    fn a_group_view_numbers_its_members_from_zero() {
        // Ranks 1 and 3 of four reduce among themselves while 0 and 2 do the same.
        let handles: Vec<_> = InProcessHub::connect(4)
            .into_iter()
            .map(|transport| {
                std::thread::spawn(move || {
                    let rank = transport.rank();
                    let members = if rank % 2 == 0 {
                        vec![0, 2]
                    } else {
                        vec![1, 3]
                    };
                    let view = GroupView::new(Arc::new(transport), members);
                    let local = view.rank();
                    let group = RingCollectives::new(Arc::new(view), Duration::from_secs(10));
                    let mut v = vec![rank as f32];
                    group.all_reduce(&mut v).unwrap();
                    (rank, local, v[0])
                })
            })
            .collect();
        for handle in handles {
            let (rank, local, total) = handle.join().unwrap();
            assert_eq!(local, rank / 2);
            assert_eq!(total, if rank % 2 == 0 { 2.0 } else { 4.0 });
        }
    }

    #[test]
    fn a_lost_member_fails_the_operation() {
        let mut ranks = InProcessHub::connect(3);
        drop(ranks.pop());
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|t| {
                std::thread::spawn(move || {
                    let c = RingCollectives::new(Arc::new(t), Duration::from_secs(10));
                    c.all_reduce(&mut [1.0; 8])
                })
            })
            .collect();
        for handle in handles {
            let err = handle.join().unwrap().unwrap_err();
            assert!(matches!(err, TransportError::PeerLost { .. }), "{err}");
        }
    }
}
