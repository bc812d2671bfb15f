//! Ranks that live in one process (threads), connected by channels.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Tag, TensorMessage, Transport, TransportError};

/// Builds the connected endpoints of an in-process group.
pub struct InProcessHub;

impl InProcessHub {
    /// Creates `world_size` connected endpoints, one per rank, in rank order.
    pub fn connect(world_size: usize) -> Vec<InProcessTransport> {
        // One channel per ordered pair (from, to), so a receiver waits on exactly one sender.
        let mut senders: Vec<Vec<Option<Sender<TensorMessage>>>> =
            (0..world_size).map(|_| vec![None; world_size]).collect();
        let mut receivers: Vec<Vec<Option<Receiver<TensorMessage>>>> = (0..world_size)
            .map(|_| (0..world_size).map(|_| None).collect())
            .collect();
        for from in 0..world_size {
            for to in 0..world_size {
                let (tx, rx) = mpsc::channel();
                senders[from][to] = Some(tx);
                receivers[to][from] = Some(rx);
            }
        }
        senders
            .into_iter()
            .zip(receivers)
            .enumerate()
            .map(|(rank, (tx, rx))| InProcessTransport {
                rank,
                senders: tx.into_iter().flatten().collect(),
                inboxes: rx
                    .into_iter()
                    .flatten()
                    .map(|rx| {
                        Mutex::new(Inbox {
                            channel: rx,
                            early: HashMap::new(),
                        })
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Messages from one peer: the channel, and those that arrived before they were asked for.
struct Inbox {
    channel: Receiver<TensorMessage>,
    early: HashMap<Tag, TensorMessage>,
}

/// One rank's endpoint of an in-process group.
pub struct InProcessTransport {
    rank: usize,
    senders: Vec<Sender<TensorMessage>>,
    inboxes: Vec<Mutex<Inbox>>,
}

impl InProcessTransport {
    fn check_rank(&self, rank: usize) -> Result<(), TransportError> {
        if rank < self.senders.len() {
            Ok(())
        } else {
            Err(TransportError::UnknownRank {
                rank,
                world_size: self.senders.len(),
            })
        }
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.senders.len()
    }

    fn send(&self, to: usize, message: TensorMessage) -> Result<(), TransportError> {
        self.check_rank(to)?;
        self.senders[to]
            .send(message)
            .map_err(|_| TransportError::PeerLost { rank: to })
    }

    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
    ) -> Result<TensorMessage, TransportError> {
        self.check_rank(from)?;
        let mut inbox = self.inboxes[from]
            .lock()
            .map_err(|_| TransportError::PeerLost { rank: from })?;
        if let Some(message) = inbox.early.remove(&tag) {
            return Ok(message);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match inbox.channel.recv_timeout(left) {
                Ok(message) if message.tag == tag => return Ok(message),
                Ok(message) => {
                    inbox.early.insert(message.tag, message);
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(TransportError::Timeout {
                        tag,
                        rank: from,
                        timeout,
                    })
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(TransportError::PeerLost { rank: from })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    fn message(microbatch: u32, kind: Kind, value: f32) -> TensorMessage {
        TensorMessage {
            tag: Tag {
                step: 0,
                microbatch,
                stage: 1,
                kind,
            },
            shape: vec![2],
            values: vec![value, -value],
        }
    }

    #[test]
    fn out_of_order_messages_reach_the_right_receive() {
        let mut ranks = InProcessHub::connect(2);
        let second = ranks.pop().unwrap();
        let first = ranks.pop().unwrap();
        first.send(1, message(0, Kind::Activation, 1.0)).unwrap();
        first.send(1, message(1, Kind::Activation, 2.0)).unwrap();
        let wait = Duration::from_secs(1);
        let got = second
            .recv(0, message(1, Kind::Activation, 0.0).tag, wait)
            .unwrap();
        assert_eq!(got.values, vec![2.0, -2.0]);
        let got = second
            .recv(0, message(0, Kind::Activation, 0.0).tag, wait)
            .unwrap();
        assert_eq!(got.values, vec![1.0, -1.0]);
    }

    #[test]
    fn a_dropped_peer_is_reported_not_awaited() {
        let mut ranks = InProcessHub::connect(2);
        let second = ranks.pop().unwrap();
        drop(ranks);
        let err = second
            .recv(
                0,
                message(0, Kind::Gradient, 0.0).tag,
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert!(matches!(err, TransportError::PeerLost { rank: 0 }), "{err}");
    }

    #[test]
    fn a_missing_message_times_out() {
        let ranks = InProcessHub::connect(2);
        let err = ranks[1]
            .recv(
                0,
                message(0, Kind::Gradient, 0.0).tag,
                Duration::from_millis(20),
            )
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Timeout { rank: 0, .. }),
            "{err}"
        );
    }
}
