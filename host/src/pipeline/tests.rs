//! The executor against a store shared with another host.

use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::clock::ManualClock;
use crate::envelope::Envelope;
use crate::runtime::tests::runtime_on;
use crate::state::{Commit, Durable, MemoryStore, OutboxEntry, OutboxRecord, ReadSet, StateStore, StoreError, Timer};

/// What a [`Hooked`] store asks before each batch commit: `Some` answers
/// in the store's place, `None` lets the store commit.
type Hook = Box<dyn Fn(&MemoryStore, &[Commit]) -> Option<Result<Durable, StoreError>> + Send + Sync>;

/// What a [`Hooked`] store asks before telling whether an event was
/// handled: `Some` answers in the store's place.
type HandledHook = Box<dyn Fn(&str) -> Option<Result<bool, StoreError>> + Send + Sync>;

/// A memory store whose batch commits (and, if asked, whether an event was
/// handled) go through its hooks first.
struct Hooked {
    inner: MemoryStore,
    hook: Hook,
    handled: Option<HandledHook>,
}

impl Hooked {
    fn new(
        hook: impl Fn(&MemoryStore, &[Commit]) -> Option<Result<Durable, StoreError>> + Send + Sync + 'static,
    ) -> Self {
        Self { inner: MemoryStore::default(), hook: Box::new(hook), handled: None }
    }

    fn with_was_handled(self, hook: impl Fn(&str) -> Option<Result<bool, StoreError>> + Send + Sync + 'static) -> Self {
        Self { handled: Some(Box::new(hook)), ..self }
    }
}

impl StateStore for Hooked {
    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<Durable, StoreError> {
        (self.hook)(&self.inner, commits).unwrap_or_else(|| self.inner.commit_batch(commits, reads))
    }
    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        self.handled.as_ref().and_then(|hook| hook(id)).unwrap_or_else(|| self.inner.was_handled(id))
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

/// A store shared with "another host", which commits the same event just
/// before this host's first commit: the race of a rebalance.
fn raced() -> Hooked {
    let raced = AtomicBool::new(false);
    Hooked::new(move |inner: &MemoryStore, commits: &[Commit]| {
        if raced.swap(true, Ordering::SeqCst) {
            return None;
        }
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
        inner.commit(theirs).err().map(Err)
    })
}

#[tokio::test]
async fn an_event_another_host_committed_first_is_a_duplicate_not_a_second_effect() {
    let store = Arc::new(raced());
    let service = Arc::new(runtime_on("misbehave", 1000, 1, store.clone()));
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    let envelope = Envelope::originate("Echo", "k", "test", 1, serde_json::json!("mine"));
    let record = Inbound {
        topic: "in".into(),
        partition: 0,
        offset: 1,
        key: Some(b"k".to_vec()),
        value: Some(envelope.value()),
        headers: envelope.header_bytes(None),
    };
    let disposition = pipeline.process(&record, &CancellationToken::new()).await.unwrap();
    let Disposition::Publish { records, duplicate, .. } = disposition else { panic!("{disposition:?}") };
    assert!(duplicate, "handled again after the conflict, it is found handled");
    let values: Vec<&[u8]> = records.iter().map(|r| r.value.as_slice()).collect();
    assert_eq!(values, [b"theirs".as_slice()], "the other host's outputs are published, not a second set");
    assert_eq!(store.get("k").unwrap(), Some(b"theirs".to_vec()), "this host's effect is not applied");
}

/// A store whose first batch commit conflicts, and which then cannot tell
/// whether event `failing` was handled, asking for shutdown as it says so:
/// shutdown comes while the conflicting batch is being handled again.
fn conflict_then_shutdown(failing: String, shutdown: CancellationToken) -> Hooked {
    let conflicted = Arc::new(AtomicBool::new(false));
    let first = conflicted.clone();
    Hooked::new(move |_, _| (!first.swap(true, Ordering::SeqCst)).then(|| Err(StoreError::Conflict("injected".into()))))
        .with_was_handled(move |id| {
            (conflicted.load(Ordering::SeqCst) && id == failing).then(|| {
                shutdown.cancel();
                Err(StoreError::Unavailable("injected".into()))
            })
        })
}

fn record(envelope: &Envelope, offset: i64) -> Inbound {
    Inbound {
        topic: "in".into(),
        partition: 0,
        offset,
        key: Some(envelope.order_id.clone().into_bytes()),
        value: Some(envelope.value()),
        headers: envelope.header_bytes(None),
    }
}

/// Shutdown while a conflicting batch is handled again: the interrupted
/// event is not handled, and neither is any later event of its key (they
/// would otherwise commit before it, out of order on redelivery); another
/// key's event is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_conflict_rerun_keeps_each_key_in_order() {
    let e1 = Envelope::originate("Echo", "k", "test", 1, serde_json::json!("first"));
    let e2 = Envelope::caused(&e1, 0, "Echo", "k", "test", 2, crate::envelope::raw(&serde_json::json!("second")));
    let other = Envelope::originate("Echo", "other", "test", 3, serde_json::json!("x"));
    let shutdown = CancellationToken::new();
    let store = Arc::new(conflict_then_shutdown(e1.id.clone(), shutdown.clone()));
    let service = Arc::new(runtime_on("misbehave", 300, 1, store.clone()));
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    // A spinning event of its own key keeps the executor busy (until its
    // call times out) while the three queue up: they make one batch.
    let spin = Envelope::originate("Spin", "spin", "test", 1, serde_json::json!({}));
    let spinning = pipeline.submit(record(&spin, 0), &CancellationToken::new());
    let first = pipeline.submit(record(&e1, 1), &shutdown);
    let second = pipeline.submit(record(&e2, 2), &shutdown);
    let third = pipeline.submit(record(&other, 3), &shutdown);
    let (first, second, third) = tokio::join!(first, second, third);
    assert!(first.is_none(), "interrupted: not handled");
    assert!(second.is_none(), "a later event of its key must not commit before it: {second:?}");
    assert!(matches!(third, Some(Disposition::Publish { duplicate: false, .. })), "{third:?}");
    assert_eq!(store.get("k").unwrap(), None, "nothing of key k committed");
    assert_eq!(store.get("other").unwrap(), Some(b"\"x\"".to_vec()));
    drop(spinning);
}

