//! Forming a group of nodes across machines, as torchrun's rendezvous does: one node hosts
//! ([`RendezvousHost`]), every node (the host's included) joins it ([`RendezvousNode`]) saying
//! what it brings, and once all have joined each learns the whole group: node ranks, every
//! worker's address and device. The connections then stay open for the run: they carry
//! heartbeats (QUIC keep-alives), so a lost node is noticed within [`crate::IDLE_TIMEOUT`], and
//! the events every node must act on (a failure, Ctrl-C, the end).
//!
//! Everything travels over QUIC with TLS, and every node proves the cluster token over its TLS
//! session before it is heard (`auth`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::sync::mpsc as async_mpsc;

use crate::auth::{self, AuthError};

/// How often a waiting node hears who is still missing.
const WAITING_NOTICE: Duration = Duration::from_secs(5);
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

/// The group as `pp ctl status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// `forming`, `running` or `ended`.
    pub phase: String,
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

/// Asks the group hosted at `address` (with the cluster token) and returns its answer.
pub fn control(
    address: SocketAddr,
    token: &str,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, RendezvousError> {
    let link = |message: String| RendezvousError::Link { address, message };
    let runtime = runtime().map_err(link)?;
    let endpoint = {
        let _guard = runtime.enter();
        crate::tls::client_endpoint().map_err(link)?
    };
    runtime.block_on(async {
        let deadline = Instant::now() + timeout;
        let connection = auth::dial(&endpoint, address, token, 0, deadline, &mut || {})
            .await
            .map_err(|error| RendezvousError::Auth { address, error })?;
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|e| link(e.to_string()))?;
        write_frame(&mut send, &ToHost::Control(request))
            .await
            .map_err(link)?;
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = tokio::time::timeout(left, read_frame::<ControlReply>(&mut recv))
            .await
            .map_err(|_| link("no answer".into()))?
            .map_err(link)?;
        connection.close(VarInt::from_u32(0), b"done");
        Ok(reply)
    })
}

/// Node or `pp ctl` to host: the first message of a connection.
#[derive(Debug, Serialize, Deserialize)]
enum ToHost {
    Join(NodeJoin),
    Control(ControlRequest),
}

/// What the host knows, shared by its tasks.
#[derive(Default)]
struct HostState {
    phase: &'static str,
    nodes: Vec<Node>,
    waiting: Option<String>,
    progress: Option<String>,
    /// Into the running group's relay, once formed.
    commands: Option<async_mpsc::UnboundedSender<GroupEvent>>,
}

type SharedState = Arc<Mutex<HostState>>;

/// Host to node.
#[derive(Debug, Serialize, Deserialize)]
enum ToNode {
    Waiting(String),
    /// The group is running: join when it forms again.
    Busy(String),
    Refused(String),
    Formed(Group),
    Event(GroupEvent),
}

/// Hosts the rendezvous: forms the group, then relays events until every node finishes or one
/// is lost. Dropping it closes every connection.
pub struct RendezvousHost {
    runtime: Runtime,
    endpoint: Endpoint,
    state: SharedState,
}

impl RendezvousHost {
    /// Listens on `address` and forms a group of `nodes` nodes, giving up (and telling those
    /// that joined) after `join_timeout`.
    pub fn start(
        address: SocketAddr,
        token: &str,
        nodes: usize,
        join_timeout: Duration,
    ) -> Result<Self, RendezvousError> {
        let runtime = runtime().map_err(|message| RendezvousError::Listen { address, message })?;
        // Bind first through the standard library, to tell "taken" from other failures.
        let socket = std::net::UdpSocket::bind(address).map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => RendezvousError::AddressInUse { address },
            _ => RendezvousError::Listen {
                address,
                message: e.to_string(),
            },
        })?;
        let endpoint = {
            let _guard = runtime.enter();
            crate::tls::endpoint_on(socket)
                .map_err(|message| RendezvousError::Listen { address, message })?
        };
        let state = SharedState::default();
        state.lock().expect("state lock").phase = "forming";
        runtime.spawn(host(
            endpoint.clone(),
            token.to_string(),
            nodes,
            Instant::now() + join_timeout,
            state.clone(),
        ));
        Ok(Self {
            runtime,
            endpoint,
            state,
        })
    }

    /// The run's latest progress, for `pp ctl status`.
    pub fn set_progress(&self, progress: String) {
        self.state.lock().expect("state lock").progress = Some(progress);
    }
}

