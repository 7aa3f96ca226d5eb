//! Removes what a benchmark host left on the broker: its topics and consumer
//! groups, all named with the run's own `bench-` prefix, so runs do not pile
//! up in the broker's data.

use std::time::Duration;

use anyhow::Context as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Deletes every topic and consumer group whose name starts with `prefix`;
/// returns how many of each were deleted.
///
/// # Errors
/// When `prefix` is not a run prefix (`bench-` and more), or the broker
/// cannot be reached or refuses.
pub async fn delete_prefixed(brokers: &str, prefix: &str) -> anyhow::Result<(usize, usize)> {
    delete_prefixed_within(brokers, prefix, Duration::ZERO).await
}

/// Like [`delete_prefixed`], but a group that still has members is tried
/// again until `patience` has passed: a stopped host with a static member
/// id stays in its groups until its session times out.
///
/// # Errors
/// As [`delete_prefixed`].
pub async fn delete_prefixed_within(brokers: &str, prefix: &str, patience: Duration) -> anyhow::Result<(usize, usize)> {
    // Guard against wiping a shared broker with an empty or generic prefix.
    anyhow::ensure!(
        prefix.starts_with("bench-") && prefix.len() >= "bench-".len() + 4,
        "refusing to delete by prefix {prefix:?}: it must be a run prefix like \"bench-1a2b3c4d.\""
    );
    let give_up = tokio::time::Instant::now() + patience;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "shop-bench")
        .create()
        .context("failed to create the Kafka admin client")?;
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT)).request_timeout(Some(TIMEOUT));
    let mut deleted_groups = 0;
    loop {
        let groups = admin.inner().fetch_group_list(None, TIMEOUT).context("failed to list consumer groups")?;
        let groups: Vec<&str> = groups.groups().iter().map(|g| g.name()).filter(|n| n.starts_with(prefix)).collect();
        if groups.is_empty() {
            break;
        }
        let mut busy = Vec::new();
        for result in admin.delete_groups(&groups, &options).await.context("failed to delete consumer groups")? {
            match result {
                Ok(_) => deleted_groups += 1,
                Err((group, RDKafkaErrorCode::NonEmptyGroup)) => busy.push(group),
                Err((group, code)) => eprintln!("bench: consumer group {group:?} not deleted: {code}"),
            }
        }
        if busy.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= give_up {
            for group in busy {
                eprintln!("bench: consumer group {group:?} not deleted: it still has members");
            }
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let metadata = admin.inner().fetch_metadata(None, TIMEOUT).context("failed to list topics")?;
    let topics: Vec<&str> = metadata.topics().iter().map(|t| t.name()).filter(|n| n.starts_with(prefix)).collect();
    let mut deleted_topics = 0;
    if !topics.is_empty() {
        for result in admin.delete_topics(&topics, &options).await.context("failed to delete topics")? {
            match result {
                Ok(_) => deleted_topics += 1,
                Err((topic, code)) => eprintln!("bench: topic {topic:?} not deleted: {code}"),
            }
        }
    }
    Ok((deleted_topics, deleted_groups))
}
