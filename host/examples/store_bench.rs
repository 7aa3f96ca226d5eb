//! Prints what one handled event's commit costs in each state adapter:
//! `cargo run -p host --example store_bench [COMMITS]`.
//!
//! A commit here is what `ServiceRuntime::handle` commits for a typical shop
//! event: one state write of ~400 bytes, the handled event id, and an outbox
//! entry of two ~500-byte records. The durable store fsyncs each commit.

use std::time::Instant;

use shop_host::state::{Commit, DurableStore, MemoryStore, OutboxRecord, StateStore};

fn commit(n: usize) -> Commit {
    let record = OutboxRecord {
        topic: "payments".into(),
        key: format!("order-{n}"),
        value: "x".repeat(500),
        headers: vec![("event-type".into(), "PaymentRequested".into())],
    };
    Commit {
        writes: vec![(format!("order/{n}"), Some(vec![b'y'; 400]))],
        handled: Some(format!("event-{n}")),
        outbox: vec![record.clone(), record],
        now_ms: n as u64,
        ..Commit::default()
    }
}

fn run(name: &str, store: &dyn StateStore, commits: usize) {
    let started = Instant::now();
    let mut worst = std::time::Duration::ZERO;
    for n in 0..commits {
        let one = Instant::now();
        store.commit(commit(n)).unwrap();
        store.clear_outbox(&format!("event-{n}")).unwrap();
        worst = worst.max(one.elapsed());
    }
    let elapsed = started.elapsed();
    println!(
        "{name:>8}: {commits} commits + outbox clears in {elapsed:.2?}: {:.0} events/s, mean {:.3} ms, worst {:.3} ms",
        commits as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / commits as f64,
        worst.as_secs_f64() * 1000.0
    );
}

fn main() {
    let commits = std::env::args().nth(1).and_then(|n| n.parse().ok()).unwrap_or(2_000);
    run("memory", &MemoryStore::default(), commits);
    let dir = std::env::temp_dir().join(format!("store-bench-{}", std::process::id()));
    let durable = DurableStore::open(&dir.join("bench.redb")).unwrap();
    run("durable", &durable, commits);
    let size = std::fs::metadata(durable.path()).map(|m| m.len()).unwrap_or(0);
    println!("durable file after {commits} events: {:.1} MiB", size as f64 / (1024.0 * 1024.0));
    drop(durable);
    std::fs::remove_dir_all(&dir).unwrap();
}