impl Drop for RendezvousHost {
    fn drop(&mut self) {
        // Let the last events reach the nodes before the connections close.
        let endpoint = self.endpoint.clone();
        self.runtime.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        });
        self.endpoint.close(VarInt::from_u32(0), b"done");
    }
}

/// A node's membership of the group.
pub struct RendezvousNode {
    runtime: Runtime,
    address: SocketAddr,
    connection: Connection,
    send: Mutex<SendStream>,
    events: mpsc::Receiver<GroupEvent>,
    _endpoint: Endpoint,
}

impl RendezvousNode {
    /// Joins the group hosted at `address`, retrying until the host listens; `waiting` hears a
    /// line every few seconds while the group is incomplete. Returns once the group is formed.
    pub fn join(
        address: SocketAddr,
        token: &str,
        join: NodeJoin,
        join_timeout: Duration,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<(Self, Group), RendezvousError> {
        let link = |message: String| RendezvousError::Link { address, message };
        let runtime = runtime().map_err(link)?;
        let endpoint = {
            let _guard = runtime.enter();
            crate::tls::client_endpoint().map_err(link)?
        };
        let deadline = Instant::now() + join_timeout;
        let mut last_notice = Instant::now();
        // Lines the host sends are passed on; our own at most every few seconds.
        let mut notice = |text: &str, own: bool| {
            if !own || last_notice.elapsed() >= WAITING_NOTICE {
                waiting(text);
                last_notice = Instant::now();
            }
        };
        // Until the host admits us to a group that is forming (a running one says so, and we
        // wait for it to form again, as after a lost node).
        let (connection, send, recv, formed) = loop {
            let connection = runtime
                .block_on(auth::dial(
                    &endpoint,
                    address,
                    token,
                    0,
                    deadline,
                    &mut || {
                        notice(
                            &format!("waiting for the rendezvous host at {address}"),
                            true,
                        )
                    },
                ))
                .map_err(|error| RendezvousError::Auth { address, error })?;
            let (mut send, mut recv) = runtime
                .block_on(connection.open_bi())
                .map_err(|e| link(e.to_string()))?;
            runtime
                .block_on(write_frame(&mut send, &ToHost::Join(join.clone())))
                .map_err(link)?;
            // The host gives up at its own deadline; a little longer here hears why.
            let answer = runtime.block_on(async {
                loop {
                    let left = (deadline + Duration::from_secs(5))
                        .saturating_duration_since(Instant::now());
                    let message = tokio::time::timeout(left, read_frame::<ToNode>(&mut recv)).await;
                    match message {
                        Ok(Ok(ToNode::Waiting(text))) => notice(&text, false),
                        Ok(Ok(ToNode::Formed(group))) => return Ok(Some(group)),
                        Ok(Ok(ToNode::Busy(text))) => {
                            notice(&text, true);
                            return Ok(None);
                        }
                        Ok(Ok(ToNode::Refused(reason))) => {
                            return Err(RendezvousError::Refused(reason))
                        }
                        Ok(Ok(ToNode::Event(_))) => {
                            return Err(link("an event before the group was formed".into()))
                        }
                        Ok(Err(message)) => return Err(link(closed_reason(&connection, message))),
                        Err(_) => return Err(link("the group was not formed in time".into())),
                    }
                }
            })?;
            match answer {
                Some(group) => break (connection, send, recv, group),
                None if Instant::now() < deadline => {
                    connection.close(VarInt::from_u32(0), b"later");
                    std::thread::sleep(Duration::from_secs(1));
                }
                None => {
                    return Err(link(
                        "the group was still running at the join timeout".into(),
                    ))
                }
            }
        };
        let (sender, events) = mpsc::channel();
        runtime.spawn(relay_group_events(
            connection.clone(),
            recv,
            sender,
            format!("lost the rendezvous host (node 0 at {address})"),
        ));
        Ok((
            Self {
                runtime,
                address,
                connection,
                send: Mutex::new(send),
                events,
                _endpoint: endpoint,
            },
            formed,
        ))
    }

    /// Tells the group.
    pub fn report(&self, event: NodeEvent) -> Result<(), RendezvousError> {
        let mut send = self.send.lock().expect("send lock");
        self.runtime
            .block_on(write_frame(&mut send, &event))
            .map_err(|message| RendezvousError::Link {
                address: self.address,
                message,
            })
    }

    /// The next event, if one has arrived.
    pub fn poll(&self) -> Option<GroupEvent> {
        self.events.try_recv().ok()
    }

    /// Waits up to `timeout` for the next event.
    pub fn wait(&self, timeout: Duration) -> Option<GroupEvent> {
        self.events.recv_timeout(timeout).ok()
    }
}

impl Drop for RendezvousNode {
    fn drop(&mut self) {
        self.connection.close(VarInt::from_u32(0), b"done");
    }
}

fn runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Hands the host's events to the node; a dropped link becomes `Broken`, naming the host.
async fn relay_group_events(
    connection: Connection,
    mut recv: RecvStream,
    sender: mpsc::Sender<GroupEvent>,
    lost: String,
) {
    loop {
        match read_frame::<ToNode>(&mut recv).await {
            Ok(ToNode::Event(event)) => {
                let finished = event == GroupEvent::Finished;
                if sender.send(event).is_err() || finished {
                    return;
                }
            }
            Ok(_) => {}
            Err(message) => {
                let reason = closed_reason(&connection, message);
                let _ = sender.send(GroupEvent::Broken(format!("{lost}: {reason}")));
                return;
            }
        }
    }
}

/// A joined node, as the host keeps it.
struct Member {
    join: NodeJoin,
    address: IpAddr,
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
}

impl Member {
    fn describe(&self, rank: usize) -> String {
        format!("node {rank} ({} at {})", self.join.name, self.address)
    }
}

/// The host's whole job: form the group, then relay events.
async fn host(
    endpoint: Endpoint,
    token: String,
    nodes: usize,
    deadline: Instant,
    state: SharedState,
) {
    let (admitted, arrivals) = async_mpsc::unbounded_channel();
    // Admission goes on for the whole run: `pp ctl` may call at any time.
    let accepting = {
        let (endpoint, state) = (endpoint.clone(), state.clone());
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                tokio::spawn(admit(
                    incoming,
                    token.clone(),
                    admitted.clone(),
                    state.clone(),
                ));
            }
        })
    };
    if let Some(members) = form(arrivals, nodes, deadline, &state).await {
        relay_node_events(members, &state).await;
    }
    state.lock().expect("state lock").phase = "ended";
    accepting.abort();
}

