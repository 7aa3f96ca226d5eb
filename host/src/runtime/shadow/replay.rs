//! Dead letters as a test set: a candidate handles the events a component
//! set aside, on the state as it is now, and the report says which it now
//! handles and what it would emit. Nothing is published or committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::super::{CallError, Called, Event, ServiceRuntime};
use super::ShadowError;
use crate::state::StoreReader;

/// Most dead letters one trial runs, the first ones.
pub const MAX_TRIAL_LETTERS: usize = 500;

/// Longest a trial runs; the letters after are not tried.
pub const MAX_TRIAL_TIME: Duration = Duration::from_secs(120);

/// What the candidate did with one dead letter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrialOutcome {
    /// The dead letter's id (`partition/offset`).
    pub id: String,
    pub event_id: String,
    pub event_type: String,
    /// Why the serving version set it aside.
    pub reason: String,
    /// Whether the candidate handles it.
    pub handled: bool,
    /// Why not, if it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What it would emit: type, topic, key, data.
    pub outputs: Vec<Value>,
    /// State keys it would write, timers it would change.
    pub writes: usize,
    pub timers: usize,
}

/// The report of a candidate run over dead letters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Replayed {
    pub component: String,
    pub candidate: String,
    pub handled: usize,
    pub failed: usize,
    /// Letters past the first [`MAX_TRIAL_LETTERS`], or past
    /// [`MAX_TRIAL_TIME`]: not tried.
    pub not_tried: usize,
    pub letters: Vec<TrialOutcome>,
}

/// What `outcome`, the candidate's handling of dead letter `id`, says.
fn outcome_of(id: String, reason: String, event: &Event, outcome: Result<Called, CallError>) -> TrialOutcome {
    let (handled, error, called) = match outcome {
        Ok(called) => (true, None, Some(called)),
        Err(err) => (false, Some(err.to_string()), None),
    };
    let outputs = called.iter().flat_map(|c| &c.outputs).map(|o| {
        let data = serde_json::from_str(o.data.get()).unwrap_or(Value::Null);
        serde_json::json!({ "type": o.event_type, "topic": o.topic, "key": o.key, "data": data })
    });
    TrialOutcome {
        id,
        event_id: event.id.clone(),
        event_type: event.event_type.clone(),
        reason,
        handled,
        error,
        outputs: outputs.collect(),
        writes: called.as_ref().map_or(0, |c| c.writes.len()),
        timers: called.as_ref().map_or(0, |c| c.timers.len()),
    }
}

/// One dead letter to try: its id, the reason it was set aside, its event.
pub type Letter = (String, String, Event);

impl ServiceRuntime {
    /// Runs candidate `bytes` over `letters` (events of this service's dead
    /// letters) on the state as it is now; nothing is kept.
    ///
    /// # Errors
    /// [`ShadowError::Load`] when the candidate would not load.
    pub async fn trial(&self, source: &str, bytes: Vec<u8>, letters: Vec<Letter>) -> Result<Replayed, ShadowError> {
        let parts = self.candidate_parts(&self.shadow_settings());
        let component = Arc::new(self.compile(source, bytes, parts.clone()).await?);
        let candidate = self.candidate_of(component.clone(), parts);
        let store = self.store.clone();
        let total = letters.len();
        // Bounded: a candidate that spins to its time budget on every letter
        // must not hold the request (and a thread) for hours.
        let deadline = Instant::now() + MAX_TRIAL_TIME;
        let trial = move || -> Vec<TrialOutcome> {
            letters
                .into_iter()
                .take(MAX_TRIAL_LETTERS)
                .take_while(|_| Instant::now() < deadline)
                .map(|(id, reason, event)| {
                    let (outcome, _) = candidate.handle(&event, Arc::new(StoreReader(store.clone())), None);
                    outcome_of(id, reason, &event, outcome)
                })
                .collect()
        };
        let letters = super::super::pool::on_own_thread(format!("trial-{}", self.name), trial)
            .await
            .map_err(|err| ShadowError::Trial(format!("the trial: {err}")))?;
        let not_tried = total - letters.len();
        let handled = letters.iter().filter(|l| l.handled).count();
        Ok(Replayed {
            component: self.name.to_string(),
            candidate: component.sha256.clone(),
            handled,
            failed: letters.len() - handled,
            not_tried,
            letters,
        })
    }
}
