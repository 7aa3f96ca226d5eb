//! The component's contract (what it publishes and consumes, with each
//! payload's schema), embedded by `shop_sdk::contract!()` for the host's
//! load and reload checks.

fn main() {
    shop_events::write_contract(
        &[
            "payments:PaymentRequested",
            "payments:PaymentRefundRequested",
            "payments:PaymentVoidRequested",
            "orders:OrderConfirmed",
            "orders:OrderRejected",
            "orders:OrderCancelled",
            "emails:EmailRequested",
        ],
        &[
            "orders:OrderPlaced",
            "payments:PaymentAuthorized",
            "payments:PaymentDeclined",
            "payments:PaymentRefunded",
            "payments:PaymentVoided",
        ],
    );
}