/// Admits nodes until `nodes` have joined; `None` when the group could not be formed (those
/// that joined are told why).
async fn form(
    mut arrivals: async_mpsc::UnboundedReceiver<Arrival>,
    nodes: usize,
    deadline: Instant,
    state: &SharedState,
) -> Option<Vec<Member>> {
    let mut members: BTreeMap<usize, Member> = BTreeMap::new();
    let mut turned_away: Vec<String> = Vec::new();
    let mut notice = tokio::time::interval(WAITING_NOTICE);
    notice.tick().await;
    while members.len() < nodes {
        tokio::select! {
            Some(arrival) = arrivals.recv() => {
                let member = match arrival {
                    Arrival::Member(member) => member,
                    Arrival::TurnedAway(address) => {
                        turned_away.push(format!("{address} (wrong cluster token)"));
                        continue;
                    }
                };
                members.retain(|_, m| m.connection.close_reason().is_none());
                match assign_rank(&members, &member, nodes) {
                    Ok(rank) => {
                        members.insert(rank, member);
                    }
                    Err(reason) => refuse(vec![member], &reason).await,
                }
                state.lock().expect("state lock").waiting =
                    Some(waiting_text(&members, nodes, &turned_away));
            }
            _ = notice.tick() => {
                members.retain(|_, m| m.connection.close_reason().is_none());
                let text = waiting_text(&members, nodes, &turned_away);
                state.lock().expect("state lock").waiting = Some(text.clone());
                for member in members.values_mut() {
                    let _ = write_frame(&mut member.send, &ToNode::Waiting(text.clone())).await;
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let reason = format!(
                    "the group was not formed before the join timeout: {}",
                    waiting_text(&members, nodes, &turned_away)
                );
                refuse(members.into_values().collect(), &reason).await;
                return None;
            }
        }
    }
    let mut members: Vec<Member> = members.into_values().collect();
    if let Some(reason) = settings_difference(&members) {
        refuse(members, &reason).await;
        return None;
    }
    // A node that formed groups before (here or in a previous process) makes this a restart.
    let round = members.iter().map(|m| m.join.restarts).max().unwrap_or(0);
    let mut first_rank = 0;
    let group_nodes: Vec<Node> = members
        .iter()
        .enumerate()
        .map(|(rank, member)| {
            let node = Node {
                rank,
                name: member.join.name.clone(),
                address: member.address,
                first_rank,
                workers: member.join.workers.clone(),
            };
            first_rank += node.workers.len();
            node
        })
        .collect();
    for (rank, member) in members.iter_mut().enumerate() {
        let group = Group {
            node_rank: rank,
            round,
            nodes: group_nodes.clone(),
        };
        let _ = write_frame(&mut member.send, &ToNode::Formed(group)).await;
    }
    let mut state = state.lock().expect("state lock");
    state.phase = "running";
    state.waiting = None;
    state.nodes = group_nodes;
    Some(members)
}

/// Tells each member why it is turned away, and keeps the connection until it has heard.
async fn refuse(members: Vec<Member>, reason: &str) {
    let mut told = tokio::task::JoinSet::new();
    for mut member in members {
        let reason = ToNode::Refused(reason.to_string());
        told.spawn(async move {
            let _ = write_frame(&mut member.send, &reason).await;
            let _ = member.send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(5), member.send.stopped()).await;
        });
    }
    told.join_all().await;
}

