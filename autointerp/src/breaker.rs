//! The run's circuit breaker: once [`GIVE_UP_AFTER`] requests in a row have failed for good
//! (retries exhausted, or refused with 401, 403 or 404), nothing more can be expected of the
//! endpoint. The breaker then trips: requests not yet sent fail at once, and requests waiting to
//! retry stop waiting, each with the reason, so a run ends quickly instead of retrying in silence.

use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::watch;

/// Requests failed for good in a row that stop a run.
pub const GIVE_UP_AFTER: u32 = 5;

/// Shared by every clone of a [`crate::client::Client`].
#[derive(Debug)]
pub struct Breaker {
    in_a_row: AtomicU32,
    /// Why the run stopped sending, once it has.
    stopped: watch::Sender<Option<String>>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker { in_a_row: AtomicU32::new(0), stopped: watch::channel(None).0 }
    }
}

impl Breaker {
    /// Why the run stopped sending (None while it has not).
    pub fn stopped(&self) -> Option<String> {
        self.stopped.borrow().clone()
    }

    /// A request was answered: the endpoint works.
    pub fn success(&self) {
        self.in_a_row.store(0, Ordering::Relaxed);
    }

    /// A request failed for good because of `why`. Returns the reason the run stops when this
    /// failure is the one that trips the breaker.
    pub fn failure(&self, why: &str) -> Option<String> {
        let n = self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        // Exactly one failure of a streak counts GIVE_UP_AFTER (the add is atomic): it trips the
        // breaker, so that a failure racing it on another task cannot name a longer streak.
        if n != GIVE_UP_AFTER {
            return None;
        }
        let reason =
            format!("the run stopped sending after {n} requests in a row failed for good (the last: {why})");
        let mut tripped = false;
        self.stopped.send_if_modified(|s| {
            tripped = s.is_none();
            if tripped {
                *s = Some(reason.clone());
            }
            tripped
        });
        tripped.then_some(reason)
    }

    /// Wait until the breaker trips; returns why.
    pub async fn tripped(&self) -> String {
        let mut rx = self.stopped.subscribe();
        let why = rx.wait_for(Option::is_some).await.map(|why| why.clone().unwrap_or_default());
        match why {
            Ok(why) => why,
            // The sender lives as long as `self`: never reached.
            Err(_) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trips_once_after_enough_failures_in_a_row() {
        let b = Breaker::default();
        for _ in 0..GIVE_UP_AFTER - 1 {
            assert!(b.failure("HTTP 500").is_none());
        }
        b.success();
        for _ in 0..GIVE_UP_AFTER - 1 {
            assert!(b.failure("HTTP 500").is_none());
        }
        assert!(b.stopped().is_none());
        let why = b.failure("HTTP 503").unwrap();
        assert!(why.contains("5 requests in a row") && why.contains("HTTP 503"), "{why}");
        assert!(b.failure("HTTP 500").is_none(), "reported once");
        assert_eq!(b.stopped(), Some(why));
    }
}
