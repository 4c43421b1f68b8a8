//! Reconnect delays: exponential backoff with jitter, so a fleet that lost its hub does not
//! come back in lock step.

use std::time::Duration;

/// Exponential backoff: `initial * 2^attempt`, capped at `max`, each delay drawn uniformly from
/// its upper half ("equal jitter": never zero, never above the cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max);
        let half = base / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_capped_and_jitter() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for attempt in 0..40 {
            let d = b.delay(attempt);
            let base = Duration::from_millis(100)
                .saturating_mul(1 << attempt.min(20))
                .min(b.max);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d:?} vs {base:?}"
            );
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| b.delay(5)).collect();
        assert!(samples.len() > 1, "no jitter");
    }
}