/// What the host hears of a node that dialled in.
enum Arrival {
    Member(Member),
    /// It did not prove the token.
    TurnedAway(SocketAddr),
}

/// Proves the token both ways, then reads the node's report, or answers `pp ctl`.
async fn admit(
    incoming: quinn::Incoming,
    token: String,
    admitted: async_mpsc::UnboundedSender<Arrival>,
    state: SharedState,
) {
    let arrival = async {
        let connection = incoming.await.ok()?;
        match auth::admit_dialler(&connection, &token).await {
            Ok(_) => {}
            Err(AuthError::Unproven) => {
                return Some(Arrival::TurnedAway(connection.remote_address()))
            }
            Err(_) => return None,
        }
        let (mut send, mut recv) = connection.accept_bi().await.ok()?;
        let join = match read_frame::<ToHost>(&mut recv).await.ok()? {
            ToHost::Join(_) if state.lock().expect("state lock").phase != "forming" => {
                let busy = ToNode::Busy(
                    "the group is running without this node; waiting for it to form again".into(),
                );
                let _ = write_frame(&mut send, &busy).await;
                let _ = send.finish();
                let _ = send.stopped().await;
                return None;
            }
            ToHost::Join(join) => join,
            ToHost::Control(request) => {
                let reply = answer(request, connection.remote_address(), &state);
                let _ = write_frame(&mut send, &reply).await;
                let _ = send.finish();
                let _ = send.stopped().await;
                return None;
            }
        };
        Some(Arrival::Member(Member {
            join,
            address: connection.remote_address().ip(),
            connection,
            send,
            recv,
        }))
    };
    if let Ok(Some(arrival)) = tokio::time::timeout(Duration::from_secs(10), arrival).await {
        let _ = admitted.send(arrival);
    }
}

