//! `Idempotency-Key` bindings: the first order placed with a key binds it to
//! that order's request hash, at `idempotency/{key_digest}`. The gateway asks
//! for the binding before it publishes; an order that reaches this service
//! with a bound key and another hash (two bodies raced through the gateway)
//! is logged and ignored.

use serde::{Deserialize, Serialize};
use shop_events::IdempotencyBinding;
use shop_sdk::{HandleError, Host, Level};

/// The state key of a key's binding.
pub fn binding_key(key_digest: &str) -> String {
    format!("idempotency/{key_digest}")
}

/// What is stored (and answered by `GET /idempotency/{key_digest}`) for a
/// bound key: only the hash, never the order id, so that whoever guesses a
/// key learns nothing they could use to read the order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bound {
    pub request_hash: String,
}

/// Whether an order with `binding` may be placed: `true` when its key is
/// unbound or bound to the same request, `false` (logged) when the key is
/// bound to another request.
///
/// # Errors
/// Retryable if the store is unavailable, permanent on corrupt state.
pub fn admits(host: &impl Host, order_id: &str, binding: &IdempotencyBinding) -> Result<bool, HandleError> {
    match host.get_json::<Bound>(&binding_key(&binding.key_digest))? {
        Some(bound) if bound.request_hash != binding.request_hash => {
            host.log(
                Level::Warn,
                "OrderPlaced ignored: its Idempotency-Key is bound to another request (a different body raced the first)",
                &[("order_id", order_id), ("key_digest", &binding.key_digest)],
            );
            Ok(false)
        }
        _ => Ok(true),
    }
}

/// Binds the key to the request (in the transaction that records the order).
///
/// # Errors
/// Retryable if the store is unavailable.
pub fn bind(host: &mut impl Host, binding: &IdempotencyBinding) -> Result<(), HandleError> {
    host.put_json(&binding_key(&binding.key_digest), &Bound { request_hash: binding.request_hash.clone() })
}