/// A commit the store refuses for good (a value PostgreSQL cannot keep,
/// say) in a batch of three: the batch is split, the one event at fault is
/// dead-lettered with the store's reason, and the two others commit, so
/// that no input stalls its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_store_refuses_dead_letters_only_its_own_event() {
    let bad = Envelope::originate("Echo", "bad", "test", 1, serde_json::json!("refused"));
    let good = Envelope::originate("Echo", "good", "test", 2, serde_json::json!("kept"));
    let other = Envelope::originate("Echo", "other", "test", 3, serde_json::json!("kept too"));
    let (bad_id, refusals) = (bad.id.clone(), Arc::new(std::sync::atomic::AtomicUsize::new(0)));
    let counted = refusals.clone();
    let hook = move |_: &MemoryStore, commits: &[Commit]| {
        commits.iter().any(|c| c.handled.as_deref() == Some(bad_id.as_str())).then(|| {
            counted.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::Refused("invalid byte sequence".into()))
        })
    };
    let store = Arc::new(Hooked::new(hook));
    let service = Arc::new(runtime_on("misbehave", 300, 1, store.clone()));
    let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
    // A spinning event keeps the executor busy while the three queue up:
    // they make one batch.
    let spin = Envelope::originate("Spin", "spin", "test", 1, serde_json::json!({}));
    let spinning = pipeline.submit(record(&spin, 0), &CancellationToken::new());
    let shutdown = CancellationToken::new();
    let (bad, good, other) = tokio::join!(
        pipeline.submit(record(&bad, 1), &shutdown),
        pipeline.submit(record(&good, 2), &shutdown),
        pipeline.submit(record(&other, 3), &shutdown)
    );
    let Some(Disposition::DeadLetter { reason, .. }) = bad else { panic!("{bad:?}") };
    assert!(reason.contains("the state store refuses its commit: invalid byte sequence"), "{reason}");
    assert!(matches!(good, Some(Disposition::Publish { duplicate: false, .. })), "{good:?}");
    assert!(matches!(other, Some(Disposition::Publish { duplicate: false, .. })), "{other:?}");
    assert_eq!(store.get("good").unwrap(), Some(b"\"kept\"".to_vec()));
    assert_eq!(store.get("other").unwrap(), Some(b"\"kept too\"".to_vec()));
    assert_eq!(store.get("bad").unwrap(), None, "nothing of the refused event is kept");
    assert_eq!(refusals.load(Ordering::SeqCst), 2, "refused in the batch, then alone");
    drop(spinning);
}

/// `kafka.wire_format = "v1"`: outputs are written as the version-1
/// envelope hosts before CloudEvents read, which reads back as the same
/// event; by default, binary mode.
#[tokio::test]
async fn outputs_are_written_in_the_wire_format_set() {
    let echo = Envelope::originate("Echo", "k", "test", 1, serde_json::json!("hi"));
    for (format, legacy) in [(None, false), (Some(crate::manifest::WireFormat::V1), true)] {
        let service = Arc::new(runtime_on("misbehave", 1000, 1, Arc::new(MemoryStore::default())));
        let pipeline = Pipeline::new(service, Topics::default(), RetryPolicy::default(), Arc::new(ManualClock::at(5)));
        if let Some(format) = format {
            pipeline.set_wire_format(format);
        }
        let disposition = pipeline.process(&record(&echo, 1), &CancellationToken::new()).await.unwrap();
        let Disposition::Publish { records, .. } = disposition else { panic!("{disposition:?}") };
        let out = &records[0];
        let value: serde_json::Value = serde_json::from_slice(&out.value).unwrap();
        let has = |name: &str| out.headers.iter().any(|(k, _)| k == name);
        assert_eq!((value.get("schema_version").is_some(), has("ce_id"), has("event-type")), (legacy, !legacy, legacy));
        let read = Envelope::decode(&out.headers, Some(out.key.as_bytes()), Some(&out.value)).unwrap();
        assert_eq!(
            (read.causation_id.as_deref(), read.correlation_id.as_str()),
            (Some(echo.id.as_str()), echo.id.as_str())
        );
    }
}
