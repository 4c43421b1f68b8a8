//! IoT Hub's operation throttles for the hub's tier ([`hub_core::tier`]): every throttled
//! operation passes its class's [`Shaper`] first. As IoT Hub documents it ("Operation throttles
//! are rate limitations that are applied in minute ranges ... They're also subject to traffic
//! shaping": "IoT Hub accepts requests above the throttle for a limited time. The first few of
//! these requests are processed immediately. However, if the number of requests continues to
//! violate the throttle, IoT Hub starts placing the requests in a queue and processed at the
//! limit rate ... if the throttle violation continues, eventually the queue fills up, and IoT Hub
//! starts rejecting requests with 429 ThrottlingException"; Microsoft Learn, "IoT Hub quotas and
//! throttling", Traffic shaping), a burst of up to [`BURST`] worth of the rate passes at once,
//! then requests wait their turn at the rate, and a request that would wait longer than
//! [`BACKLOG`] is refused with 429001.
//!
//! Without a tier ([`Throttles::unlimited`]) nothing is throttled, so tests and benchmarks run at
//! full speed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hub_core::tier::{Operation, Quotas};
use tokio::time::Instant;

/// How much of a rate may arrive at once before shaping starts: a minute's worth, since the
/// throttles "are applied in minute ranges".
pub const BURST: Duration = Duration::from_secs(60);
/// The longest a shaped request waits in the queue; one that would wait longer is refused.
pub const BACKLOG: Duration = Duration::from_secs(10);

/// What a shaper decided for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Serve it now.
    Now,
    /// Serve it after this wait (traffic shaping).
    After(Duration),
    /// The queue is full: 429 ThrottlingException.
    Refused,
}

/// One operation class's throttle, as the generic cell rate algorithm: `next` is when the next
/// request is due at the rate; up to `burst` ahead of it passes at once, up to `burst + backlog`
/// ahead waits, anything further is refused. Pure: the caller passes the time.
#[derive(Debug, Clone)]
pub struct Shaper {
    interval: f64,
    burst: f64,
    backlog: f64,
    next: f64,
}

impl Shaper {
    /// A shaper for `per_second` operations a second with the given burst and backlog.
    pub fn new(per_second: f64, burst: Duration, backlog: Duration) -> Shaper {
        let interval = if per_second > 0.0 {
            1.0 / per_second
        } else {
            f64::INFINITY
        };
        Shaper {
            interval,
            // At least one operation always passes at once.
            burst: burst.as_secs_f64().max(interval),
            backlog: backlog.as_secs_f64(),
            next: 0.0,
        }
    }

    /// Decides for a request of `cost` operations arriving `now` seconds after the shaper's
    /// epoch; an accepted request takes its place in the schedule, a refused one does not.
    pub fn check(&mut self, now: f64, cost: f64) -> Verdict {
        let due = self.next.max(now);
        let after = due + cost * self.interval;
        // How far ahead of the rate this request runs once counted.
        // (less a hair, so that sums of intervals land on the boundary they are meant to)
        let ahead = after - now - 1e-9;
        if ahead <= self.burst {
            self.next = after;
            Verdict::Now
        } else if ahead <= self.burst + self.backlog {
            self.next = after;
            Verdict::After(Duration::from_secs_f64((ahead - self.burst).max(0.0)))
        } else {
            Verdict::Refused
        }
    }
}

/// The jobs engine's pace for device operations ("Jobs device operations", e.g. 10/s on S1):
/// unlike the request throttles it has no burst and refuses nothing, since "jobs aren't refused
/// for device operations": a job's devices are served one slot every 1/rate, shared by every
/// job of the hub, so a job over 100 devices takes about 10 s on S1, as on Azure.
#[derive(Debug)]
pub struct Pace {
    interval: Duration,
    state: Mutex<PaceState>,
}

#[derive(Debug)]
struct PaceState {
    /// When the next slot is due.
    next: Instant,
    /// Whether the last take wanted more slots than were due: only a caller held back by the
    /// pace is owed the slots it missed while it was late.
    held_back: bool,
}

