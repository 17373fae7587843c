//! The sliding window of a transfer, sans-IO: which chunk to send next, what
//! is in flight, what to retransmit and when to give up. Time is an
//! argument; the caller owns the clock and the sockets.
//!
//! The same machine drives both directions: in a push, "in flight" means
//! sent and not yet acknowledged by the receiver; in a pull, requested and
//! not yet arrived intact.
//!
//! Invariants: at most `limit` chunks are in flight; a chunk is in at most
//! one of {queued, in flight, done}; a NACKed chunk is resent before any new
//! chunk; a chunk that fails more than `max_retries` times aborts the
//! transfer with its index and the last reason.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk {index} failed {attempts} times (last: {reason}); giving up")]
pub struct WindowError {
    pub index: u32,
    pub attempts: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Copy)]
struct Flight {
    sent_at: Instant,
    failures: u32,
}

/// Sliding-window state of one transfer.
#[derive(Debug)]
pub struct Window {
    limit: usize,
    timeout: Duration,
    max_retries: u32,
    /// Never sent yet, in order.
    fresh: VecDeque<u32>,
    /// To resend first (NACK or timeout), with their failure counts.
    retry: VecDeque<(u32, u32)>,
    in_flight: BTreeMap<u32, Flight>,
    done: usize,
    total: usize,
    /// Chunks sent more than once.
    pub retransmissions: u32,
}

impl Window {
    pub fn new(chunks: impl IntoIterator<Item = u32>, limit: u32, timeout: Duration, max_retries: u32) -> Window {
        let fresh: VecDeque<u32> = chunks.into_iter().collect();
        let total = fresh.len();
        Window {
            limit: limit.max(1) as usize,
            timeout,
            max_retries,
            fresh,
            retry: VecDeque::new(),
            in_flight: BTreeMap::new(),
            done: 0,
            total,
            retransmissions: 0,
        }
    }

    /// The next chunk to put on the wire, if the window has room. The
    /// chunk is counted in flight from `now`.
    pub fn next_to_send(&mut self, now: Instant) -> Option<u32> {
        if self.in_flight.len() >= self.limit {
            return None;
        }
        let (index, failures) = if let Some(r) = self.retry.pop_front() {
            self.retransmissions += 1;
            r
        } else {
            (self.fresh.pop_front()?, 0)
        };
        self.in_flight.insert(index, Flight { sent_at: now, failures });
        Some(index)
    }

    /// `index` was put on the wire at `at`, before the receiver said which
    /// chunks it needs (PROTOCOL.md 8.3, EAGER): in flight from then on if
    /// it is still to send, else ignored (returns false). It may take the
    /// window over its limit; no new chunk goes out until it is back under.
    pub fn sent_early(&mut self, index: u32, at: Instant) -> bool {
        let Some(i) = self.fresh.iter().position(|&f| f == index) else { return false };
        self.fresh.remove(i);
        self.in_flight.insert(index, Flight { sent_at: at, failures: 0 });
        true
    }

    /// The receiver has the chunk. Unknown or repeated acks are ignored
    /// (returns false).
    pub fn on_ack(&mut self, index: u32) -> bool {
        if self.in_flight.remove(&index).is_some() {
            self.done += 1;
            true
        } else {
            false
        }
    }

    /// The chunk arrived damaged or was refused: resend it at once, unless
    /// it has failed too often.
    pub fn on_nack(&mut self, index: u32, reason: &str) -> Result<(), WindowError> {
        let Some(flight) = self.in_flight.remove(&index) else { return Ok(()) };
        self.requeue(index, flight.failures + 1, reason)
    }

    fn requeue(&mut self, index: u32, failures: u32, reason: &str) -> Result<(), WindowError> {
        if failures > self.max_retries {
            return Err(WindowError { index, attempts: failures, reason: reason.to_string() });
        }
        self.retry.push_back((index, failures));
        Ok(())
    }

