//! The status floor: what the adapters observe and the others read, below
//! every other module and importing none of them. The Kafka adapter reports
//! the broker link; `/health`, `/metrics`, the admin API and the deadline
//! clocks read it.

mod link;

pub use link::{BrokerLink, Down};
