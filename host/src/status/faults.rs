//! Fault counters of one component: failed attempts at an event by error,
//! guest traps by kind, canary rollbacks. The pipeline counts its events'
//! failures and the component's port its queries' traps; `crate::metrics`
//! registers the counters and serves them on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// A failure as the counters count it. The runtime's call error is one:
/// its labels are given in `crate::metrics`, beside the series they name,
/// so that this floor needs nothing of the runtime.
pub trait Fault {
    /// The `error` label of a failed attempt.
    fn error(&self) -> &'static str;
    /// The `kind` label of the trap behind the failure, if a trap caused it.
    fn trap(&self) -> Option<&'static str>;
    /// Whether the failure rolled a new version back.
    fn rolled_back(&self) -> bool;
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    component: String,
    error: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TrapLabels {
    component: String,
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ComponentLabel {
    component: String,
}

/// One component's fault counters; clones count into the same counters.
#[derive(Debug, Clone)]
pub struct Faults {
    component: String,
    /// `shop_events_failed`: failed attempts at an event, by error.
    pub(crate) failed: Family<ErrorLabels, Counter>,
    /// `shop_guest_traps`: trapped instances, by kind.
    pub(crate) traps: Family<TrapLabels, Counter>,
    /// `shop_canary_rollbacks`: new versions rolled back.
    pub(crate) rollbacks: Family<ComponentLabel, Counter>,
    /// This component's series of `rollbacks`, there (at 0) from the start.
    rolled_back: Counter,
}

impl Faults {
    /// No fault of `component` counted yet.
    pub fn new(component: &str) -> Self {
        let rollbacks = Family::<ComponentLabel, Counter>::default();
        let rolled_back = rollbacks.get_or_create_owned(&ComponentLabel { component: component.to_owned() });
        Self {
            component: component.to_owned(),
            failed: Family::default(),
            traps: Family::default(),
            rollbacks,
            rolled_back,
        }
    }

    /// Counts one failed attempt at an event (and the trap or rollback in it).
    pub fn failed(&self, err: &impl Fault) {
        self.failed.get_or_create(&ErrorLabels { component: self.component.clone(), error: err.error() }).inc();
        if err.rolled_back() {
            self.rolled_back.inc();
        }
        self.trapped(err);
    }

    /// Counts the trap in `err`, if it is one (or a canary failure or
    /// rollback caused by one).
    pub fn trapped(&self, err: &impl Fault) {
        if let Some(kind) = err.trap() {
            self.traps.get_or_create(&TrapLabels { component: self.component.clone(), kind }).inc();
        }
    }
}
