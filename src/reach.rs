//! What this node last learned about reaching each partner, so that a
//! partner found unreachable is not waited for again by every request.
//!
//! Without it, each request to a partner whose daemon is down waits for
//! its own connection attempt to time out: an `ls` of a mount made a
//! handful of calls at 2 s each, a create's push waited 10 s for a
//! connection, and its `fsync` as long again, though the answer (cached
//! listing, change queued) was known after the first failure.
//!
//! The rule ([`Reach::connect`]):
//! - a connection attempt that fails marks the partner unreachable;
//!   one that succeeds (anyone's) clears the mark;
//! - a request ([`Attempt::Request`]) to a partner marked unreachable
//!   fails at once, without sending anything, while the mark is younger
//!   than [`HOLD_OFF`] or another attempt to reach it is under way;
//! - background loops that reconnect (a mount's watch, the write-back
//!   queue's retries) connect with [`Attempt::Probe`], which always
//!   tries: they are what notices the partner is back, and each failure
//!   of theirs renews the mark.
//!
//! Only a failure to connect marks a partner: a request that is slow on a
//! connection that works (a slow link) marks nothing.

use crate::config::PartnerConfig;
use crate::transport::{Endpoint, TransportError};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long after a failed attempt requests fail at once, when no other
/// attempt is under way: past it, a request tries for itself (a partner
/// no background loop probes is not given up on).
pub const HOLD_OFF: Duration = Duration::from_secs(10);

/// Who connects: see the module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// A request that has an answer without the partner (a cached
    /// listing, a queued change): it does not wait for a partner known
    /// to be unreachable.
    Request,
    /// A background loop finding out whether the partner is back.
    Probe,
}

#[derive(Default)]
struct Seen {
    /// The last failed attempt and why, until one succeeds.
    failed: Option<(Instant, String)>,
    /// Attempts under way.
    trying: u32,
}

impl Seen {
    /// See [`Reach::held_off`].
    fn held_off(&self) -> Option<(Duration, String)> {
        let (at, why) = self.failed.as_ref()?;
        let ago = at.elapsed();
        (ago < HOLD_OFF || self.trying > 0).then(|| (ago, why.clone()))
    }
}

/// Per partner: see the module.
#[derive(Default)]
pub struct Reach {
    partners: Mutex<HashMap<String, Seen>>,
}

/// Counts an attempt as under way until dropped (also when its future
/// is dropped by a timeout).
struct Trying<'a> {
    reach: &'a Reach,
    partner: &'a str,
}

impl Drop for Trying<'_> {
    fn drop(&mut self) {
        if let Some(seen) = self.reach.lock().get_mut(self.partner) {
            seen.trying = seen.trying.saturating_sub(1);
        }
    }
}

impl Reach {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
        self.partners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why a request to `partner` should not try now, if it should not:
    /// how long ago the last attempt failed, and why.
    pub fn held_off(&self, partner: &str) -> Option<(Duration, String)> {
        self.lock().get(partner).and_then(Seen::held_off)
    }

    /// An attempt to reach `partner` failed (`why`), whoever made it.
    pub fn failed(&self, partner: &str, why: &str) {
        self.lock().entry(partner.to_string()).or_default().failed = Some((Instant::now(), why.to_string()));
    }

    /// `partner` answered.
    pub fn reached(&self, partner: &str) {
        if let Some(seen) = self.lock().get_mut(partner) {
            seen.failed = None;
        }
    }

    fn start(&self, partner: &str, attempt: Attempt) -> Result<(), TransportError> {
        let mut partners = self.lock();
        let seen = partners.entry(partner.to_string()).or_default();
        if attempt == Attempt::Request {
            if let Some((ago, why)) = seen.held_off() {
                let why = format!("an attempt {} s ago failed ({why}); deftfs tries again in the background", ago.as_secs());
                return Err(TransportError::Unreachable { partner: partner.to_string(), why });
            }
        }
        seen.trying += 1;
        Ok(())
    }

    /// Connect to `partner` through `endpoint`, unless it is held off
    /// (see the module); the outcome is recorded. A caller that gives up
    /// on the attempt (a timeout around this future) records that itself
    /// with [`Reach::failed`].
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        partner: &PartnerConfig,
        attempt: Attempt,
    ) -> Result<(quinn::Connection, Vec<u8>), TransportError> {
        let id = partner.id.as_str();
        self.start(id, attempt)?;
        let _trying = Trying { reach: self, partner: id };
        match endpoint.connect(partner).await {
            Ok(c) => {
                self.reached(id);
                Ok(c)
            }
            Err(e) => {
                let why = match &e {
                    TransportError::Connect { detail, .. } => detail.clone(),
                    other => other.to_string(),
                };
                self.failed(id, &why);
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_holds_requests_off_until_a_success_and_probes_always_try() {
        let r = Reach::default();
        assert!(r.held_off("bob").is_none());
        assert!(r.start("bob", Attempt::Request).is_ok(), "never tried: requests try");
        drop(Trying { reach: &r, partner: "bob" });
        r.failed("bob", "no answer within 10 s");
        assert!(r.held_off("bob").is_some());
        let e = r.start("bob", Attempt::Request).unwrap_err().to_string();
        assert!(e.contains("bob") && e.contains("no answer within 10 s") && e.contains("background"), "{e}");
        assert!(r.held_off("carol").is_none(), "one partner's failure holds no other off");
        assert!(r.start("bob", Attempt::Probe).is_ok(), "a probe tries while held off");
        let probing = Trying { reach: &r, partner: "bob" };
        r.reached("bob");
        assert!(r.lock()["bob"].failed.is_none() && r.held_off("bob").is_none());
        drop(probing);
        assert_eq!(r.lock()["bob"].trying, 0, "an attempt dropped is no longer under way");
    }

    #[test]
    fn past_the_hold_off_a_request_tries_unless_another_attempt_is_under_way() {
        let r = Reach::default();
        r.failed("bob", "refused");
        r.lock().get_mut("bob").unwrap().failed.as_mut().unwrap().0 = Instant::now() - HOLD_OFF - Duration::from_secs(1);
        assert!(r.held_off("bob").is_none());
        assert!(r.start("bob", Attempt::Probe).is_ok());
        let probing = Trying { reach: &r, partner: "bob" };
        assert!(r.held_off("bob").is_some(), "a probe under way holds requests off past the hold-off");
        assert!(r.start("bob", Attempt::Request).is_err());
        drop(probing);
        assert!(r.start("bob", Attempt::Request).is_ok(), "no attempt under way: a request tries itself");
    }
}