/// Carries out a `pp ctl` request.
fn answer(request: ControlRequest, from: SocketAddr, state: &SharedState) -> ControlReply {
    let state = state.lock().expect("state lock");
    let event = match request {
        ControlRequest::Status => {
            return ControlReply::Status(GroupStatus {
                phase: state.phase.to_string(),
                nodes: state.nodes.clone(),
                waiting: state.waiting.clone(),
                progress: state.progress.clone(),
            })
        }
        ControlRequest::Save => GroupEvent::Save,
        ControlRequest::Stop => GroupEvent::Stop {
            by: format!("pp ctl from {}", from.ip()),
        },
        ControlRequest::Abort => GroupEvent::Abort(format!("aborted by pp ctl from {}", from.ip())),
    };
    match &state.commands {
        Some(commands) if commands.send(event).is_ok() => {
            ControlReply::Done(format!("told all {} nodes", state.nodes.len()))
        }
        _ => ControlReply::Refused(format!("the group is {}, not running", state.phase)),
    }
}

/// The rank a node asked for, or the lowest free one.
fn assign_rank(
    members: &BTreeMap<usize, Member>,
    member: &Member,
    nodes: usize,
) -> Result<usize, String> {
    match member.join.node_rank {
        Some(rank) if rank >= nodes => {
            Err(format!("--node-rank {rank} is not below --nnodes {nodes}"))
        }
        Some(rank) => match members.get(&rank) {
            Some(taken) => Err(format!(
                "node rank {rank} is already taken by {}",
                taken.describe(rank)
            )),
            None => Ok(rank),
        },
        // Ranks asked for explicitly win: a node without one takes the lowest rank that no
        // joined node holds and that is not node 0 (the host's).
        None => (1..nodes)
            .find(|rank| !members.contains_key(rank))
            .ok_or_else(|| "the group is full".to_string()),
    }
}

fn waiting_text(members: &BTreeMap<usize, Member>, nodes: usize, turned_away: &[String]) -> String {
    let joined: Vec<String> = members.iter().map(|(rank, m)| m.describe(*rank)).collect();
    let missing: Vec<String> = (0..nodes)
        .filter(|rank| !members.contains_key(rank))
        .map(|rank| format!("node {rank}"))
        .collect();
    let mut text = format!(
        "{} of {nodes} nodes joined ({}); missing: {}",
        members.len(),
        if joined.is_empty() {
            "none".into()
        } else {
            joined.join(", ")
        },
        missing.join(", ")
    );
    if !turned_away.is_empty() {
        text += &format!("; turned away: {}", turned_away.join(", "));
    }
    text
}

/// The first setting in which a node differs from node 0.
fn settings_difference(members: &[Member]) -> Option<String> {
    let reference = &members[0].join.settings;
    members
        .iter()
        .enumerate()
        .skip(1)
        .find_map(|(rank, member)| {
            let theirs = &member.join.settings;
            let differing = reference
                .iter()
                .zip(theirs)
                .find(|(a, b)| a != b)
                .map(|((name, ours), (_, other))| {
                    format!("{name} is {other} there, {ours} on node 0")
                })
                .or_else(|| {
                    (reference.len() != theirs.len())
                        .then(|| "its settings are of another version".into())
                })?;
            Some(format!(
                "{} was not started like node 0: {differing}; run the same command on every node",
                member.describe(rank)
            ))
        })
}

