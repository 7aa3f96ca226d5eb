//! The status floor: what the adapters observe and the others read, below
//! every other module and importing none of them. The Kafka adapter reports
//! the broker link and each consumer's status; the pipeline and the runtime
//! record where an event's time goes (stage timings) and count faults;
//! `/health`, `/metrics`, the admin API and the deadline clocks read them.

mod consumer;
mod faults;
mod link;
mod stages;

pub use consumer::{ConsumerStatus, StatusSnapshot};
pub use faults::{Fault, Faults};
pub use link::{BrokerLink, Down};
pub use stages::{Stage, StageHistograms, StageTotal, StageTotals, Stages};
