//! The authorization rules: pure functions of card number and amount.
//!
//! Test cards follow the conventions payment providers use in their sandboxes:
//! `4242 4242 4242 4242` is authorized, `4000 0000 0000 0002` is declined,
//! `4000 0000 0000 9995` has insufficient funds, `4000 0000 0000 0069` is
//! expired. Any other number passing the Luhn check is authorized.

use serde::{Deserialize, Serialize};
use shop_events::card;

/// The outcome for one payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Decision {
    Authorized { card_last4: String },
    Declined { code: String, reason: String },
}

fn declined(code: &str, reason: &str) -> Decision {
    Decision::Declined { code: code.to_owned(), reason: reason.to_owned() }
}

/// Decides whether `amount_cents` may be charged to `card_number`.
pub fn decide(card_number: &str, amount_cents: u64, max_amount_cents: u64) -> Decision {
    let digits = card::normalize(card_number);
    if !card::is_valid(&digits) {
        return declined("invalid_card", "the card number is not valid");
    }
    if amount_cents == 0 {
        return declined("invalid_amount", "the amount must be positive");
    }
    if amount_cents > max_amount_cents {
        return declined("amount_limit_exceeded", "the amount exceeds the per-order limit");
    }
    match digits.as_str() {
        #[cfg(feature = "v2")]
        "5555555555554444" => declined("card_not_supported", "this card network is not supported"),
        "4000000000000002" => declined("card_declined", "the card was declined"),
        "4000000000009995" => declined("insufficient_funds", "the card has insufficient funds"),
        "4000000000000069" => declined("expired_card", "the card has expired"),
        _ => Decision::Authorized { card_last4: digits[digits.len() - 4..].to_owned() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let max = 10_000;
        assert!(matches!(decide("4242-4242-4242-4242", 1, max), Decision::Authorized { .. }));
        for (card, code) in [
            ("4000000000000002", "card_declined"),
            ("4000000000009995", "insufficient_funds"),
            ("4000000000000069", "expired_card"),
            ("4242424242424241", "invalid_card"),
            ("42", "invalid_card"),
            ("4242x42424242424", "invalid_card"),
        ] {
            assert_eq!(
                decide(card, 1, max),
                declined(
                    code,
                    match code {
                        "card_declined" => "the card was declined",
                        "insufficient_funds" => "the card has insufficient funds",
                        "expired_card" => "the card has expired",
                        _ => "the card number is not valid",
                    }
                )
            );
        }
        assert!(
            matches!(decide("4242424242424242", 0, max), Decision::Declined { code, .. } if code == "invalid_amount")
        );
        assert!(
            matches!(decide("4242424242424242", max + 1, max), Decision::Declined { code, .. } if code == "amount_limit_exceeded")
        );
        assert!(matches!(decide("4242424242424242", max, max), Decision::Authorized { .. }));
    }
}
