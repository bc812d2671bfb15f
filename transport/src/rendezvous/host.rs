//! The host's side: forms the group from the nodes that dial in, then relays their events (and
//! `pp ctl`'s requests) to all until the run ends.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::runtime::Runtime;
use tokio::sync::mpsc as async_mpsc;

use super::files::{self, SharedFiles};
use super::{
    read_frame, runtime, write_frame, ControlReply, ControlRequest, Group, GroupEvent, GroupStatus,
    Node, NodeEvent, NodeJoin, Phase, RendezvousError, ToHost, ToNode, WAITING_NOTICE,
};
use crate::auth::{self, AuthError};

/// What the host knows, shared by its tasks.
#[derive(Default)]
struct HostState {
    phase: Phase,
    nodes: Vec<Node>,
    waiting: Option<String>,
    progress: Option<String>,
    /// What nodes may fetch, and where uploads go.
    files: SharedFiles,
    /// Into the running group's relay, once formed.
    commands: Option<async_mpsc::UnboundedSender<GroupEvent>>,
}

type SharedState = Arc<Mutex<HostState>>;

/// Hosts the rendezvous: forms the group, then relays events until every node finishes or one
/// is lost. Dropping it closes every connection.
pub struct RendezvousHost {
    runtime: Runtime,
    endpoint: Endpoint,
    state: SharedState,
}

impl RendezvousHost {
    /// Listens on `address` and forms a group of `nodes` nodes, giving up (and telling those
    /// that joined) after `join_timeout`; offers `files` from the start.
    pub fn start(
        address: SocketAddr,
        token: &str,
        nodes: usize,
        join_timeout: Duration,
        files: SharedFiles,
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
        let state = SharedState::new(Mutex::new(HostState {
            files,
            ..HostState::default()
        }));
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
    state.lock().expect("state lock").phase = Phase::Ended;
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
                    Arrival::Files(..) => continue,
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
                checkpoints: member.join.checkpoints.clone(),
                link: member.join.link,
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
    state.phase = Phase::Running;
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
    /// It asks for files; the session's first request.
    Files(Connection, (SendStream, RecvStream, files::FileRequest)),
}

/// Proves the token both ways, then reads the node's report, or answers `pp ctl`, or serves
/// files.
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
            ToHost::Join(_) if state.lock().expect("state lock").phase != Phase::Forming => {
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
            ToHost::File(request) => {
                return Some(Arrival::Files(connection, (send, recv, request)));
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
    // The limit is on proving the token and the first request, not on what follows.
    match tokio::time::timeout(Duration::from_secs(10), arrival).await {
        Ok(Some(Arrival::Files(connection, first))) => {
            let shared = move || state.lock().expect("state lock").files.clone();
            files::serve(connection, first, shared).await;
        }
        Ok(Some(arrival)) => {
            let _ = admitted.send(arrival);
        }
        _ => {}
    }
}

/// Carries out a `pp ctl` request.
fn answer(request: ControlRequest, from: SocketAddr, state: &SharedState) -> ControlReply {
    let state = state.lock().expect("state lock");
    let event = match request {
        ControlRequest::Status => {
            return ControlReply::Status(GroupStatus {
                phase: state.phase,
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
