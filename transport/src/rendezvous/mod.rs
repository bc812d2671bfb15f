//! Forming a group of nodes across machines, as torchrun's rendezvous does: one node hosts
//! ([`RendezvousHost`]), every node (the host's included) joins it ([`RendezvousNode`]) saying
//! what it brings, and once all have joined each learns the whole group: node ranks, every
//! worker's address and device. The connections then stay open for the run: they carry
//! heartbeats (QUIC keep-alives), so a lost node is noticed within [`crate::IDLE_TIMEOUT`], and
//! the events every node must act on (a failure, Ctrl-C, the end). Node 0 also serves files
//! (`files`): nodes without a shared filesystem fetch the model and data from it, and upload
//! their checkpoint files to it.
//!
//! Everything travels over QUIC with TLS, and every node proves the cluster token over its TLS
//! session before it is heard (`auth`). `host` is node 0's side, `member` every node's (and
//! [`control`], `pp ctl`'s); this module holds what they say to each other.

mod files;
mod host;
mod member;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use quinn::{Connection, RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

use crate::auth::AuthError;

pub use files::{checksum_of, FileClient, FileInfo, SharedFiles};
pub use host::RendezvousHost;
pub use member::{control, RendezvousNode};

/// How often a waiting node hears who is still missing.
pub(crate) const WAITING_NOTICE: Duration = Duration::from_secs(5);
/// Largest rendezvous message (a node's report is a few hundred bytes).
const MAX_FRAME: usize = 1 << 20;

/// Why a group could not be formed or kept.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// Another process already listens on the rendezvous port (another node of this machine
    /// hosts).
    #[error("{address} is already in use")]
    AddressInUse {
        /// The rendezvous address.
        address: SocketAddr,
    },
    /// The local endpoint could not be set up.
    #[error("cannot listen on {address}: {message}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// What failed.
        message: String,
    },
    /// The token was refused, or the host could not prove it.
    #[error("rendezvous at {address}: {error}")]
    Auth {
        /// The rendezvous address.
        address: SocketAddr,
        /// What failed.
        error: AuthError,
    },
    /// The host turned this node away, or gave up forming the group.
    #[error("{0}")]
    Refused(String),
    /// The host could not be reached, or the link to it dropped.
    #[error("rendezvous at {address}: {message}")]
    Link {
        /// The rendezvous address.
        address: SocketAddr,
        /// What failed.
        message: String,
    },
}

/// One worker a node brings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// The UDP port its transport listens on.
    pub port: u16,
    /// Its device, in words.
    pub device: String,
    /// Bytes of memory it may use, where known.
    pub memory: Option<u64>,
    /// What the trainer measured of the device (its speed at the run's shapes), passed to
    /// every node as it is: the rendezvous does not read it.
    pub measured: String,
}

/// What a node says when it joins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeJoin {
    /// The node rank it asks for; the host assigns one in join order when `None`.
    pub node_rank: Option<usize>,
    /// Its host name.
    pub name: String,
    /// Its workers, in local order.
    pub workers: Vec<WorkerInfo>,
    /// Settings that must be the same on every node (name, value); the first difference from
    /// node 0 is reported.
    pub settings: Vec<(String, String)>,
    /// How many times this node has formed the group again after losing it.
    pub restarts: u32,
    /// The checkpoints this node holds (its share of each, where nodes save their own), so
    /// that the group resumes from one every node holds its part of.
    pub checkpoints: Vec<HeldCheckpoint>,
    /// Its link to the host as it measured it, in bytes per second (none on the host).
    pub link: Option<f64>,
}

/// A checkpoint a node holds: its step, and the stages whose files are there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCheckpoint {
    /// Optimizer steps it was taken after.
    pub step: u64,
    /// The stages whose weights and optimizer state it holds.
    pub stages: Vec<usize>,
}

/// A member of the formed group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Its node rank.
    pub rank: usize,
    /// Its host name.
    pub name: String,
    /// The address the host saw it connect from, which its workers are reached at.
    pub address: IpAddr,
    /// The global rank of its first worker.
    pub first_rank: usize,
    /// Its workers.
    pub workers: Vec<WorkerInfo>,
    /// The checkpoints it holds.
    pub checkpoints: Vec<HeldCheckpoint>,
    /// Its link to node 0 as it measured it, in bytes per second (none on node 0).
    pub link: Option<f64>,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} ({} at {})", self.rank, self.name, self.address)
    }
}

