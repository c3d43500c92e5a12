//! When a session must end for want of input or for its age: pure, with
//! `now` passed in, so the IO loop only sleeps until [`SessionClock::deadline`].
//!
//! The idle timer restarts only on what shows the client is still
//! talking to us: audio and `keepalive` messages. WebSocket pings (which
//! most client libraries send on their own) and other frames do not, so a
//! client that only pings is closed like one that sends nothing. A frame
//! trickled in byte by byte (slow-loris) counts only once it is whole.
//! While the client is owed finals (or reading is paused for
//! backpressure) it cannot be idle: the IO loop passes `paused`, and
//! [`SessionClock::resume`] restarts the timer at each final delivered.

use std::time::Duration;

use tokio::time::Instant;

/// Why a session's time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No audio or `keepalive` for the idle timeout.
    Idle,
    /// Open for the maximum session length.
    TooLong,
}

#[derive(Debug, Clone)]
pub struct SessionClock {
    idle: Duration,
    max_length: Duration,
    started: Instant,
    last_input: Instant,
}

impl SessionClock {
    pub fn new(now: Instant, idle: Duration, max_length: Duration) -> Self {
        SessionClock {
            idle,
            max_length,
            started: now,
            last_input: now,
        }
    }

    /// Audio or a `keepalive` arrived.
    pub fn input(&mut self, now: Instant) {
        self.last_input = self.last_input.max(now);
    }

    /// A final was delivered: the client's idle time starts again.
    pub fn resume(&mut self, now: Instant) {
        self.input(now);
    }

    /// The next instant at which [`SessionClock::expired`] can change.
    /// While `paused` (finals are owed to the client) it cannot be idle,
    /// so only the age limit counts.
    pub fn deadline(&self, paused: bool) -> Instant {
        let end = self.started + self.max_length;
        if paused {
            end
        } else {
            (self.last_input + self.idle).min(end)
        }
    }

    /// Whether the session's time is up at `now`, and why. Age wins over
    /// idleness when both are due.
    pub fn expired(&self, now: Instant, paused: bool) -> Option<Expiry> {
        if now >= self.started + self.max_length {
            Some(Expiry::TooLong)
        } else if !paused && now >= self.last_input + self.idle {
            Some(Expiry::Idle)
        } else {
            None
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle
    }

    pub fn max_length(&self) -> Duration {
        self.max_length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn clock(t0: Instant) -> SessionClock {
        SessionClock::new(t0, 10 * S, 60 * S)
    }

    #[test]
    fn a_silent_client_expires_after_the_idle_timeout() {
        let t0 = Instant::now();
        let c = clock(t0);
        assert_eq!(c.deadline(false), t0 + 10 * S);
        assert_eq!(c.expired(t0 + 9 * S, false), None);
        assert_eq!(c.expired(t0 + 10 * S, false), Some(Expiry::Idle));
    }

    #[test]
    fn audio_and_keepalive_restart_the_idle_timer_nothing_else_does() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        // Audio every 5 s keeps it open; the session does not look at pings
        // at all, so a client that only pings is `a_silent_client`.
        for k in 1..=10 {
            c.input(t0 + k * 5 * S);
            assert_eq!(
                c.expired(t0 + k * 5 * S + 9 * S, false),
                None,
                "after input {k}"
            );
        }
        assert_eq!(
            c.deadline(false),
            t0 + 60 * S,
            "the age limit comes first now"
        );
        // An input stamped earlier than one already seen changes nothing.
        c.input(t0);
        assert_eq!(c.deadline(false), t0 + 60 * S);
    }

    #[test]
    fn a_busy_session_still_ends_at_its_maximum_length() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        for k in 0..120 {
            c.input(t0 + k * S / 2);
        }
        assert_eq!(c.expired(t0 + 59 * S + S / 2, false), None);
        assert_eq!(c.expired(t0 + 60 * S, false), Some(Expiry::TooLong));
        // Idle and too long at once: too long is the reason given.
        let c = SessionClock::new(t0, 10 * S, 10 * S);
        assert_eq!(c.expired(t0 + 10 * S, false), Some(Expiry::TooLong));
    }

    #[test]
    fn a_client_owed_finals_is_not_idle_until_the_last_one() {
        let t0 = Instant::now();
        let mut c = clock(t0);
        c.input(t0 + S);
        // From 1 s to 30 s the client waits for finals it is owed.
        assert_eq!(c.expired(t0 + 29 * S, true), None, "owed: not idle");
        assert_eq!(c.deadline(true), t0 + 60 * S);
        assert_eq!(
            c.expired(t0 + 60 * S, true),
            Some(Expiry::TooLong),
            "age counts"
        );
        // The last final arrives at 30 s: idle from there.
        c.resume(t0 + 30 * S);
        assert_eq!(c.expired(t0 + 39 * S, false), None);
        assert_eq!(c.expired(t0 + 40 * S, false), Some(Expiry::Idle));
    }
}