impl Pace {
    /// One slot every `1 / per_second` seconds.
    pub fn new(per_second: f64) -> Pace {
        Pace {
            interval: Duration::from_secs_f64(1.0 / per_second.max(1e-3)),
            state: Mutex::new(PaceState {
                next: Instant::now(),
                held_back: false,
            }),
        }
    }

    /// Takes up to `max` slots that are due now and returns how many it took. Slots missed by a
    /// caller the pace held back (woken late) are caught up, for up to a second; a caller that
    /// was not held back (a job starting after the pace was idle, or after a job that took all
    /// it wanted) starts over with the slot due now, so no credit piles up between jobs.
    pub fn take_due(&self, max: usize) -> usize {
        self.take_due_at(Instant::now(), max)
    }

    /// [`Pace::take_due`] at `now`.
    fn take_due_at(&self, now: Instant, max: usize) -> usize {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if (!state.held_back || state.next + Duration::from_secs(1) < now) && state.next < now {
            state.next = now;
        }
        if state.next > now || max == 0 {
            state.held_back = max > 0;
            return 0;
        }
        let due = (now - state.next).as_secs_f64() / self.interval.as_secs_f64();
        let due = (due as usize).saturating_add(1);
        let taken = due.min(max);
        state.held_back = max > due;
        state.next += self.interval * u32::try_from(taken).unwrap_or(u32::MAX);
        taken
    }

    /// When the next slot is due.
    pub fn next_due(&self) -> Instant {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .next
    }
}

/// A request refused by its throttle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the hub's {} throttle for its tier is exceeded; back off and retry", operation.name())]
pub struct Throttled {
    /// Whose throttle.
    pub operation: Operation,
}

/// The throttles of one hub: a shaper per operation class its tier offers.
#[derive(Debug, Clone)]
pub struct Throttles {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    quotas: Quotas,
    epoch: Instant,
    shapers: HashMap<Operation, Mutex<Shaper>>,
}

impl Throttles {
    /// No throttling at all (no `--tier`).
    pub fn unlimited() -> Throttles {
        Throttles { inner: None }
    }

    /// The throttles of `quotas`' tier and units, with IoT Hub's shaping ([`BURST`],
    /// [`BACKLOG`]).
    pub fn of(quotas: Quotas) -> Throttles {
        Throttles::shaped(quotas, BURST, BACKLOG)
    }

    /// The throttles of `quotas` with another burst and backlog (tests shrink them to reach
    /// refusals with a handful of requests).
    pub fn shaped(quotas: Quotas, burst: Duration, backlog: Duration) -> Throttles {
        let shapers = Operation::ALL
            .into_iter()
            .filter_map(|operation| {
                let rate = quotas.rate(operation)?;
                Some((
                    operation,
                    Mutex::new(Shaper::new(rate.per_second, burst, backlog)),
                ))
            })
            .collect();
        Throttles {
            inner: Some(Arc::new(Inner {
                quotas,
                epoch: Instant::now(),
                shapers,
            })),
        }
    }

    /// The jobs engine's device-operation pace for the tier, if throttled.
    pub fn job_pace(&self) -> Option<Pace> {
        let rate = self.quotas()?.rate(Operation::JobDeviceOperation)?;
        Some(Pace::new(rate.per_second))
    }

    /// The tier and units, if throttled.
    pub fn quotas(&self) -> Option<Quotas> {
        self.inner.as_ref().map(|inner| inner.quotas)
    }

