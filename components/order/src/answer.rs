//! The payment service's answers as one type, so that an answer arriving
//! before its order can be kept and applied later.

use serde::{Deserialize, Serialize};
use shop_events::{PaymentAuthorized, PaymentDeclined, PaymentRefunded, PaymentVoided, types};
use shop_sdk::{Event, HandleError};

/// An answer of the payment service about one order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
pub enum Answer {
    #[serde(rename = "PaymentAuthorized")]
    Authorized(PaymentAuthorized),
    #[serde(rename = "PaymentDeclined")]
    Declined(PaymentDeclined),
    #[serde(rename = "PaymentRefunded")]
    Refunded(PaymentRefunded),
    #[serde(rename = "PaymentVoided")]
    Voided(PaymentVoided),
}

/// The answer types in the order early answers are applied: the decision
/// before what follows from it.
pub const ANSWER_TYPES: [&str; 4] =
    [types::PAYMENT_AUTHORIZED, types::PAYMENT_DECLINED, types::PAYMENT_REFUNDED, types::PAYMENT_VOIDED];

/// An answer kept until its order arrives, at `early/{order_id}/{event_type}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlyAnswer {
    pub event_id: String,
    pub answer: Answer,
}

/// The state key of an early answer.
pub fn early_key(order_id: &str, event_type: &str) -> String {
    format!("early/{order_id}/{event_type}")
}

impl Answer {
    /// Decodes an event if it is a payment answer.
    ///
    /// # Errors
    /// Permanent when the payload does not match its type.
    pub fn from_event(event: &Event) -> Result<Option<Self>, HandleError> {
        Ok(Some(match event.event_type.as_str() {
            types::PAYMENT_AUTHORIZED => Self::Authorized(event.payload_json()?),
            types::PAYMENT_DECLINED => Self::Declined(event.payload_json()?),
            types::PAYMENT_REFUNDED => Self::Refunded(event.payload_json()?),
            types::PAYMENT_VOIDED => Self::Voided(event.payload_json()?),
            _ => return Ok(None),
        }))
    }

    /// The order the answer is about.
    pub fn order_id(&self) -> &str {
        match self {
            Self::Authorized(a) => &a.order_id,
            Self::Declined(d) => &d.order_id,
            Self::Refunded(r) => &r.order_id,
            Self::Voided(v) => &v.order_id,
        }
    }

    /// The event type the answer travelled as.
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::Authorized(_) => types::PAYMENT_AUTHORIZED,
            Self::Declined(_) => types::PAYMENT_DECLINED,
            Self::Refunded(_) => types::PAYMENT_REFUNDED,
            Self::Voided(_) => types::PAYMENT_VOIDED,
        }
    }
}