    /// Requeue every chunk in flight for longer than the timeout.
    pub fn check_timeouts(&mut self, now: Instant) -> Result<(), WindowError> {
        let expired: Vec<(u32, Flight)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.sent_at) >= self.timeout)
            .map(|(i, f)| (*i, *f))
            .collect();
        for (index, flight) in expired {
            self.in_flight.remove(&index);
            self.requeue(index, flight.failures + 1, &format!("no acknowledgement within {:?}", self.timeout))?;
        }
        Ok(())
    }

    /// When the oldest chunk in flight times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.in_flight.values().map(|f| f.sent_at + self.timeout).min()
    }

    pub fn is_done(&self) -> bool {
        self.done == self.total
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn done(&self) -> usize {
        self.done
    }

    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut Window, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| w.next_to_send(now)).collect()
    }

    #[test]
    fn never_more_than_the_window_in_flight() {
        let t0 = Instant::now();
        let mut w = Window::new(0..10, 4, Duration::from_secs(10), 3);
        assert_eq!(drain(&mut w, t0), vec![0, 1, 2, 3]);
        assert!(w.on_ack(1));
        assert_eq!(drain(&mut w, t0), vec![4]);
        assert!(!w.on_ack(1), "a repeated ack changes nothing");
        assert_eq!(w.in_flight(), 4);
    }

    #[test]
    fn nack_is_resent_before_new_chunks() {
        let t0 = Instant::now();
        let mut w = Window::new(0..10, 3, Duration::from_secs(10), 3);
        drain(&mut w, t0);
        w.on_nack(1, "HASH_MISMATCH").unwrap();
        assert_eq!(w.next_to_send(t0), Some(1));
        assert_eq!(w.retransmissions, 1);
        w.on_ack(0);
        assert_eq!(w.next_to_send(t0), Some(3));
    }

    #[test]
    fn timeout_requeues_and_deadline_is_the_oldest() {
        let t0 = Instant::now();
        let mut w = Window::new(0..3, 8, Duration::from_secs(5), 3);
        w.next_to_send(t0);
        w.next_to_send(t0 + Duration::from_secs(2));
        assert_eq!(w.next_deadline(), Some(t0 + Duration::from_secs(5)));
        w.check_timeouts(t0 + Duration::from_secs(6)).unwrap();
        assert_eq!(w.in_flight(), 1);
        assert_eq!(w.next_to_send(t0 + Duration::from_secs(6)), Some(0));
    }

    #[test]
    fn gives_up_after_max_retries_naming_the_chunk() {
        let t0 = Instant::now();
        let mut w = Window::new([7], 1, Duration::from_secs(5), 2);
        for _ in 0..2 {
            assert_eq!(w.next_to_send(t0), Some(7));
            w.on_nack(7, "HASH_MISMATCH").unwrap();
        }
        assert_eq!(w.next_to_send(t0), Some(7));
        let err = w.on_nack(7, "HASH_MISMATCH").unwrap_err();
        assert_eq!(err.index, 7);
        assert_eq!(err.attempts, 3);
        assert!(err.to_string().contains("HASH_MISMATCH"));
    }

    #[test]
    fn completes_when_every_chunk_is_acked_in_any_order() {
        let t0 = Instant::now();
        let mut w = Window::new(0..5, 5, Duration::from_secs(5), 3);
        drain(&mut w, t0);
        for i in [4, 2, 0, 3, 1] {
            assert!(!w.is_done());
            w.on_ack(i);
        }
        assert!(w.is_done());
        assert_eq!(w.next_to_send(t0), None);
    }

    #[test]
    fn chunks_sent_early_are_in_flight_and_the_rest_waits_for_room() {
        let t0 = Instant::now();
        let mut w = Window::new([0, 2], 1, Duration::from_secs(30), 3);
        // Sent 0, 1 and 2 before NEED said 0 and 2: 1 is not tracked.
        assert!(w.sent_early(0, t0));
        assert!(!w.sent_early(1, t0));
        assert!(w.sent_early(2, t0));
        assert_eq!(w.in_flight(), 2);
        assert_eq!(w.next_to_send(t0), None, "nothing is left to send, and the window is over its limit");
        assert_eq!(w.next_deadline(), Some(t0 + Duration::from_secs(30)));
        w.on_nack(2, "HASH_MISMATCH").unwrap();
        assert_eq!(w.next_to_send(t0), None, "the window is still full");
        assert!(w.on_ack(0));
        assert_eq!(w.next_to_send(t0), Some(2));
        assert!(w.on_ack(2));
        assert!(w.is_done());
        assert_eq!(w.retransmissions, 1);
    }

    #[test]
    fn empty_transfer_is_done_at_once() {
        assert!(Window::new([], 4, Duration::from_secs(1), 1).is_done());
    }
}