    /// Passes one request of `cost` operations through its class's throttle: returns at once,
    /// after its shaped wait, or refuses it. Operations a tier does not offer pass (the caller
    /// refuses them for the tier first).
    pub async fn pass(&self, operation: Operation, cost: u64) -> Result<(), Throttled> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let Some(shaper) = inner.shapers.get(&operation) else {
            return Ok(());
        };
        let now = inner.epoch.elapsed().as_secs_f64();
        let verdict = shaper
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(now, cost as f64);
        match verdict {
            Verdict::Now => Ok(()),
            Verdict::After(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            Verdict::Refused => Err(Throttled { operation }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_requests_are_shaped_then_refused() {
        // 10/s, a 1 s burst, a 2 s backlog.
        let mut shaper = Shaper::new(10.0, Duration::from_secs(1), Duration::from_secs(2));
        let verdicts: Vec<Verdict> = (0..40).map(|_| shaper.check(0.0, 1.0)).collect();
        let now = verdicts.iter().filter(|v| **v == Verdict::Now).count();
        let shaped: Vec<Duration> = verdicts
            .iter()
            .filter_map(|v| match v {
                Verdict::After(wait) => Some(*wait),
                _ => None,
            })
            .collect();
        let refused = verdicts.iter().filter(|v| **v == Verdict::Refused).count();
        assert_eq!((now, shaped.len(), refused), (10, 20, 10), "{verdicts:?}");
        // Shaped requests are served at the rate, waits rising by one interval each.
        assert!(shaped.windows(2).all(|w| {
            let step = (w[1] - w[0]).as_secs_f64();
            (step - 0.1).abs() < 1e-6
        }));
        assert!(shaped.last().is_some_and(|w| *w <= Duration::from_secs(2)));
    }

    #[test]
    fn the_rate_comes_back_as_time_passes() {
        let mut shaper = Shaper::new(10.0, Duration::from_secs(1), Duration::ZERO);
        for _ in 0..10 {
            assert_eq!(shaper.check(0.0, 1.0), Verdict::Now);
        }
        assert_eq!(shaper.check(0.0, 1.0), Verdict::Refused);
        // Half a second later, five more fit in the burst.
        let later: Vec<Verdict> = (0..6).map(|_| shaper.check(0.5, 1.0)).collect();
        assert_eq!(
            later.iter().filter(|v| **v == Verdict::Now).count(),
            5,
            "{later:?}"
        );
        // Traffic at exactly the rate is never delayed.
        let mut steady = Shaper::new(10.0, Duration::from_secs(1), Duration::ZERO);
        assert!((0..1000).all(|i| steady.check(f64::from(i) * 0.1, 1.0) == Verdict::Now));
    }

    #[test]
    fn a_costly_request_counts_its_meter_steps() {
        let mut shaper = Shaper::new(40.0, Duration::from_secs(1), Duration::ZERO);
        assert_eq!(shaper.check(0.0, 32.0), Verdict::Now);
        assert_eq!(shaper.check(0.0, 8.0), Verdict::Now);
        assert_eq!(shaper.check(0.0, 1.0), Verdict::Refused);
    }

    #[test]
    fn a_pace_serves_slots_at_its_rate_without_piling_up_credit() {
        let pace = Pace::new(10.0);
        let start = pace.next_due();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(pace.take_due_at(at(0), 5), 1, "the slot due now");
        assert_eq!(pace.take_due_at(at(0), 5), 0);
        assert_eq!(
            pace.take_due_at(at(350), 5),
            3,
            "a held-back caller woken late gets the slots it missed"
        );
        assert_eq!(
            pace.take_due_at(at(60_000), 100),
            1,
            "an idle minute is no credit of 600"
        );
        let taken: usize = (1..=100)
            .map(|i| pace.take_due_at(at(60_000 + i * 10), 100))
            .sum();
        assert_eq!(taken, 10, "one second of slots");
    }

    #[test]
    fn a_job_starting_after_another_gets_no_credit_from_the_gap() {
        let pace = Pace::new(100.0);
        let start = pace.next_due();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // A hub started 150 ms ago, its first job's first take: one slot, not fifteen.
        assert_eq!(pace.take_due_at(at(150), 1000), 1);
        // The job's last take wants 2 and gets them (it is not held back)...
        assert_eq!(pace.take_due_at(at(180), 2), 2);
        // ...so the next job, 200 ms later, starts over as well.
        assert_eq!(pace.take_due_at(at(380), 1000), 1);
        assert_eq!(pace.take_due_at(at(385), 1000), 0);
        assert_eq!(pace.take_due_at(at(390), 1000), 1);
    }

    #[tokio::test]
    async fn unlimited_throttles_pass_everything() {
        let throttles = Throttles::unlimited();
        for _ in 0..10_000 {
            assert_eq!(throttles.pass(Operation::Registry, 1).await, Ok(()));
        }
        assert_eq!(throttles.quotas(), None);
    }
}
