//! A randomized interleaving test, in the spirit of Jepsen's checkers:
//! several "hosts" (store handles; on PostgreSQL each its own connection
//! pool) handle conflicting events on a handful of hot keys in batches,
//! with random pauses between reads, random batches abandoned before their
//! commit (a host killed mid-batch: its events come back later) and events
//! delivered to two hosts at once (a rebalance). A model is checked at the
//! end: no stock below zero, every sale and restock counted exactly once,
//! no lost counter update, every event's effect applied once. Bounded in
//! time; the seed is printed (set `INTERLEAVINGS_SEED` to replay one).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::*;

const SKUS: [&str; 3] = ["lamp", "desk", "pen"];
const STOCK: u64 = 5;
const HOSTS: usize = 3;
const EVENTS: usize = 120;
const BOUND: Duration = Duration::from_secs(20);

/// xorshift64*: enough randomness for a schedule, reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone)]
enum Op {
    Sell(&'static str),
    Restock(&'static str),
    Count,
}

fn read_u64(overlay: &Overlay, key: &str) -> u64 {
    overlay.get(key).unwrap_or_default().and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0)
}

/// Handles `op` on the batch's view: the writes it makes, or none.
fn handle(overlay: &Overlay, id: &str, op: &Op, rng: &mut Rng) -> Vec<Write> {
    let pause = || std::thread::sleep(Duration::from_micros(200));
    let set = |key: String, n: u64| (key, Some(n.to_string().into_bytes()));
    let mut writes = vec![(format!("effect/{id}"), Some(b"1".to_vec()))];
    match op {
        Op::Sell(sku) => {
            let stock = read_u64(overlay, &format!("stock/{sku}"));
            if rng.below(2) == 0 {
                pause();
            }
            // Read again: what a second read sees must be what the first did.
            let again = read_u64(overlay, &format!("stock/{sku}"));
            assert_eq!(stock, again, "a re-read within a batch saw another value");
            if stock > 0 {
                writes.push(set(format!("stock/{sku}"), stock - 1));
                let sold = read_u64(overlay, &format!("sold/{sku}"));
                writes.push(set(format!("sold/{sku}"), sold + 1));
            }
        }
        Op::Restock(sku) => {
            let stock = read_u64(overlay, &format!("stock/{sku}"));
            writes.push(set(format!("stock/{sku}"), stock + 1));
            let restocked = read_u64(overlay, &format!("restocked/{sku}"));
            writes.push(set(format!("restocked/{sku}"), restocked + 1));
        }
        Op::Count => {
            if rng.below(3) == 0 {
                pause();
            }
            let count = read_u64(overlay, "count");
            writes.push(set("count".to_owned(), count + 1));
        }
    }
    writes
}

/// One host: takes events off the shared queue in batches, handles them on
/// an overlay and commits; a conflict or an abandoned batch puts them back.
fn host(store: Arc<dyn StateStore>, queue: &Mutex<VecDeque<(String, Op)>>, seed: u64, deadline: Instant) {
    let mut rng = Rng(seed | 1);
    let take = |n: usize| {
        let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
        let n = n.min(queue.len());
        queue.drain(..n).collect::<Vec<_>>()
    };
    let give_back = |events: Vec<(String, Op)>| {
        queue.lock().unwrap_or_else(PoisonError::into_inner).extend(events);
    };
    while Instant::now() < deadline {
        let batch = take(1 + rng.below(4) as usize);
        if batch.is_empty() {
            return;
        }
        // A rebalance: another host may handle the same events meanwhile.
        if rng.below(5) == 0 {
            give_back(batch.clone());
        }
        let ids: Vec<&str> = batch.iter().map(|(id, _)| id.as_str()).collect();
        let Ok(handled) = store.handled_among(&ids) else {
            give_back(batch);
            continue;
        };
        let overlay = Overlay::new(store.clone());
        let mut commits = Vec::new();
        for (id, op) in batch.iter().filter(|(id, _)| !handled.contains(id)) {
            let writes = handle(&overlay, id, op, &mut rng);
            let commit = Commit { writes, handled: Some(id.clone()), now_ms: 1, ..Commit::default() };
            overlay.record(&commit);
            commits.push(commit);
        }
        if commits.is_empty() {
            continue;
        }
        // Killed before its commit: nothing of the batch lands.
        if rng.below(10) == 0 {
            give_back(batch);
            continue;
        }
        match store.commit_batch(&commits, &overlay.reads()) {
            Ok(_) => {}
            Err(StoreError::Conflict(_) | StoreError::Unavailable(_)) => give_back(batch),
            Err(err) => panic!("seed {seed}: {err}"),
        }
    }
}

/// Runs the schedule of `seed` on `handles` (one per host) and checks the model.
pub(super) fn run(handles: Vec<Arc<dyn StateStore>>, seed: u64) {
    eprintln!("interleavings: seed {seed} (INTERLEAVINGS_SEED={seed} replays it)");
    let mut rng = Rng(seed | 1);
    let setup = Commit {
        writes: SKUS.iter().map(|sku| (format!("stock/{sku}"), Some(STOCK.to_string().into_bytes()))).collect(),
        ..Commit::default()
    };
    handles[0].commit(setup).unwrap();
    let mut events = VecDeque::new();
    let mut expected = BTreeMap::new();
    for i in 0..EVENTS {
        let sku = SKUS[rng.below(SKUS.len() as u64) as usize];
        let op = match rng.below(4) {
            0 => Op::Restock(sku),
            1 => Op::Count,
            _ => Op::Sell(sku),
        };
        expected.insert(format!("e{i}"), op.clone());
        events.push_back((format!("e{i}"), op));
    }
    let queue = Mutex::new(events);
    let deadline = Instant::now() + BOUND;
    std::thread::scope(|scope| {
        for (n, store) in handles.iter().cycle().take(HOSTS).enumerate() {
            let (queue, store) = (&queue, store.clone());
            scope.spawn(move || host(store, queue, seed.wrapping_add(n as u64 * 7919), deadline));
        }
    });
    check(&*handles[0], &expected, seed);
}

fn check(store: &dyn StateStore, expected: &BTreeMap<String, Op>, seed: u64) {
    let number =
        |key: &str| store.get(key).unwrap().map_or(0, |v| String::from_utf8(v).unwrap().parse::<u64>().unwrap());
    let ids: Vec<&str> = expected.keys().map(String::as_str).collect();
    let handled = store.handled_among(&ids).unwrap();
    assert_eq!(handled.len(), expected.len(), "seed {seed}: every event handled within the bound");
    let effects = store.keys("effect/", 10_000).unwrap();
    assert_eq!(effects.len(), expected.len(), "seed {seed}: every event's effect once");
    let counts = expected.values().filter(|op| matches!(op, Op::Count)).count() as u64;
    assert_eq!(number("count"), counts, "seed {seed}: a lost counter update");
    for sku in SKUS {
        let (stock, sold, restocked) =
            (number(&format!("stock/{sku}")), number(&format!("sold/{sku}")), number(&format!("restocked/{sku}")));
        let restocks = expected.values().filter(|op| matches!(op, Op::Restock(s) if *s == sku)).count() as u64;
        assert_eq!(restocked, restocks, "seed {seed}: {sku} restocks counted once");
        assert_eq!(
            STOCK + restocked,
            stock + sold,
            "seed {seed}: {sku}: stock {stock}, sold {sold}, restocked {restocked}"
        );
    }
}

/// The seed to run: `INTERLEAVINGS_SEED`, else the clock's.
fn seed() -> u64 {
    std::env::var("INTERLEAVINGS_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        u64::try_from(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
                % u128::from(u64::MAX),
        )
        .unwrap_or(1)
    })
}

#[test]
fn interleavings_on_the_memory_store() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
    run(vec![store], seed());
}

#[test]
fn interleavings_on_redb() {
    let path = std::env::temp_dir().join(format!("interleavings-{}", uuid::Uuid::new_v4().simple())).join("s.redb");
    let store: Arc<dyn StateStore> = Arc::new(DurableStore::open(&path).unwrap());
    run(vec![store], seed());
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn interleavings_on_postgres_hosts() {
    let schema = contract::TestSchema::new();
    let url = contract::database_url();
    let others: Vec<PgStores> = (1..HOSTS).map(|_| PgStores::connect(&url, &schema.name).unwrap()).collect();
    let mut handles: Vec<Arc<dyn StateStore>> = vec![Arc::new(schema.stores.store("jepsen"))];
    handles.extend(others.iter().map(|stores| Arc::new(stores.store("jepsen")) as Arc<dyn StateStore>));
    run(handles, seed());
}
