//! Ranks that live in one process (threads), each with a mailbox the others deliver into.

use std::sync::Arc;
use std::time::Duration;

use crate::mailbox::Mailbox;
use crate::{Tag, TensorMessage, Transport, TransportError};

/// Builds the connected endpoints of an in-process group.
pub struct InProcessHub;

impl InProcessHub {
    /// Creates `world_size` connected endpoints, one per rank, in rank order.
    pub fn connect(world_size: usize) -> Vec<InProcessTransport> {
        let mailboxes: Vec<Arc<Mailbox>> = (0..world_size)
            .map(|_| Arc::new(Mailbox::new(world_size)))
            .collect();
        (0..world_size)
            .map(|rank| InProcessTransport {
                rank,
                mailboxes: mailboxes.clone(),
            })
            .collect()
    }
}

/// One rank's endpoint of an in-process group.
pub struct InProcessTransport {
    rank: usize,
    /// Every rank's mailbox, by rank.
    mailboxes: Vec<Arc<Mailbox>>,
}

impl InProcessTransport {
    fn check_rank(&self, rank: usize) -> Result<(), TransportError> {
        if rank < self.mailboxes.len() {
            Ok(())
        } else {
            Err(TransportError::UnknownRank {
                rank,
                world_size: self.mailboxes.len(),
            })
        }
    }
}

impl Transport for InProcessTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.mailboxes.len()
    }

    fn send(&self, to: usize, message: TensorMessage) -> Result<(), TransportError> {
        self.check_rank(to)?;
        // A rank that left marked itself lost in its own mailbox: nothing reaches it.
        if self.mailboxes[to].is_lost(to) {
            return Err(TransportError::PeerLost { rank: to });
        }
        self.mailboxes[to].put(self.rank, message);
        Ok(())
    }

    fn recv(
        &self,
        from: usize,
        tag: Tag,
        timeout: Duration,
    ) -> Result<TensorMessage, TransportError> {
        self.check_rank(from)?;
        self.mailboxes[self.rank].take(from, tag, timeout)
    }
}

impl Drop for InProcessTransport {
    /// The rank leaves: nothing more reaches it, and ranks waiting for it are told.
    fn drop(&mut self) {
        for mailbox in &self.mailboxes {
            mailbox.mark_lost(self.rank);
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
