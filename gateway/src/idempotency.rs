//! `Idempotency-Key`: which keys are accepted, how a key and the validated
//! order become the order id and the [`IdempotencyBinding`] the order service
//! keeps, and the claims that stop two bodies racing under one key through
//! this gateway.
//!
//! The order id is derived from the key *and* the order (customer and
//! lines), so it cannot be computed from a guessed key: only someone who
//! sends the identical order under that key gets its id, and they learn
//! nothing new. The card is not part of either hash: no digest of a card
//! number travels or rests anywhere (a card number has too few unknown digits
//! for a hash to hide it), so a retry under the same key with another card
//! is the same request, answered with the order already placed. A key reused
//! with another order is refused with `409`, which names no order.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use serde::Serialize;
use sha2::{Digest, Sha256};
use shop_events::{Customer, IdempotencyBinding, LineItem};
use uuid::Uuid;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// The header's name.
pub const HEADER: &str = "idempotency-key";

/// Namespace of order ids derived from a key and an order.
const ORDER_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2a4f_9c1e_7b3d_4e58_a0c6_5d1f_3e2b_9c47);

/// A valid `Idempotency-Key`: 1 to [`MAX_KEY_LEN`] visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

/// Why a key was refused (the message is shown to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidKey(pub &'static str);

/// The request's key, if it sent one.
///
/// # Errors
/// [`InvalidKey`] for an empty or overlong key, one with characters other than
/// visible ASCII (no spaces), or more than one key.
pub fn key_of(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, InvalidKey> {
    let mut values = headers.get_all(HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(InvalidKey("send one Idempotency-Key, not several"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(InvalidKey("Idempotency-Key must not be empty"));
    }
    if bytes.len() > MAX_KEY_LEN {
        return Err(InvalidKey("Idempotency-Key must be at most 128 characters"));
    }
    if !bytes.iter().all(u8::is_ascii_graphic) {
        return Err(InvalidKey("Idempotency-Key must be visible ASCII characters only (e.g. a UUID)"));
    }
    Ok(Some(IdempotencyKey(String::from_utf8_lossy(bytes).into_owned())))
}

/// The fields that make "the same order": validated and normalized (trimmed
/// text, catalog prices), so JSON whitespace or key order do not change it.
/// Serialized by serde_json in this field order.
#[derive(Serialize)]
struct Canonical<'a> {
    customer: &'a Customer,
    items: &'a [LineItem],
}

fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// The order id and the binding of `key` to this order.
pub fn bind(key: &IdempotencyKey, customer: &Customer, items: &[LineItem]) -> (Uuid, IdempotencyBinding) {
    let canonical = serde_json::to_vec(&Canonical { customer, items }).unwrap_or_default();
    // A key is visible ASCII, so the NUL after it separates it from the order.
    let key = key.0.as_bytes();
    let id_seed = sha256(&[b"shop/order-id/v2\0", key, b"\0", &canonical]);
    let request_hash = sha256(&[b"shop/request/v2\0", key, b"\0", &canonical]);
    let key_digest = sha256(&[b"shop/idempotency-key/v1\0", key]);
    let binding = IdempotencyBinding { key_digest: hex::encode(key_digest), request_hash: hex::encode(request_hash) };
    (Uuid::new_v5(&ORDER_ID_NAMESPACE, &id_seed), binding)
}

/// How long this gateway remembers a key it published an order for: well
/// past the time the order service takes to record it, after which the
/// order service's binding answers.
const CLAIM_TTL: Duration = Duration::from_secs(600);
/// Most keys remembered; past it, only the order service's binding guards.
const MAX_CLAIMS: usize = 100_000;

/// Keys this gateway is publishing or published lately, with their request
/// hash: a second body under a key is refused here even before the order
/// service recorded the first.
#[derive(Default)]
pub struct Claims(Mutex<HashMap<String, (String, Instant)>>);

impl Claims {
    /// Claims the binding's key for its request: `false` if it is claimed
    /// for another request.
    pub fn claim(&self, binding: &IdempotencyBinding) -> bool {
        let now = Instant::now();
        let mut claims = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match claims.get(&binding.key_digest) {
            Some((hash, at)) if now.duration_since(*at) < CLAIM_TTL => return *hash == binding.request_hash,
            _ => {}
        }
        if claims.len() >= MAX_CLAIMS {
            claims.retain(|_, (_, at)| now.duration_since(*at) < CLAIM_TTL);
        }
        if claims.len() < MAX_CLAIMS {
            claims.insert(binding.key_digest.clone(), (binding.request_hash.clone(), now));
        }
        true
    }

    /// Releases the key of an order that was certainly not placed.
    pub fn release(&self, binding: &IdempotencyBinding) {
        let mut claims = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if claims.get(&binding.key_digest).is_some_and(|(hash, _)| *hash == binding.request_hash) {
            claims.remove(&binding.key_digest);
        }
    }
}
