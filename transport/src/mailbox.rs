//! A rank's incoming messages, by sender and tag, that any of its threads may wait on: the
//! in-process and QUIC transports both deliver into one.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::{Tag, TensorMessage, TransportError};

/// Messages that arrived and have not been asked for yet, and which senders are gone.
pub(crate) struct Mailbox {
    state: Mutex<State>,
    arrived: Condvar,
}

struct State {
    messages: HashMap<(usize, Tag), TensorMessage>,
    /// Senders that can send no more, by rank.
    lost: Vec<bool>,
}

impl Mailbox {
    /// An empty mailbox for a group of `world_size` ranks.
    pub(crate) fn new(world_size: usize) -> Self {
        Self {
            state: Mutex::new(State {
                messages: HashMap::new(),
                lost: vec![false; world_size],
            }),
            arrived: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking thread leaves the map consistent: each change is one insert or remove.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Delivers `message` from rank `from`.
    pub(crate) fn put(&self, from: usize, message: TensorMessage) {
        self.lock().messages.insert((from, message.tag), message);
        self.arrived.notify_all();
    }

    /// Rank `rank` can send no more; those waiting for it are told.
    pub(crate) fn mark_lost(&self, rank: usize) {
        self.lock().lost[rank] = true;
        self.arrived.notify_all();
    }

    /// Whether rank `rank` is gone.
    pub(crate) fn is_lost(&self, rank: usize) -> bool {
        self.lock().lost[rank]
    }

    /// The message with `tag` from `from`, waiting at most `timeout`; messages that arrived
    /// before a sender was lost are still delivered.
    pub(crate) fn take(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
    ) -> Result<TensorMessage, TransportError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(message) = state.messages.remove(&(from, tag)) {
                return Ok(message);
            }
            if state.lost[from] {
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
            state = self
                .arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
    }
}
