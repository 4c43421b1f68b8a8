//! When and how long the service client waits before trying a request again.
//!
//! Only idempotent calls are retried on 408/5xx or a lost connection; a call that must not run
//! twice (a method invocation, a job or device creation) is retried only when the connection
//! could not be opened, because then the hub never saw it, or when the hub throttled it (429:
//! refused, not executed; except the active-job cap, which a backoff does not outlast).

use std::time::Duration;

/// Whether a request may be sent again after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotency {
    /// Sending it twice has the effect of sending it once (GET, PUT with If-Match, DELETE, query).
    Idempotent,
    /// Sending it twice may act twice or fail the second time (POST method, job or device creation).
    NotIdempotent,
}

/// Bounded exponential backoff with full jitter, honouring `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, including the first (1 = never retry).
    pub max_attempts: u32,
    /// Backoff ceiling of the first retry; doubles on each later one.
    pub base_delay: Duration,
    /// Largest backoff between two attempts.
    pub max_delay: Duration,
    /// Largest `Retry-After` the client waits for; a longer one ends the retries.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// Four attempts, 200 ms doubling to at most 5 s, `Retry-After` honoured up to 30 s.
    fn default() -> Self {
        Self {
            max_attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// A policy that sends every request once.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The wait before attempt `attempt + 1` (`attempt` counts from 1 for the first retry),
    /// or `None` when no attempt is left or `retry_after` exceeds [`Self::max_retry_after`].
    /// `jitter` is a sample in `[0, 1)`.
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let ceiling = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_delay);
        let jittered = ceiling.mul_f64(jitter.clamp(0.0, 1.0));
        match retry_after {
            Some(after) if after > self.max_retry_after => None,
            // Never earlier than the hub asked; a little jitter spreads a crowd of clients.
            Some(after) => Some(after + jittered / 4),
            None => Some(jittered),
        }
    }
}

/// Whether an HTTP status is worth retrying for an idempotent call.
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// Parses a `Retry-After` value given in seconds (the HTTP-date form is ignored).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling_then_stops() {
        let p = RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(10),
        };
        let full = |attempt| p.delay(attempt, None, 0.999_999);
        assert!(full(1) <= Some(Duration::from_millis(100)));
        assert!(full(2) > Some(Duration::from_millis(150)));
        assert!(full(3) <= Some(Duration::from_millis(400)));
        assert!(full(5) <= Some(Duration::from_millis(500)));
        assert_eq!(full(6), None);
        assert_eq!(p.delay(1, None, 0.0), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_is_a_floor_and_too_long_gives_up() {
        let p = RetryPolicy::default();
        let d = p.delay(1, Some(Duration::from_secs(2)), 0.5);
        assert!(d >= Some(Duration::from_secs(2)) && d < Some(Duration::from_secs(3)));
        assert_eq!(p.delay(1, Some(Duration::from_secs(31)), 0.5), None);
        assert_eq!(RetryPolicy::never().delay(1, None, 0.5), None);
    }

    #[test]
    fn retry_after_and_statuses() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable_status(s), "{s}");
        }
        for s in [400, 401, 404, 409, 412, 501] {
            assert!(!is_retryable_status(s), "{s}");
        }
    }
}
