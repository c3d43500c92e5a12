//! A per-region circuit breaker, as a pure state machine: every call takes
//! `now`, so tests drive it without clocks or sleeps.
//!
//! - **Closed**: utterances go to the region. `failures` consecutive
//!   failures (transport errors, timeouts, `busy` and other retryable
//!   answers) open it.
//! - **Open**: the region is skipped without dialling, so a dead region
//!   costs other utterances nothing. After `open_for` it turns half-open.
//! - **Half-open**: one utterance (the probe) is let through; its success
//!   closes the breaker, its failure opens it again for another `open_for`.
//!   Others skip the region while the probe is out.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The value of the `earshot_edge_region_breaker` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    /// When the breaker last opened; `None` while closed.
    opened_at: Option<Instant>,
    /// A half-open probe is out.
    probing: bool,
}

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Breaker {
            threshold: threshold.max(1),
            open_for,
            failures: 0,
            opened_at: None,
            probing: false,
        }
    }

    pub fn state(&self, now: Instant) -> State {
        match self.opened_at {
            None => State::Closed,
            Some(at) if now.saturating_duration_since(at) >= self.open_for => State::HalfOpen,
            Some(_) => State::Open,
        }
    }

    /// Whether an utterance may go to the region now. A `true` in the
    /// half-open state makes that utterance the probe.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen if self.probing => false,
            State::HalfOpen => {
                self.probing = true;
                true
            }
        }
    }

    /// When an open breaker lets its next probe through; `None` if it
    /// would let one through now (closed, or half-open with no probe out).
    pub fn retry_at(&self, now: Instant) -> Option<Instant> {
        match self.state(now) {
            State::Closed => None,
            State::HalfOpen if !self.probing => None,
            // A probe is out: its answer decides; look again shortly.
            State::HalfOpen => Some(now + self.open_for / 4),
            State::Open => self.opened_at.map(|at| at + self.open_for),
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.opened_at = None;
        self.probing = false;
    }

    /// Counts a failure; returns whether this failure opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        let was = self.state(now);
        self.probing = false;
        self.failures = self.failures.saturating_add(1);
        match was {
            State::HalfOpen => {
                self.opened_at = Some(now);
                true
            }
            State::Closed if self.failures >= self.threshold => {
                self.opened_at = Some(now);
                true
            }
            // Failures of utterances sent before it opened change nothing.
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: Duration = Duration::from_millis(500);

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let t = Instant::now();
        let mut b = Breaker::new(2, OPEN);
        assert!(!b.failure(t));
        b.success();
        assert!(!b.failure(t));
        assert_eq!(b.state(t), State::Closed);
        assert!(b.failure(t));
        assert_eq!(b.state(t), State::Open);
        assert!(!b.allow(t + Duration::from_millis(499)));
        assert_eq!(b.retry_at(t), Some(t + OPEN));
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.failure(t);
        let later = t + OPEN;
        assert_eq!(b.state(later), State::HalfOpen);
        assert_eq!(b.retry_at(later), None);
        assert!(b.allow(later), "the probe");
        assert!(
            !b.allow(later),
            "no second utterance while the probe is out"
        );
        assert!(b.retry_at(later).is_some());
        b.success();
        assert_eq!(b.state(later), State::Closed);
        assert!(b.allow(later));
    }

    #[test]
    fn a_failed_probe_opens_it_for_another_period() {
        let t = Instant::now();
        let mut b = Breaker::new(3, OPEN);
        for _ in 0..3 {
            b.failure(t);
        }
        let probe_at = t + OPEN + Duration::from_millis(10);
        assert!(b.allow(probe_at));
        assert!(b.failure(probe_at), "a failed probe reopens");
        assert_eq!(b.state(probe_at + OPEN / 2), State::Open);
        assert_eq!(b.state(probe_at + OPEN), State::HalfOpen);
    }

    #[test]
    fn late_failures_of_an_open_breaker_do_not_extend_it() {
        let t = Instant::now();
        let mut b = Breaker::new(1, OPEN);
        b.failure(t);
        // In-flight utterances to the dead region fail after it opened.
        assert!(!b.failure(t + Duration::from_millis(300)));
        assert_eq!(b.state(t + OPEN), State::HalfOpen);
    }

    #[test]
    fn gauge_values_are_ordered_by_severity() {
        assert!(State::Closed.gauge() < State::HalfOpen.gauge());
        assert!(State::HalfOpen.gauge() < State::Open.gauge());
    }
}