/// Relays node events, and `pp ctl`'s requests, to every node until all finish or the run
/// must stop.
async fn relay_node_events(members: Vec<Member>, state: &SharedState) {
    let (events, mut arrivals) = async_mpsc::unbounded_channel();
    let (commands, mut requests) = async_mpsc::unbounded_channel();
    state.lock().expect("state lock").commands = Some(commands);
    let mut sends = Vec::with_capacity(members.len());
    let mut names = Vec::with_capacity(members.len());
    for (rank, member) in members.into_iter().enumerate() {
        names.push(member.describe(rank));
        sends.push(member.send);
        let events = events.clone();
        let (connection, mut recv) = (member.connection, member.recv);
        tokio::spawn(async move {
            loop {
                match read_frame::<NodeEvent>(&mut recv).await {
                    Ok(event) => {
                        if events.send((rank, Some(event))).is_err() {
                            return;
                        }
                    }
                    Err(_) => {
                        drop(connection);
                        let _ = events.send((rank, None));
                        return;
                    }
                }
            }
        });
    }
    drop(events);
    let mut finished = vec![false; sends.len()];
    let outcome = loop {
        let (rank, event) = tokio::select! {
            arrival = arrivals.recv() => match arrival {
                Some(arrival) => arrival,
                None => return,
            },
            Some(request) = requests.recv() => match request {
                abort @ GroupEvent::Abort(_) => break abort,
                other => {
                    broadcast(&mut sends, &other).await;
                    continue;
                }
            },
        };
        match event {
            Some(NodeEvent::Finished) => {
                finished[rank] = true;
                if finished.iter().all(|&f| f) {
                    break GroupEvent::Finished;
                }
            }
            Some(NodeEvent::Interrupt) => {
                broadcast(&mut sends, &GroupEvent::Interrupt { node: rank }).await;
            }
            Some(NodeEvent::Failed(reason)) => break GroupEvent::Broken(reason),
            None if finished[rank] => {}
            None => break GroupEvent::Broken(format!("{} was lost", names[rank])),
        }
    };
    state.lock().expect("state lock").commands = None;
    broadcast(&mut sends, &outcome).await;
    for send in &mut sends {
        let _ = send.finish();
    }
}

async fn broadcast(sends: &mut [SendStream], event: &GroupEvent) {
    for send in sends {
        let _ = write_frame(send, &ToNode::Event(event.clone())).await;
    }
}

async fn write_frame<T: Serialize>(send: &mut SendStream, value: &T) -> Result<(), String> {
    let body = bincode::serde::encode_to_vec(value, bincode::config::standard())
        .map_err(|e| e.to_string())?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    send.write_all(&frame).await.map_err(|e| e.to_string())
}

