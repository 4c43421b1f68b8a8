//! Desired-property bookkeeping: every `$version` is delivered once and in order. After a
//! reconnect (or a gap in versions) the full desired state is re-read and, if its version moved,
//! delivered as one synthesised patch; notifications at or below a delivered version are dropped.

use serde_json::Value;

use super::DesiredPatch;

/// What the connection task must do after a notification.
#[derive(Debug, PartialEq)]
pub(super) enum Step {
    /// Deliver these, in order.
    Deliver(Vec<DesiredPatch>),
    /// Versions are missing: re-read the twin (the notification is held until then).
    Resync,
}

/// Pure state machine; the connection task feeds it notifications and twin reads.
#[derive(Debug, Default)]
pub(super) struct DesiredTracker {
    /// The last `$version` delivered (or read on connect).
    delivered: Option<u64>,
    /// A twin read is in flight; notifications wait for it.
    resyncing: bool,
    /// Notifications that arrived during a resync (few: the hub sends one per change).
    held: Vec<(u64, Value)>,
}

impl DesiredTracker {
    /// A twin read has been sent; hold notifications until [`DesiredTracker::on_twin`].
    pub(super) fn begin_resync(&mut self) {
        self.resyncing = true;
    }

    /// The last version delivered.
    #[cfg(test)]
    pub(super) fn delivered(&self) -> Option<u64> {
        self.delivered
    }

    /// A notification on `$iothub/twin/PATCH/properties/desired/?$version=v`.
    pub(super) fn on_notification(&mut self, version: u64, patch: Value) -> Step {
        if self.resyncing {
            self.held.push((version, patch));
            return Step::Deliver(Vec::new());
        }
        match self.delivered {
            Some(d) if version <= d => Step::Deliver(Vec::new()),
            Some(d) if version > d + 1 => {
                self.held.push((version, patch));
                self.resyncing = true;
                Step::Resync
            }
            _ => {
                self.delivered = Some(version);
                Step::Deliver(vec![DesiredPatch {
                    version,
                    patch,
                    full: false,
                }])
            }
        }
    }

    /// The desired section from a twin read. On the first connect it only sets the baseline
    /// (the application gets that twin directly); later it yields a full patch if the version
    /// moved, then any held notifications above it, in order.
    pub(super) fn on_twin(&mut self, desired: &Value, first: bool) -> Vec<DesiredPatch> {
        let version = desired.get("$version").and_then(Value::as_u64).unwrap_or(0);
        let mut out = Vec::new();
        match self.delivered {
            Some(d) if version <= d => {}
            _ if first => self.delivered = Some(version),
            _ => {
                self.delivered = Some(version);
                out.push(DesiredPatch {
                    version,
                    patch: desired.clone(),
                    full: true,
                });
            }
        }
        self.resyncing = false;
        let mut held = std::mem::take(&mut self.held);
        held.sort_by_key(|(v, _)| *v);
        for (v, patch) in held {
            if self.delivered.is_none_or(|d| v > d) {
                self.delivered = Some(v);
                out.push(DesiredPatch {
                    version: v,
                    patch,
                    full: false,
                });
            }
        }
        out
    }

    /// The connection dropped: whatever was in flight is void; the next twin read decides.
    pub(super) fn on_disconnect(&mut self) {
        self.resyncing = false;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn versions(step: &Step) -> Vec<(u64, bool)> {
        match step {
            Step::Deliver(p) => p.iter().map(|p| (p.version, p.full)).collect(),
            Step::Resync => vec![],
        }
    }

    #[test]
    fn in_order_notifications_pass_and_repeats_are_dropped() {
        let mut t = DesiredTracker::default();
        assert!(t.on_twin(&json!({"$version": 3}), true).is_empty());
        assert_eq!(
            versions(&t.on_notification(4, json!({"a": 1, "$version": 4}))),
            vec![(4, false)]
        );
        assert_eq!(
            versions(&t.on_notification(4, json!({"a": 1, "$version": 4}))),
            vec![]
        );
        assert_eq!(
            versions(&t.on_notification(2, json!({"$version": 2}))),
            vec![]
        );
        assert_eq!(t.delivered(), Some(4));
    }

    #[test]
    fn reconnect_with_a_moved_version_synthesises_one_full_patch() {
        let mut t = DesiredTracker::default();
        t.on_twin(&json!({"$version": 3}), true);
        t.on_disconnect();
        t.begin_resync();
        // A notification for a change made just after the resubscribe arrives before the read.
        assert_eq!(
            versions(&t.on_notification(6, json!({"$version": 6}))),
            vec![]
        );
        let out = t.on_twin(&json!({"building": 43, "$version": 5}), false);
        assert_eq!(
            out.iter().map(|p| (p.version, p.full)).collect::<Vec<_>>(),
            vec![(5, true), (6, false)]
        );
        assert_eq!(out[0].patch["building"], 43);
        // The same version read again delivers nothing.
        t.begin_resync();
        assert!(t.on_twin(&json!({"$version": 6}), false).is_empty());
    }

    #[test]
    fn a_gap_triggers_a_resync_and_nothing_is_delivered_twice() {
        let mut t = DesiredTracker::default();
        t.on_twin(&json!({"$version": 1}), true);
        assert_eq!(t.on_notification(3, json!({"$version": 3})), Step::Resync);
        assert_eq!(
            versions(&t.on_notification(4, json!({"$version": 4}))),
            vec![]
        );
        let out = t.on_twin(&json!({"$version": 4, "x": 1}), false);
        assert_eq!(
            out.iter().map(|p| (p.version, p.full)).collect::<Vec<_>>(),
            vec![(4, true)]
        );
    }

    #[test]
    fn unchanged_twin_after_reconnect_delivers_nothing() {
        let mut t = DesiredTracker::default();
        t.on_twin(&json!({"$version": 7}), true);
        t.begin_resync();
        assert!(t.on_twin(&json!({"$version": 7}), false).is_empty());
    }
}
