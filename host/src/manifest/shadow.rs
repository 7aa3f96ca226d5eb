//! How a component's shadow runs go (`[components.NAME.shadow]`): what the
//! comparison ignores, what a candidate may cost, which events it sees and
//! when a run ends on its own.

use serde::{Deserialize, Serialize};

use super::{ManifestError, invalid};

/// Longest ignore rule, and most rules.
const MAX_RULE_BYTES: usize = 256;
const MAX_RULES: usize = 64;

/// A component's shadow-run policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShadowSettings {
    /// Fields that may differ between the versions: dotted paths inside an
    /// emitted event's data, a state value or a query's JSON answer
    /// (`payment_id`, `lines.*.sku`; `*` stands for one step, an object's
    /// key or an array's index).
    pub ignore: Vec<String>,
    /// Share of one core (percent) the candidate's calls get past their
    /// burst, and that its faults may take (see `cpu_percent`).
    pub cpu_percent: u32,
    /// Shadow every Kth event (1: every one).
    pub every: u32,
    /// Queries shadowed too (the serving answer is returned either way).
    pub queries: bool,
    /// Promote the candidate once this many events compared equal with no
    /// difference and no failure (0: only an operator promotes).
    pub promote_after: u64,
    /// End the run at the candidate's first failure or difference.
    pub stop_on_failure: bool,
    /// Differences (and failures) kept for the report, the first ones.
    pub keep: usize,
    /// Events waiting for the candidate; past it an event is skipped
    /// (counted) rather than slowing the serving version.
    pub queue: usize,
}

impl Default for ShadowSettings {
    fn default() -> Self {
        Self {
            ignore: Vec::new(),
            cpu_percent: crate::limits::DEFAULT_SHADOW_CPU_PERCENT,
            every: 1,
            queries: true,
            promote_after: 0,
            stop_on_failure: false,
            keep: 20,
            queue: 1024,
        }
    }
}

impl ShadowSettings {
    /// Checks the settings of component `name`.
    ///
    /// # Errors
    /// [`ManifestError::Invalid`] naming `components.{name}.shadow.*`.
    pub fn validate(&self, name: &str) -> Result<(), ManifestError> {
        let key = |field: &str| format!("components.{name}.shadow.{field}");
        if !(1..=100).contains(&self.cpu_percent) {
            return Err(invalid(key("cpu_percent"), "must be between 1 and 100"));
        }
        if !(1..=1_000_000).contains(&self.every) {
            return Err(invalid(key("every"), "must be between 1 and 1000000"));
        }
        if !(1..=1_000).contains(&self.keep) {
            return Err(invalid(key("keep"), "must be between 1 and 1000"));
        }
        if !(1..=100_000).contains(&self.queue) {
            return Err(invalid(key("queue"), "must be between 1 and 100000"));
        }
        if self.ignore.len() > MAX_RULES {
            return Err(invalid(key("ignore"), format!("at most {MAX_RULES} rules")));
        }
        for rule in &self.ignore {
            if rule.is_empty() || rule.len() > MAX_RULE_BYTES || rule.split('.').any(str::is_empty) {
                return Err(invalid(
                    key("ignore"),
                    format!("{rule:?} is not a dotted path of at most {MAX_RULE_BYTES} bytes (`a.b`, `lines.*.sku`)"),
                ));
            }
        }
        Ok(())
    }
}
