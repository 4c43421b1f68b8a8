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
    /// `initial * 2^attempt`, capped at `max`.
    fn ceiling(&self, attempt: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max)
    }

    /// The delay before retry number `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.ceiling(attempt);
        let half = base / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// The delay before retry number `attempt` (0-based) with "full jitter": drawn uniformly
    /// from zero to the same capped exponential. For a crowd refused together (a fleet told
    /// CONNACK 3, server unavailable, by a hub over its connect rate): their retries spread
    /// over the whole window instead of its upper half, so fewer collide again.
    pub fn full_jitter(&self, attempt: u32) -> Duration {
        let base = self.ceiling(attempt);
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: Backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };

    /// `SAMPLE`'s capped exponential, computed independently.
    fn sample_ceiling(attempt: u32) -> Duration {
        Duration::from_millis(100)
            .saturating_mul(1 << attempt.min(20))
            .min(SAMPLE.max)
    }

    #[test]
    fn delays_grow_stay_capped_and_jitter() {
        for attempt in 0..40 {
            let d = SAMPLE.delay(attempt);
            let base = sample_ceiling(attempt);
            assert!(
                d >= base / 2 && d <= base,
                "attempt {attempt}: {d:?} vs {base:?}"
            );
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| SAMPLE.delay(5)).collect();
        assert!(samples.len() > 1, "no jitter");
    }

    #[test]
    fn full_jitter_spans_zero_to_the_capped_exponential() {
        for attempt in 0..40 {
            assert!(
                SAMPLE.full_jitter(attempt) <= sample_ceiling(attempt),
                "attempt {attempt}"
            );
        }
        // Below the upper half often enough that it is not equal jitter.
        let low = (0..200)
            .filter(|_| SAMPLE.full_jitter(4) < Duration::from_millis(800))
            .count();
        assert!(low > 20, "{low} of 200 below half");
    }
}
