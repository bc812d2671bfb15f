//! Moving tensors between pipeline stages.
//!
//! Stages talk only to the [`Transport`] trait. A message carries a [`Tag`] (step, micro-batch,
//! stage and kind), so a receiver asks for exactly the tensor it needs and messages that arrive
//! out of order wait in a buffer instead of being mistaken for one another. This crate has the
//! in-process implementation used by tests and the QUIC implementation that connects processes
//! and machines. [`collective`] builds the group operations of data parallelism on top, and,
//! with the `nccl` feature, `NcclCollectives` runs them over NVIDIA's NCCL instead.
#![deny(missing_docs)]

mod auth;
pub mod collective;
mod in_process;
mod mailbox;
mod message;
#[cfg(feature = "nccl")]
mod nccl;
mod quic;
pub mod rendezvous;
mod tls;
mod wire;

pub use auth::{random_token, AuthError};
pub use collective::{shard_range, Collectives, GroupView, RingCollectives};
pub use in_process::{InProcessHub, InProcessTransport};
pub use message::{Kind, Tag, TensorMessage};
#[cfg(feature = "nccl")]
pub use nccl::{nccl_available, NcclCollectives};
pub use quic::{QuicConfig, QuicError, QuicTransport};
pub use tls::IDLE_TIMEOUT;
pub use wire::WireDType;

use std::time::Duration;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer's side of the connection is gone (its process exited or the link dropped).
    #[error("lost connection to rank {rank}")]
    PeerLost {
        /// The rank that can no longer be reached.
        rank: usize,
    },
    /// No message with the tag arrived in time.
    #[error("timed out after {timeout:?} waiting for {tag} from rank {rank}")]
    Timeout {
        /// The tag that was awaited.
        tag: Tag,
        /// The rank it was expected from.
        rank: usize,
        /// How long the receiver waited.
        timeout: Duration,
    },
    /// The rank is not part of this group.
    #[error("rank {rank} is not in a group of {world_size}")]
    UnknownRank {
        /// The rank asked for.
        rank: usize,
        /// How many ranks the group has.
        world_size: usize,
    },
    /// A device library (NCCL, the CUDA driver) failed or is missing.
    #[error("{0}")]
    Device(String),
}

/// Point-to-point tensor transfers between the ranks of one pipeline. Shared between threads
/// (a rank's compute and its gradient all-reduce), so receives may wait concurrently.
pub trait Transport: Send + Sync {
    /// This process's rank.
    fn rank(&self) -> usize;
    /// How many ranks the pipeline has.
    fn world_size(&self) -> usize;
    /// Sends a tensor to `to`; returns once the message is handed to the transport.
    fn send(&self, to: usize, message: TensorMessage) -> Result<(), TransportError>;
    /// Receives the tensor with `tag` sent by `from`, waiting at most `timeout`.
    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
    ) -> Result<TensorMessage, TransportError>;
    /// What has crossed the link to each rank so far (by rank; this rank's own entry stays
    /// empty). Transports without a wire report nothing.
    fn links(&self) -> Vec<LinkTraffic> {
        Vec::new()
    }
}

/// Traffic on the link to one peer, counted since the transport started.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkTraffic {
    /// Bytes of messages the peer has acknowledged.
    pub bytes: u64,
    /// Seconds those messages were on their way: from the start of each send until the peer
    /// acknowledged its last byte (sends that overlap count once each).
    pub seconds: f64,
}

impl LinkTraffic {
    /// Megabytes (10^6 bytes) per second while sending; 0 before any traffic.
    pub fn megabytes_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }
}
