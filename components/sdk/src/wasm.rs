//! Glue between the generated WIT bindings and [`crate::Service`].

use crate::{Card, Event, HandleError, Host, Level, Request, Service, StateError, VaultError};

#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        // `service` and the vault: only a component that redeems cards
        // imports it (unused imports are not linked).
        world: "vault-service",
        pub_export_macro: true,
        export_macro_name: "export_service_bindings",
        default_bindings_module: "shop_sdk::wasm::bindings",
    });
}

use bindings::shop::service::{clock, config, log, state, timers, vault};

/// The component's view of the host: every call is a WIT import.
pub struct WasmHost;

impl From<state::StateError> for StateError {
    fn from(err: state::StateError) -> Self {
        match err {
            state::StateError::Unavailable(msg) => StateError::Unavailable(msg),
            state::StateError::Invalid(msg) => StateError::Invalid(msg),
        }
    }
}

impl Host for WasmHost {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(state::get(key)?)
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StateError> {
        Ok(state::set(key, value)?)
    }

    fn delete(&mut self, key: &str) -> Result<(), StateError> {
        Ok(state::delete(key)?)
    }

    fn list_keys(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StateError> {
        Ok(state::list_keys(prefix, limit)?)
    }

    fn schedule(
        &mut self,
        id: &str,
        at_ms: u64,
        event_type: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<(), StateError> {
        Ok(timers::schedule(id, at_ms, event_type, key, payload)?)
    }

    fn cancel(&mut self, id: &str) -> Result<(), StateError> {
        Ok(timers::cancel(id)?)
    }

    fn now_ms(&self) -> u64 {
        clock::now_ms()
    }

    fn deadline_now_ms(&self) -> u64 {
        clock::deadline_now_ms()
    }

    fn config(&self, key: &str) -> Option<String> {
        config::get(key)
    }

    fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]) {
        let level = match level {
            Level::Trace => log::Level::Trace,
            Level::Debug => log::Level::Debug,
            Level::Info => log::Level::Info,
            Level::Warn => log::Level::Warn,
            Level::Error => log::Level::Error,
        };
        let fields: Vec<(String, String)> = fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        log::log(level, message, &fields);
    }

    fn redeem_card(&self, token: &str) -> Result<Card, VaultError> {
        // Only a component that calls this imports `vault` (unused imports
        // are not linked), so only those need the grant.
        match vault::redeem(token) {
            Ok(card) => Ok(Card { number: card.number, brand: card.brand, last4: card.last4 }),
            Err(vault::VaultError::Unknown) => Err(VaultError::Unknown),
            Err(vault::VaultError::Expired) => Err(VaultError::Expired),
            Err(vault::VaultError::Unavailable(why)) => Err(VaultError::Unavailable(why)),
        }
    }
}

/// Runs [`Service::handle`] on a WIT event.
pub fn handle<S: Service>(event: bindings::Event) -> Result<Vec<bindings::OutgoingEvent>, bindings::HandleError> {
    let event = Event {
        id: event.id,
        event_type: event.event_type,
        topic: event.topic,
        key: event.key,
        headers: event.headers,
        payload: event.payload,
        timestamp_ms: event.timestamp_ms,
    };
    match S::handle(&mut WasmHost, &event) {
        Ok(out) => Ok(out
            .into_iter()
            .map(|o| bindings::OutgoingEvent {
                topic: o.topic,
                event_type: o.event_type,
                key: o.key,
                payload: o.payload,
            })
            .collect()),
        Err(HandleError::Retryable(msg)) => Err(bindings::HandleError::Retryable(msg)),
        Err(HandleError::Permanent(msg)) => Err(bindings::HandleError::Permanent(msg)),
    }
}

/// Runs [`Service::query`] on a WIT request.
pub fn query<S: Service>(request: bindings::Request) -> bindings::Response {
    let request = Request { method: request.method, path: request.path, query: request.query, body: request.body };
    let response = S::query(&WasmHost, &request);
    bindings::Response { status: response.status, content_type: response.content_type, body: response.body }
}
