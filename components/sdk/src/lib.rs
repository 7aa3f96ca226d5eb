//! Guest-side SDK for shop service components.
//!
//! A service implements [`Service`] against the [`Host`] trait in plain Rust, so
//! its domain logic is unit-tested natively with [`MemoryHost`]. On
//! `wasm32` the [`export_service!`] macro binds it to the `shop:service` WIT
//! world; that glue is the only code that touches the generated bindings.

mod host;
mod memory;
mod types;

pub use host::{Card, Host, Level, StateError, VaultError};
pub use memory::{MemoryHost, ScheduledTimer};
pub use types::{Event, HandleError, Outgoing, Request, Response};

/// The logical topic of the events the host delivers when a timer is due
/// (see [`Host::schedule`]).
pub const TIMER_TOPIC: &str = "timer";

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod wasm;

/// A shop service: the domain logic behind one component.
pub trait Service {
    /// Handles one event and returns the events to publish.
    ///
    /// # Errors
    /// [`HandleError::Retryable`] when a later attempt may succeed,
    /// [`HandleError::Permanent`] when none will (the host dead-letters the
    /// event). State written before an error is discarded by the host.
    fn handle(host: &mut impl Host, event: &Event) -> Result<Vec<Outgoing>, HandleError>;

    /// Answers a read-only HTTP request on the service's own port.
    fn query(host: &impl Host, request: &Request) -> Response;
}

/// Embeds the contract the crate's `build.rs` wrote with
/// `shop_events::write_contract` (what the component publishes and consumes,
/// with each payload's schema) as the `shop:contract` custom section, where
/// the host reads it at load and at every reload.
///
/// Expands to nothing on native targets.
#[macro_export]
macro_rules! contract {
    () => {
        #[cfg(target_arch = "wasm32")]
        #[used]
        #[unsafe(link_section = "shop:contract")]
        static SHOP_CONTRACT: [u8; include_bytes!(concat!(env!("OUT_DIR"), "/shop-contract.json")).len()] =
            *include_bytes!(concat!(env!("OUT_DIR"), "/shop-contract.json"));
    };
}

/// Exports a [`Service`] implementation as the component's `shop:service` world.
///
/// Expands to nothing on native targets, so the same crate also builds as a
/// plain library for unit tests.
#[macro_export]
macro_rules! export_service {
    ($service:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct Component;

            impl $crate::wasm::bindings::Guest for Component {
                fn handle(
                    event: $crate::wasm::bindings::Event,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::wasm::bindings::OutgoingEvent>,
                    $crate::wasm::bindings::HandleError,
                > {
                    $crate::wasm::handle::<$service>(event)
                }

                fn query(request: $crate::wasm::bindings::Request) -> $crate::wasm::bindings::Response {
                    $crate::wasm::query::<$service>(request)
                }
            }

            $crate::wasm::bindings::export_service_bindings!(Component);
        };
    };
}
