//! The process's open-file limit: raised as far as the system allows when the hub starts, and
//! the connection budgets of both ports fitted under it, so that clients can never make the hub
//! run out of descriptors (an `accept` that fails with "Too many open files" also starves the
//! store and the TLS files).

use crate::listener::ConnectionBudget;

/// Descriptors kept for everything that is not a client connection: the store (SQLite and its
/// journal), the listeners, the tokio runtime, logs, certificates being read.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Raises the soft open-file limit to the hard limit (as root, to `fs.nr_open`) and returns the
/// limit now in force; `None` where it cannot be read (non-Unix).
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let limit = getrlimit(Resource::Nofile);
        // Linux lets a privileged process raise the hard limit up to fs.nr_open.
        let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok());
        if let Some(ceiling) = ceiling.filter(|&c| limit.maximum.is_some_and(|max| c > max)) {
            let raised = Rlimit {
                current: Some(ceiling),
                maximum: Some(ceiling),
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return Some(ceiling);
            }
        }
        if limit.current != limit.maximum {
            let raised = Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                return limit.maximum.or(Some(u64::MAX));
            }
        }
        Some(limit.current.unwrap_or(u64::MAX))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Fits the two ports' budgets under `open_files` descriptors (minus [`RESERVED_DESCRIPTORS`]).
/// Pending budgets are kept (they are small and protect the admitted ones); the admitted
/// budgets shrink, the larger first, down to one each. Returns the fitted budgets and whether
/// anything was lowered.
pub fn fit_budgets(
    mqtt: ConnectionBudget,
    https: ConnectionBudget,
    open_files: Option<u64>,
) -> (ConnectionBudget, ConnectionBudget, bool) {
    let Some(open_files) = open_files else {
        return (mqtt, https, false);
    };
    let available =
        usize::try_from(open_files.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    let wanted = mqtt.total().saturating_add(https.total());
    if wanted <= available {
        return (mqtt, https, false);
    }
    let mut mqtt = mqtt;
    let mut https = https;
    // Pending budgets too large for the limit are halved until they leave room.
    while mqtt.pending + https.pending + 2 > available && (mqtt.pending > 1 || https.pending > 1) {
        mqtt.pending = (mqtt.pending / 2).max(1);
        https.pending = (https.pending / 2).max(1);
    }
    let room = available
        .saturating_sub(mqtt.pending + https.pending)
        .max(2);
    let admitted = mqtt.admitted + https.admitted;
    if admitted > room {
        // Shares in proportion to what was asked, at least one each.
        let mqtt_share = ((mqtt.admitted as u128 * room as u128) / admitted as u128) as usize;
        mqtt.admitted = mqtt_share.clamp(1, room - 1);
        https.admitted = (room - mqtt.admitted).clamp(1, https.admitted);
    }
    (mqtt, https, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(admitted: usize, pending: usize) -> ConnectionBudget {
        ConnectionBudget {
            admitted,
            pending,
            evict_after: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn budgets_that_fit_are_kept() {
        let (m, h, lowered) = fit_budgets(budget(20_000, 1024), budget(1024, 256), Some(1 << 20));
        assert_eq!(
            (m, h, lowered),
            (budget(20_000, 1024), budget(1024, 256), false)
        );
        let (m, h, lowered) = fit_budgets(budget(5, 5), budget(5, 5), None);
        assert_eq!((m, h, lowered), (budget(5, 5), budget(5, 5), false));
    }

    #[test]
    fn budgets_shrink_under_a_small_limit_without_exceeding_it() {
        let wanted = (20_000 + 1024 + 1024 + 256) + RESERVED_DESCRIPTORS;
        for limit in [300_u64, 1024, 4096, 20_000, wanted - 1] {
            let (m, h, lowered) = fit_budgets(budget(20_000, 1024), budget(1024, 256), Some(limit));
            assert!(lowered, "limit {limit}");
            let used = (m.total() + h.total()) as u64;
            assert!(
                used + RESERVED_DESCRIPTORS <= limit.max(RESERVED_DESCRIPTORS + 4),
                "limit {limit}: {m:?} {h:?}"
            );
            assert!(m.admitted >= 1 && h.admitted >= 1 && m.pending >= 1 && h.pending >= 1);
            assert!(m.admitted <= 20_000 && h.admitted <= 1024);
        }
    }

    #[cfg(unix)]
    #[test]
    fn raising_the_limit_never_lowers_it_and_reports_what_is_in_force() {
        use rustix::process::{Resource, getrlimit};
        let before = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let after = raise_open_file_limit().expect("Unix has an open-file limit");
        let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        assert_eq!(after, now);
        assert!(now >= before, "{before} -> {now}");
    }
}
