//! The __NAME__ service: handles the events of its topic `__NAME__` and
//! counts them by type in its state; `GET /events` answers the counts.
//! Written by `just new-service __NAME__` as a starting point: replace the
//! counting with the service's own logic.
//!
//! The host delivers each event at least once but hands the component an
//! event id only once (it drops a redelivered id), and keeps what `handle`
//! wrote only when it returns `Ok`: the counts are exact.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shop_sdk::{Event, HandleError, Host, Outgoing, Request, Response, Service, TIMER_TOPIC};

/// What `GET /events` answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Events handled.
    pub handled: u64,
    /// Events handled per event type.
    pub by_type: BTreeMap<String, u64>,
    /// The id of the last event handled.
    pub last_event_id: Option<String>,
}

/// The state key the counts are kept under.
const COUNTS_KEY: &str = "counts";

/// The __NAME__ service.
pub struct __TYPE__;

impl Service for __TYPE__ {
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError> {
        if event.topic == TIMER_TOPIC {
            // No timers are set here (see Host::schedule to set some).
            return Ok(Vec::new());
        }
        let mut counts: Counts = host.get_json(COUNTS_KEY)?.unwrap_or_default();
        counts.handled += 1;
        *counts.by_type.entry(event.event_type.clone()).or_default() += 1;
        counts.last_event_id = Some(event.id.clone());
        host.put_json(COUNTS_KEY, &counts)?;
        // Events to publish go here; the manifest's `publishes` must grant
        // each topic and type (anything else is dead-lettered).
        Ok(Vec::new())
    }

    fn query(host: &impl Host, request: &Request) -> Response {
        match (request.method.as_str(), request.segments().as_slice()) {
            ("GET", ["events"]) => match host.get_json::<Counts>(COUNTS_KEY) {
                Ok(counts) => Response::json(200, &counts.unwrap_or_default()),
                Err(err) => Response::error(500, "state_error", &err.to_string()),
            },
            _ => Response::not_found("unknown route; try GET /events"),
        }
    }
}

shop_sdk::export_service!(__TYPE__);

#[cfg(test)]
mod tests {
    use super::*;
    use shop_sdk::MemoryHost;

    fn counts(host: &MemoryHost) -> Counts {
        let response = __TYPE__::query(host, &Request::get("/events"));
        assert_eq!(response.status, 200);
        response.body_json().unwrap()
    }

    #[test]
    fn counts_the_events_it_handles_by_type() {
        let mut host = MemoryHost::default();
        assert_eq!(counts(&host), Counts::default());
        for (id, event_type) in [("e1", "Hello"), ("e2", "Hello"), ("e3", "Bye")] {
            let event = Event::json(id, "__NAME__", event_type, "k", &serde_json::json!({}));
            assert!(__TYPE__::handle(&mut host, &event).unwrap().is_empty());
        }
        let counts = counts(&host);
        assert_eq!(counts.handled, 3);
        assert_eq!(counts.by_type["Hello"], 2);
        assert_eq!(counts.last_event_id.as_deref(), Some("e3"));
    }

    #[test]
    fn other_routes_are_not_found() {
        assert_eq!(__TYPE__::query(&MemoryHost::default(), &Request::get("/other")).status, 404);
    }
}
