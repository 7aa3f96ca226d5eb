//! Crash safety of the durable state adapter, at the adapter level: a child
//! process commits as fast as it can and is killed with SIGKILL at a random
//! moment, many times over the same file. After every kill the store must
//! open, hold only whole commits, and hold every commit the child saw
//! succeed.
//!
//! The child is this test binary run again with `STATE_CRASH_CHILD` set; it
//! then runs [`child_writer`] instead of the tests.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shop_host::state::{Commit, DurableStore, OutboxRecord, StateStore, Timer, TimerChange};

/// Keys every commit rewrites; a torn commit would leave them disagreeing.
const KEYS: usize = 8;

fn commit_number(n: u64) -> Commit {
    // A large value spreads each commit over many pages.
    let filler = vec![(n % 251) as u8; 16 * 1024];
    let mut writes: Vec<(String, Option<Vec<u8>>)> =
        (0..KEYS).map(|k| (format!("key/{k}"), Some(n.to_string().into_bytes()))).collect();
    writes.push(("filler".into(), Some(filler)));
    Commit {
        writes,
        timers: vec![TimerChange::Set(Timer {
            id: "tick".into(),
            at_ms: n,
            event_type: "Tick".into(),
            key: "k".into(),
            payload: n.to_string(),
            set_by: format!("event-{n}"),
            correlation_id: None,
            traceparent: None,
            nonce: 0,
        })],
        handled: Some(format!("event-{n}")),
        fired: None,
        outbox: vec![OutboxRecord { topic: "t".into(), key: "k".into(), value: n.to_string(), headers: vec![] }],
        now_ms: n,
    }
}

/// The child: resumes after the last commit found and commits forever,
/// printing each number once its commit is durable. Commits are not waited
/// for one by one: several are in flight, as under load, and the flusher
/// groups them.
fn child_writer(path: &Path) -> ! {
    let store = DurableStore::open(path).expect("child: open");
    let mut n = last_commit(&store).map_or(0, |n| n + 1);
    let mut pending = std::collections::VecDeque::new();
    loop {
        pending.push_back((n, store.commit(commit_number(n)).expect("child: commit")));
        if n.is_multiple_of(3) {
            // Some outbox clears (not durable on their own) in between.
            store.clear_outbox(&format!("event-{}", n.saturating_sub(2))).expect("child: clear");
        }
        if pending.len() >= 4 {
            let (done, durable) = pending.pop_front().unwrap();
            durable.wait_blocking().expect("child: durable");
            println!("{done}");
        }
        n += 1;
    }
}

/// The number of the last whole commit in the store, checking that the
/// store holds exactly the commits 0..=n, each whole.
fn last_commit(store: &DurableStore) -> Option<u64> {
    let values: Vec<Option<Vec<u8>>> = (0..KEYS).map(|k| store.get(&format!("key/{k}")).unwrap()).collect();
    let first = values[0].clone();
    assert!(values.iter().all(|v| *v == first), "torn commit: {values:?}");
    let n: u64 = String::from_utf8(first?).unwrap().parse().unwrap();
    let filler = store.get("filler").unwrap().unwrap();
    assert!(filler.len() == 16 * 1024 && filler.iter().all(|b| *b == (n % 251) as u8), "filler of another commit");
    assert!(store.was_handled(&format!("event-{n}")).unwrap(), "handled id missing for commit {n}");
    assert!(!store.was_handled(&format!("event-{}", n + 1)).unwrap(), "handled id of a commit that is not there");
    for earlier in [n / 2, n.saturating_sub(1)] {
        assert!(store.was_handled(&format!("event-{earlier}")).unwrap(), "commit {earlier} missing before {n}");
    }
    let timers = store.due_timers(u64::MAX, 10).unwrap();
    assert_eq!(timers.len(), 1, "{timers:?}");
    assert_eq!((timers[0].at_ms, timers[0].payload.clone()), (n, n.to_string()));
    let last = store.outbox(&format!("event-{n}")).unwrap().expect("outbox entry of the last commit");
    assert_eq!(last.records[0].value, n.to_string());
    Some(n)
}

#[test]
fn committed_state_survives_sigkill_whole() {
    if let Ok(path) = std::env::var("STATE_CRASH_CHILD") {
        child_writer(Path::new(&path));
    }
    let dir = std::env::temp_dir().join(format!("state-crash-{}", uuid::Uuid::new_v4().simple()));
    let path = dir.join("crash.redb");
    let rounds = 30;
    let mut kills = 0;
    let mut last_seen = None;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "committed_state_survives_sigkill_whole", "--nocapture", "--test-threads=1"])
            .env("STATE_CRASH_CHILD", &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Kept open until the kill: a closed pipe would make the child die
        // on its next print instead of at a random point.
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Kill after a varying number of acknowledged commits, so the kill
        // lands at varying points inside a commit.
        let wait_for = 5 + (round * 7) % 23;
        let started = Instant::now();
        let mut acknowledged = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Ok(n) = line.trim().parse::<u64>() {
                acknowledged.push(n);
            }
            if acknowledged.len() >= wait_for {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "child too slow");
        }
        // SIGKILL (not a polite stop), mid-commit most of the time. The
        // point of this sleep: it varies where in a commit the kill lands.
        std::thread::sleep(Duration::from_micros(300 * u64::from(round as u32 % 5)));
        child.kill().unwrap();
        child.wait().unwrap();
        drop(lines);
        kills += 1;
        let store = DurableStore::open(&path).expect("the store opens after a SIGKILL");
        let last = last_commit(&store).expect("commits survived");
        let acked = *acknowledged.last().unwrap();
        assert!(last >= acked, "commit {acked} was acknowledged but the store only has up to {last}");
        if let Some(previous) = last_seen {
            assert!(last > previous, "no progress across a round");
        }
        last_seen = Some(last);
        eprintln!("round {round}: {} commits acknowledged, store holds 0..={last}", acknowledged.len());
    }
    eprintln!("{kills} SIGKILLs, {} whole commits, none torn or lost", last_seen.unwrap() + 1);
    std::fs::remove_dir_all(&dir).unwrap();
}
