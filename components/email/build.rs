//! The component's contract (what it publishes and consumes, with each
//! payload's schema), embedded by `shop_sdk::contract!()` for the host's
//! load and reload checks.

fn main() {
    shop_events::write_contract(&["analytics:EmailSent"], &["emails:EmailRequested"]);
}
