//! Prints what one handled event's commit costs in each state adapter:
//! `cargo run -p host --example store_bench [COMMITS]`.
//!
//! A commit here is what `ServiceRuntime::handle` commits for a typical shop
//! event: one state write of ~400 bytes, the handled event id, and an outbox
//! entry of two ~500-byte records. "one by one" waits for each commit to be
//! durable before the next (a single event at a time); "pipelined" keeps up
//! to 64 commits in flight, as the consumer does under load, so the durable
//! store's flusher covers many commits with one fsync.

use std::time::Instant;

use shop_host::state::{Commit, DurableStore, MemoryStore, OutboxRecord, StateStore};

fn commit(n: usize) -> Commit {
    let record = OutboxRecord {
        topic: "payments".into(),
        key: format!("order-{n}"),
        value: "x".repeat(500),
        headers: vec![("ce_type".into(), "PaymentRequested".into())],
    };
    Commit {
        writes: vec![(format!("order/{n}"), Some(vec![b'y'; 400]))],
        handled: Some(format!("event-{n}")),
        outbox: vec![record.clone(), record],
        now_ms: n as u64,
        ..Commit::default()
    }
}

fn run(name: &str, store: &dyn StateStore, commits: usize, in_flight: usize, offset: usize) {
    let started = Instant::now();
    let mut worst = std::time::Duration::ZERO;
    let mut pending = std::collections::VecDeque::new();
    for n in offset..offset + commits {
        pending.push_back((n, Instant::now(), store.commit(commit(n)).unwrap()));
        while pending.len() >= in_flight {
            let (done, at, durable) = pending.pop_front().unwrap();
            durable.wait_blocking().unwrap();
            store.clear_outbox(&format!("event-{done}")).unwrap();
            worst = worst.max(at.elapsed());
        }
    }
    for (done, at, durable) in pending {
        durable.wait_blocking().unwrap();
        store.clear_outbox(&format!("event-{done}")).unwrap();
        worst = worst.max(at.elapsed());
    }
    let elapsed = started.elapsed();
    let mode = if in_flight == 1 { "one by one" } else { "pipelined" };
    println!(
        "{name:>8} {mode:>10}: {commits} events in {elapsed:.2?}: {:.0} events/s, commit-to-durable worst {:.3} ms",
        commits as f64 / elapsed.as_secs_f64(),
        worst.as_secs_f64() * 1000.0
    );
}

fn main() {
    let commits = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(2_000);
    run("memory", &MemoryStore::default(), commits, 1, 0);
    let dir = std::env::temp_dir().join(format!("store-bench-{}", std::process::id()));
    let durable = DurableStore::open(&dir.join("bench.redb")).unwrap();
    run("durable", &durable, commits, 1, 0);
    run("durable", &durable, commits, 64, commits);
    let size = std::fs::metadata(durable.path()).map(|m| m.len()).unwrap_or(0);
    println!("durable file after {} events: {:.1} MiB", 2 * commits, size as f64 / (1024.0 * 1024.0));
    drop(durable);
    std::fs::remove_dir_all(&dir).unwrap();
}