/// The formed group, as every node receives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// The receiving node's rank.
    pub node_rank: usize,
    /// How many times the group has been formed again after a lost node (0 the first time;
    /// the most any node has seen): after a restart, the workers resume from the newest
    /// checkpoint.
    pub round: u32,
    /// Every node, by node rank; their workers' global ranks are contiguous in this order.
    pub nodes: Vec<Node>,
}

impl Group {
    /// Every worker's address, by global rank.
    pub fn worker_addresses(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .flat_map(|node| {
                node.workers
                    .iter()
                    .map(|worker| SocketAddr::new(node.address, worker.port))
            })
            .collect()
    }

    /// The receiving node.
    pub fn this_node(&self) -> &Node {
        &self.nodes[self.node_rank]
    }
}

/// What a node tells the group while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum NodeEvent {
    /// One of its workers failed; the text says which and how.
    Failed(String),
    /// Ctrl-C was pressed on it.
    Interrupt,
    /// All its workers finished.
    Finished,
}

/// What the group tells every node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GroupEvent {
    /// Ctrl-C was pressed on this node: every node stops after the same step.
    Interrupt {
        /// Where.
        node: usize,
    },
    /// `pp ctl save`: every worker saves a checkpoint at its next step.
    Save,
    /// `pp ctl stop`: every worker saves and stops after the same step; the run ends cleanly.
    Stop {
        /// Who asked.
        by: String,
    },
    /// A node was lost or a worker failed; the text says which. The group can be formed again.
    Broken(String),
    /// `pp ctl abort`: every node ends now, without saving.
    Abort(String),
    /// Every node finished.
    Finished,
}

/// What `pp ctl` asks of a running group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// The group's state and the run's progress.
    Status,
    /// A checkpoint at the next step.
    Save,
    /// Save and end on every node.
    Stop,
    /// End on every node without saving.
    Abort,
}

/// Where the group is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Nodes are joining.
    #[default]
    Forming,
    /// The group is formed and training.
    Running,
    /// The run is over, or the group could not be formed.
    Ended,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Forming => "forming",
            Self::Running => "running",
            Self::Ended => "ended",
        })
    }
}

/// The group as `pp ctl status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Where the group is.
    pub phase: Phase,
    /// Who has joined (while forming) or the whole group.
    pub nodes: Vec<Node>,
    /// While forming: who is missing.
    pub waiting: Option<String>,
    /// The run's latest progress, as node 0 reports it ([`RendezvousHost::set_progress`]).
    pub progress: Option<String>,
}

/// The host's answer to `pp ctl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ControlReply {
    /// For [`ControlRequest::Status`].
    Status(GroupStatus),
    /// The request was passed on to every node.
    Done(String),
    /// The request cannot be carried out now.
    Refused(String),
}

/// Node or `pp ctl` to host: the first message of a connection (of every stream, for files).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToHost {
    Join(NodeJoin),
    Control(ControlRequest),
    File(files::FileRequest),
}

/// Host to node.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToNode {
    Waiting(String),
    /// The group is running: join when it forms again.
    Busy(String),
    Refused(String),
    Formed(Group),
    Event(GroupEvent),
}

pub(crate) fn runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// A runtime and an endpoint to dial the rendezvous at `address` from.
pub(crate) fn dialler(address: SocketAddr) -> Result<(Runtime, quinn::Endpoint), RendezvousError> {
    let link = |message: String| RendezvousError::Link { address, message };
    let runtime = runtime().map_err(link)?;
    let endpoint = {
        let _guard = runtime.enter();
        crate::tls::client_endpoint().map_err(link)?
    };
    Ok((runtime, endpoint))
}

pub(crate) async fn write_frame<T: Serialize>(
    send: &mut SendStream,
    value: &T,
) -> Result<(), String> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    send.write_all(&frame).await.map_err(|e| e.to_string())
}

pub(crate) async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, String> {
    let mut length = [0u8; 4];
    recv.read_exact(&mut length)
        .await
        .map_err(|e| e.to_string())?;
    let length = u32::from_le_bytes(length) as usize;
    if length > MAX_FRAME {
        return Err(format!("a {length}-byte message is too large"));
    }
    let mut body = vec![0u8; length];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    bincode::serde::decode_from_slice(&body, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|e| format!("a malformed message: {e}"))
}

/// Why a connection ended, in words: the peer's own reason when it gave one.
pub(crate) fn closed_reason(connection: &Connection, fallback: String) -> String {
    match connection.close_reason() {
        Some(quinn::ConnectionError::TimedOut) => {
            format!("no heartbeat for {} s", crate::IDLE_TIMEOUT.as_secs())
        }
        Some(reason) => reason.to_string(),
        None => fallback,
    }
}

#[cfg(test)]
mod tests;
