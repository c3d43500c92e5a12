//! The one retry policy: jittered exponential backoff.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Delays for successive retries: `base * 2^n`, capped at `max`, each
/// multiplied by a random factor in [0.5, 1.0) so that many clients retrying
/// at once spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next retry.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(16));
        self.attempt = self.attempt.saturating_add(1);
        let capped = exp.min(self.max);
        capped.mul_f64(0.5 + 0.5 * unit_random())
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A random number in [0, 1) from the standard library's per-process
/// random hash keys; plenty for jitter.
fn unit_random() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        let bounds = [100, 200, 400, 800, 1000, 1000];
        for (d, hi) in delays.iter().zip(bounds) {
            let hi = Duration::from_millis(hi);
            assert!(
                *d >= hi / 2 && *d < hi,
                "{d:?} not in [{:?}, {hi:?})",
                hi / 2
            );
        }
        b.reset();
        assert!(b.next_delay() < Duration::from_millis(100));
    }
}
