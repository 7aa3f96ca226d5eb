//! How the Kafka adapter reports the [`BrokerLink`]: every client (the
//! producers, each component's consumer) reports through its librdkafka
//! context: "all brokers down" marks the link down at once; a broker
//! connection in state `UP` in a client's statistics (every second) or a
//! metadata answer marks it up again.

use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;

use crate::clock::{Clock as _, SystemClock};
use crate::status::BrokerLink;

impl BrokerLink {
    /// Takes a client's error: "all brokers down" marks the link down.
    pub fn observe_error(&self, error: &KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.report_down(SystemClock.now_ms(), &format!("all broker connections are down: {reason}"));
        }
    }

    /// Takes a client's statistics: a broker connection that is up marks the
    /// link up; none up (with brokers known) marks it down.
    pub fn observe_stats(&self, statistics: &Statistics) {
        let now = SystemClock.now_ms();
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.report_up(now);
        } else if !statistics.brokers.is_empty() {
            let states: Vec<String> = statistics.brokers.values().map(|b| format!("{} {}", b.name, b.state)).collect();
            self.report_down(now, &format!("no broker connection is up ({})", states.join(", ")));
        }
    }
}
