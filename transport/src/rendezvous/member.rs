//! A node's side: joins the group (waiting for the host, and for a running group to form
//! again), then hears the group's events; and `pp ctl`'s one-shot requests.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use tokio::runtime::Runtime;

use super::{
    closed_reason, read_frame, write_frame, ControlReply, ControlRequest, Group, GroupEvent,
    NodeEvent, NodeJoin, RendezvousError, ToHost, ToNode, WAITING_NOTICE,
};
use crate::auth;

/// Asks the group hosted at `address` (with the cluster token) and returns its answer.
pub fn control(
    address: SocketAddr,
    token: &str,
    request: ControlRequest,
    timeout: Duration,
) -> Result<ControlReply, RendezvousError> {
    let link = |message: String| RendezvousError::Link { address, message };
    let (runtime, endpoint) = super::dialler(address)?;
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

/// Connects to the rendezvous host and proves the token, retrying until `deadline` while
/// nobody answers (nodes start in any order); `waiting` hears each retry.
pub(crate) async fn dial_host(
    endpoint: &Endpoint,
    address: SocketAddr,
    token: &str,
    deadline: Instant,
    waiting: &mut dyn FnMut(&str),
) -> Result<Connection, RendezvousError> {
    auth::dial(endpoint, address, token, 0, deadline, &mut || {
        // A new socket for the next attempt: in a sandbox seen on a GPU machine, a socket that
        // dialled a port nobody listened on never heard from that port later.
        if let Ok(socket) = std::net::UdpSocket::bind(("0.0.0.0", 0)) {
            let _ = endpoint.rebind(socket);
        }
        waiting(&format!("waiting for the rendezvous host at {address}"));
    })
    .await
    .map_err(|error| RendezvousError::Auth { address, error })
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
        let (runtime, endpoint) = super::dialler(address)?;
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
            let connection = runtime.block_on(dial_host(
                &endpoint,
                address,
                token,
                deadline,
                &mut |text| notice(text, true),
            ))?;
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
