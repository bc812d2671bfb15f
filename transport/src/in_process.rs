//! Ranks that live in one process (threads), each with an inbox the others put messages in.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Tag, TensorMessage, Transport, TransportError};

/// Builds the connected endpoints of an in-process group.
pub struct InProcessHub;

impl InProcessHub {
    /// Creates `world_size` connected endpoints, one per rank, in rank order.
    pub fn connect(world_size: usize) -> Vec<InProcessTransport> {
        let inboxes: Vec<Arc<Inbox>> = (0..world_size)
            .map(|_| {
                Arc::new(Inbox {
                    state: Mutex::new(InboxState {
                        messages: HashMap::new(),
                        open: true,
                        senders: vec![true; world_size],
                    }),
                    arrived: Condvar::new(),
                })
            })
            .collect();
        (0..world_size)
            .map(|rank| InProcessTransport {
                rank,
                inboxes: inboxes.clone(),
            })
            .collect()
    }
}

/// One rank's messages, by sender and tag; any thread of the rank may wait on it.
struct Inbox {
    state: Mutex<InboxState>,
    arrived: Condvar,
}

struct InboxState {
    messages: HashMap<(usize, Tag), TensorMessage>,
    /// The owning rank is still there to receive.
    open: bool,
    /// Which senders are still there, by rank.
    senders: Vec<bool>,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        // A panicking rank poisons nothing the map's consistency depends on.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One rank's endpoint of an in-process group.
pub struct InProcessTransport {
    rank: usize,
    /// Every rank's inbox, by rank.
    inboxes: Vec<Arc<Inbox>>,
}

impl InProcessTransport {
    fn check_rank(&self, rank: usize) -> Result<(), TransportError> {
        if rank < self.inboxes.len() {
            Ok(())
        } else {
            Err(TransportError::UnknownRank {
                rank,
                world_size: self.inboxes.len(),
            })
        }
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.inboxes.len()
    }

    fn send(&self, to: usize, message: TensorMessage) -> Result<(), TransportError> {
        self.check_rank(to)?;
        let inbox = &self.inboxes[to];
        let mut state = inbox.lock();
        if !state.open {
            return Err(TransportError::PeerLost { rank: to });
        }
        state.messages.insert((self.rank, message.tag), message);
        inbox.arrived.notify_all();
        Ok(())
    }

    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
    ) -> Result<TensorMessage, TransportError> {
        self.check_rank(from)?;
        let inbox = &self.inboxes[self.rank];
        let deadline = Instant::now() + timeout;
        let mut state = inbox.lock();
        loop {
            if let Some(message) = state.messages.remove(&(from, tag)) {
                return Ok(message);
            }
            if !state.senders[from] {
                return Err(TransportError::PeerLost { rank: from });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TransportError::Timeout {
                    tag,
                    rank: from,
                    timeout,
                });
            }
            state = inbox
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for InProcessTransport {
    /// The rank leaves: nothing more reaches it, and ranks waiting for it are told.
    fn drop(&mut self) {
        self.inboxes[self.rank].lock().open = false;
        for (rank, inbox) in self.inboxes.iter().enumerate() {
            if rank != self.rank {
                inbox.lock().senders[self.rank] = false;
                inbox.arrived.notify_all();
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
