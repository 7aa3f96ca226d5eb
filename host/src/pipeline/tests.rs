//! The executor against a store shared with another host.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::clock::ManualClock;
use crate::runtime::tests::runtime_on;
use crate::state::{Commit, Durable, MemoryStore, OutboxEntry, ReadSet, StateStore, StoreError, Timer};

/// A store shared with "another host", which commits the same event just
/// before this host's first commit: the race of a rebalance.
struct Raced {
    inner: MemoryStore,
    raced: AtomicBool,
}

impl StateStore for Raced {
    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError> {
        if !self.raced.swap(true, Ordering::SeqCst) {
            let theirs = Commit {
                writes: vec![("k".into(), Some(b"theirs".to_vec()))],
                handled: commits[0].handled.clone(),
                outbox: vec![OutboxRecord {
                    topic: "out".into(),
                    key: "k".into(),
                    value: "theirs".into(),
                    headers: vec![],
                }],
                ..Commit::default()
            };
            self.inner.commit(theirs)?;
        }
        self.inner.commit_batch(commits, reads)
    }
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.keys(prefix, limit)
    }
    fn sync_point(&self) -> Durable {
        self.inner.sync_point()
    }
    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.was_handled(id)
    }
    fn outbox(&self, source: &str) -> Result<Option<OutboxEntry>, StoreError> {
        self.inner.outbox(source)
    }
    fn pending_outbox(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.inner.pending_outbox(limit)
    }
    fn clear_outbox(&self, source: &str) -> Result<(), StoreError> {
        self.inner.clear_outbox(source)
    }
    fn timer(&self, id: &str) -> Result<Option<Timer>, StoreError> {
        self.inner.timer(id)
    }
    fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<Timer>, StoreError> {
        self.inner.due_timers(now_ms, limit)
    }
    fn timer_count(&self) -> Result<u64, StoreError> {
        self.inner.timer_count()
    }
    fn outbox_count(&self) -> Result<u64, StoreError> {
        self.inner.outbox_count()
    }
}

#[tokio::test]
async fn an_event_another_host_committed_first_is_a_duplicate_not_a_second_effect() {
    let store = Arc::new(Raced { inner: MemoryStore::default(), raced: AtomicBool::new(false) });
    let service = Arc::new(runtime_on("misbehave", 1000, 1, store.clone()));
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    let envelope = Envelope::originate("Echo", "k", "test", 1, serde_json::json!("mine"));
    let record = Inbound {
        topic: "in".into(),
        partition: 0,
        offset: 1,
        key: Some(b"k".to_vec()),
        value: Some(envelope.encode()),
        headers: vec![],
    };
    let disposition = pipeline.process(&record, &CancellationToken::new()).await.unwrap();
    let Disposition::Publish { records, duplicate, .. } = disposition else { panic!("{disposition:?}") };
    assert!(duplicate, "handled again after the conflict, it is found handled");
    let values: Vec<&[u8]> = records.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(values, [b"theirs".as_slice()], "the other host's outputs are published, not a second set");
    assert_eq!(store.get("k").unwrap(), Some(b"theirs".to_vec()), "this host's effect is not applied");
}
