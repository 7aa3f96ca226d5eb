//! The embedded broker: librdkafka's in-process mock cluster, so that
//! `host run` works on a fresh machine with no Kafka. It keeps nothing.

use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// An in-process Kafka cluster that lives as long as this value.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    /// Starts a one-broker mock cluster and creates `topics` on it (its
    /// admin API is not faithful, so topics are created through the mock).
    ///
    /// # Errors
    /// When librdkafka cannot start the mock cluster or create a topic.
    pub fn start(topics: &[String], partitions: i32) -> anyhow::Result<Self> {
        let cluster = MockCluster::new(1).context("failed to start the embedded Kafka broker")?;
        for topic in topics {
            cluster
                .create_topic(topic, partitions, 1)
                .with_context(|| format!("failed to create topic {topic:?} on the embedded broker"))?;
        }
        Ok(Self { cluster })
    }

    /// The bootstrap address clients connect to.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }
}