async fn read_frame<T: DeserializeOwned>(recv: &mut RecvStream) -> Result<T, String> {
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
fn closed_reason(connection: &Connection, fallback: String) -> String {
    match connection.close_reason() {
        Some(quinn::ConnectionError::TimedOut) => {
            format!("no heartbeat for {} s", crate::IDLE_TIMEOUT.as_secs())
        }
        Some(reason) => reason.to_string(),
        None => fallback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_address() -> SocketAddr {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn report(node_rank: Option<usize>, workers: usize, lr: &str) -> NodeJoin {
        NodeJoin {
            node_rank,
            name: format!("host{}", node_rank.map_or("?".into(), |r| r.to_string())),
            workers: (0..workers)
                .map(|i| WorkerInfo {
                    port: 40000 + i as u16,
                    device: "cpu".into(),
                })
                .collect(),
            settings: vec![("stages".into(), "3".into()), ("lr".into(), lr.into())],
            restarts: 0,
        }
    }

    type Joined = Result<(RendezvousNode, Group), RendezvousError>;

    /// Joins every report on its own thread; returns each node's outcome and what it was told
    /// while waiting.
    fn join_all(
        address: SocketAddr,
        token: &str,
        reports: Vec<(Duration, NodeJoin)>,
    ) -> Vec<(Joined, Vec<String>)> {
        std::thread::scope(|scope| {
            let handles: Vec<_> = reports
                .into_iter()
                .map(|(delay, join)| {
                    scope.spawn(move || {
                        std::thread::sleep(delay);
                        let mut heard = Vec::new();
                        let result = RendezvousNode::join(
                            address,
                            token,
                            join,
                            Duration::from_secs(20),
                            &mut |line| heard.push(line.to_string()),
                        );
                        (result, heard)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn nodes_join_in_any_order_and_learn_the_whole_group() {
        let address = free_address();
        // Node 2 dials before the host listens, node 1 comes late: it is named as missing.
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            RendezvousHost::start(address, "secret", 3, Duration::from_secs(20)).unwrap()
        });
        let joined = join_all(
            address,
            "secret",
            vec![
                (Duration::ZERO, report(Some(2), 1, "1e-4")),
                (Duration::from_millis(600), report(Some(0), 2, "1e-4")),
                (Duration::from_millis(6500), report(None, 1, "1e-4")),
            ],
        );
        let _host = late.join().unwrap();
        let mut groups = Vec::new();
        for (i, (result, heard)) in joined.into_iter().enumerate() {
            let (node, group) = result.unwrap();
            if i < 2 {
                assert!(
                    heard.iter().any(|line| line.contains("missing: node 1")),
                    "node {i} heard {heard:?}"
                );
            }
            groups.push((node, group));
        }
        let ranks: Vec<usize> = groups.iter().map(|(_, g)| g.node_rank).collect();
        assert_eq!(ranks, vec![2, 0, 1]);
        let group = &groups[0].1;
        let first: Vec<usize> = group.nodes.iter().map(|n| n.first_rank).collect();
        assert_eq!(first, vec![0, 2, 3]);
        let ports: Vec<u16> = group.worker_addresses().iter().map(|a| a.port()).collect();
        assert_eq!(ports, vec![40000, 40001, 40000, 40000]);
        assert!(groups.iter().all(|(_, g)| g.nodes == group.nodes));

        // Ctrl-C on one node reaches all; then all finish together.
        groups[1].0.report(NodeEvent::Interrupt).unwrap();
        for (node, _) in &groups {
            assert_eq!(
                node.wait(Duration::from_secs(5)),
                Some(GroupEvent::Interrupt { node: 0 })
            );
        }
        for (node, _) in &groups {
            node.report(NodeEvent::Finished).unwrap();
        }
        for (node, _) in &groups {
            assert_eq!(
                node.wait(Duration::from_secs(5)),
                Some(GroupEvent::Finished)
            );
        }
    }

    #[test]
    fn control_requests_reach_every_node() {
        let address = free_address();
        let host = RendezvousHost::start(address, "secret", 2, Duration::from_secs(20)).unwrap();
        let status = |token| {
            control(
                address,
                token,
                ControlRequest::Status,
                Duration::from_secs(5),
            )
        };
        match status("secret").unwrap() {
            ControlReply::Status(status) => assert_eq!(status.phase, "forming"),
            other => panic!("{other:?}"),
        }
        let joined = join_all(
            address,
            "secret",
            vec![
                (Duration::ZERO, report(Some(0), 1, "1e-4")),
                (Duration::ZERO, report(Some(1), 2, "1e-4")),
            ],
        );
        let nodes: Vec<RendezvousNode> = joined.into_iter().map(|(r, _)| r.unwrap().0).collect();
        host.set_progress("step 7".into());
        match status("secret").unwrap() {
            ControlReply::Status(status) => {
                assert_eq!(status.phase, "running");
                assert_eq!(status.nodes.len(), 2);
                assert_eq!(status.nodes[1].workers.len(), 2);
                assert_eq!(status.progress.as_deref(), Some("step 7"));
            }
            other => panic!("{other:?}"),
        }
        let wrong = status("guess").unwrap_err();
        assert!(
            matches!(
                wrong,
                RendezvousError::Auth {
                    error: AuthError::Refused,
                    ..
                }
            ),
            "{wrong}"
        );
        let ask = |request| control(address, "secret", request, Duration::from_secs(5)).unwrap();
        assert_eq!(
            ask(ControlRequest::Save),
            ControlReply::Done("told all 2 nodes".into())
        );
        for node in &nodes {
            assert_eq!(node.wait(Duration::from_secs(5)), Some(GroupEvent::Save));
        }
        assert!(matches!(ask(ControlRequest::Stop), ControlReply::Done(_)));
        for node in &nodes {
            assert!(matches!(
                node.wait(Duration::from_secs(5)),
                Some(GroupEvent::Stop { by }) if by == "pp ctl from 127.0.0.1"
            ));
        }
        assert!(matches!(ask(ControlRequest::Abort), ControlReply::Done(_)));
        for node in &nodes {
            assert!(matches!(
                node.wait(Duration::from_secs(5)),
                Some(GroupEvent::Abort(reason)) if reason.contains("aborted by pp ctl")
            ));
        }
    }

    #[test]
    fn a_lost_node_stops_the_others_naming_it() {
        let address = free_address();
        let _host = RendezvousHost::start(address, "secret", 3, Duration::from_secs(20)).unwrap();
        let joined = join_all(
            address,
            "secret",
            vec![
                (Duration::ZERO, report(Some(0), 1, "1e-4")),
                (Duration::ZERO, report(Some(1), 1, "1e-4")),
                (Duration::ZERO, report(Some(2), 1, "1e-4")),
            ],
        );
        let mut nodes: Vec<RendezvousNode> =
            joined.into_iter().map(|(r, _)| r.unwrap().0).collect();
        drop(nodes.remove(1));
        for node in &nodes {
            match node.wait(Duration::from_secs(15)) {
                Some(GroupEvent::Broken(reason)) => {
                    assert!(
                        reason.contains("node 1 (host1 at 127.0.0.1) was lost"),
                        "{reason}"
                    )
                }
                other => panic!("expected a stop, got {other:?}"),
            }
        }
    }

    #[test]
    fn nodes_started_differently_or_with_another_token_are_refused() {
        let address = free_address();
        let _host = RendezvousHost::start(address, "secret", 2, Duration::from_secs(20)).unwrap();
        let joined = join_all(
            address,
            "secret",
            vec![
                (Duration::ZERO, report(Some(0), 1, "1e-4")),
                (Duration::ZERO, report(None, 1, "3e-4")),
            ],
        );
        for (result, _) in joined {
            let error = result.err().expect("refused").to_string();
            assert!(
                error.contains("node 1 (host? at 127.0.0.1) was not started like node 0")
                    && error.contains("lr is 3e-4 there, 1e-4 on node 0"),
                "{error}"
            );
        }
        // Another token: refused at once, and named to the nodes that wait.
        let address = free_address();
        let _host = RendezvousHost::start(address, "secret", 2, Duration::from_secs(3)).unwrap();
        let wrong = join_all(
            address,
            "guess",
            vec![(Duration::ZERO, report(None, 1, "1e-4"))],
        );
        let error = wrong.into_iter().next().unwrap().0.err().expect("refused");
        assert!(
            matches!(
                error,
                RendezvousError::Auth {
                    error: AuthError::Refused,
                    ..
                }
            ),
            "{error}"
        );
        let waiting = join_all(
            address,
            "secret",
            vec![(Duration::ZERO, report(Some(0), 1, "1e-4"))],
        );
        let error = waiting
            .into_iter()
            .next()
            .unwrap()
            .0
            .err()
            .expect("no group");
        assert!(
            error.to_string().contains("turned away: 127.0.0.1:")
                && error.to_string().contains("(wrong cluster token)"),
            "{error}"
        );
    }

    #[test]
    fn the_host_gives_up_after_the_join_timeout_naming_who_is_missing() {
        let address = free_address();
        let _host = RendezvousHost::start(address, "secret", 3, Duration::from_secs(2)).unwrap();
        let joined = join_all(
            address,
            "secret",
            vec![(Duration::ZERO, report(Some(0), 1, "1e-4"))],
        );
        let error = joined
            .into_iter()
            .next()
            .unwrap()
            .0
            .err()
            .expect("no group");
        assert!(
            error.to_string().contains("1 of 3 nodes joined")
                && error.to_string().contains("missing: node 1, node 2"),
            "{error}"
        );
    }
}
