//! `bench store`: the host's redb store alone, through the adapter the
//! host uses, committing what each order leaves in it (as counted in a
//! stopped bench host's file with `bench store-usage`): 13 handled event
//! ids, the components' state entries, an outbox entry per event (published
//! and forgotten), two vault entries. Handled ids are pruned as the
//! host's scheduler does, past a short horizon; vault entries expire the
//! same way. Prints the file's size and the commit rate as orders go by:
//! whether the store slows or swells as it fills.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use shop_host::state::{Commit, DurableStore, HostStore, OutboxRecord, ReadSet, StateStore};

/// Options of `bench store`.
#[derive(Debug, Args)]
pub struct GrowthArgs {
    /// Orders to commit in all.
    #[arg(long, default_value_t = 100_000)]
    orders: u64,
    /// Print a line every this many orders.
    #[arg(long, default_value_t = 10_000)]
    every: u64,
    /// Orders committed together (one batch per component, as the host's
    /// executors batch what arrives while they commit).
    #[arg(long, default_value_t = 32)]
    batch: u64,
    /// Handled ids and vault entries older than this many orders are
    /// pruned (the clock moves 1 ms per order).
    #[arg(long, default_value_t = 20_000)]
    horizon: u64,
    /// Which ids sort by time (laid out as UUIDv7) instead of being random.
    #[arg(long, value_enum, default_value_t = Ordered::Events)]
    ordered: Ordered,
    /// Directory for the store file (a fresh temporary one by default).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Directory of the JSON results (`store.json`).
    #[arg(long, default_value = "target/bench")]
    out_dir: PathBuf,
}

/// Which ids sort by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordered {
    /// Every id random, as the host derived event ids until 2026-12-07.
    None,
    /// Derived event ids, as the host makes them now: all but
    /// `OrderPlaced`'s (from the order id), which order and analytics handle.
    Events,
    /// Order ids too (the gateway derives them from the `Idempotency-Key`:
    /// random): what the rest would gain.
    All,
}

/// One line of the results.
#[derive(Debug, serde::Serialize)]
struct Point {
    orders: u64,
    file_bytes: u64,
    /// Pages in use by the last committed version.
    allocated_bytes: u64,
    /// Keys and values.
    stored_bytes: u64,
    /// Handled ids kept, all components together.
    handled_ids: u64,
    /// Pages of the handled-id tables and their index by time.
    handled_bytes: u64,
    /// Orders committed per second since the line before.
    orders_per_s: f64,
}

/// The handled ids kept, all components together, and the bytes of the
/// pages of their tables (by id and by time): what pruning is to keep flat
/// while the orders' own state grows with the shop.
fn dedup(tables: &[shop_host::state::durable::TableUsage]) -> (u64, u64) {
    let dedup = tables.iter().filter(|t| t.name.ends_with("/handled") || t.name.ends_with("/handled_at"));
    dedup.fold((0, 0), |(ids, bytes), t| {
        (ids + if t.name.ends_with("/handled") { t.entries } else { 0 }, bytes + t.pages * 4096)
    })
}

/// The state entries one order leaves in a component: key prefix, value bytes.
type StateLeft = &'static [(&'static str, usize)];

/// Handled events per order and component, with the state entries each
/// order leaves (key prefix, value bytes), from a bench host's file.
const COMPONENTS: [(&str, usize, StateLeft); 4] = [
    ("order", 4, &[("order/", 560), ("idempotency/", 560)]),
    ("payment", 2, &[("payment/", 370)]),
    ("email", 1, &[("sent/", 470)]),
    ("analytics", 6, &[("order/", 110)]),
];

/// Runs the bench and prints one line per `every` orders.
///
/// # Errors
/// The store's.
pub fn run(args: &GrowthArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.batch > 0 && args.every > 0, "--batch and --every must be positive");
    let dir = args.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("bench-store-{}", uuid())));
    let path = dir.join("host.redb");
    let host = HostStore::open(&path)?;
    let stores: Vec<(Arc<DurableStore>, usize, StateLeft)> = COMPONENTS
        .iter()
        .map(|(name, events, state)| Ok((Arc::new(host.component(name)?), *events, *state)))
        .collect::<anyhow::Result<_>>()?;
    let vault = host.component("@vault")?;
    println!(
        "{:>9} {:>9} {:>12} {:>9} {:>9} {:>12} {:>10} {:>9}",
        "orders", "file MB", "in use MB", "B/order", "live MB", "handled ids", "handled MB", "orders/s"
    );
    let (mut done, mut mark, mut since, mut points) = (0, Instant::now(), 0, Vec::new());
    while done < args.orders {
        let n = args.batch.min(args.orders - done);
        let now_ms = 1_000_000 + done;
        let ids = |ordered: bool| if ordered { ordered_uuid(now_ms) } else { uuid() };
        let orders: Vec<String> = (0..n).map(|_| ids(args.ordered == Ordered::All)).collect();
        // `OrderPlaced` is the first event of order's and analytics's four
        // and six; its id comes from the order id.
        let events = |first: bool| ids(args.ordered == Ordered::All || (args.ordered == Ordered::Events && !first));
        for (store, per_order, state) in &stores {
            commit_orders(store, &orders, *per_order, state, now_ms, &|event| events(event == 0 && *per_order >= 4))?;
        }
        let vault_writes = orders
            .iter()
            .flat_map(|o| {
                [(format!("card/tok_{o}"), Some(vec![7; 90])), (format!("expires/{now_ms:020}/{o}"), Some(vec![]))]
            })
            .collect();
        vault.commit(Commit { writes: vault_writes, now_ms, ..Commit::default() })?;
        done += n;
        since += n;
        if done % 1_000 < n {
            let before = now_ms.saturating_sub(args.horizon);
            for (store, _, _) in &stores {
                while store.prune_handled(before, 500)? == 500 {}
            }
            expire_vault(&vault, before)?;
        }
        if done % args.every < n || done == args.orders {
            let usage = host.usage()?;
            let rate = since as f64 / mark.elapsed().as_secs_f64();
            let mb = |b: u64| b as f64 / 1e6;
            let (handled_ids, handled_bytes) = dedup(&usage.tables);
            println!(
                "{done:>9} {:>9.1} {:>12.1} {:>9.0} {:>9.1} {handled_ids:>12} {:>10.1} {rate:>9.0}",
                mb(usage.file_bytes),
                mb(usage.allocated_bytes),
                usage.allocated_bytes as f64 / done as f64,
                mb(usage.stored_bytes),
                mb(handled_bytes)
            );
            points.push(Point {
                orders: done,
                file_bytes: usage.file_bytes,
                allocated_bytes: usage.allocated_bytes,
                stored_bytes: usage.stored_bytes,
                handled_ids,
                handled_bytes,
                orders_per_s: rate,
            });
            (mark, since) = (Instant::now(), 0);
        }
    }
    let json =
        serde_json::json!({ "ordered": args.ordered, "horizon": args.horizon, "batch": args.batch, "points": points });
    crate::report::write_json(&args.out_dir, "store", &json)?;
    drop((stores, vault, host));
    if args.dir.is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// A UUID that sorts by `ms` (laid out as a UUIDv7).
fn ordered_uuid(ms: u64) -> String {
    let random: [u8; 10] = uuid::Uuid::new_v4().as_bytes()[6..].try_into().unwrap_or_default();
    uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid().to_string()
}

/// One batch of `orders` through one component: `events` handled events
/// per order, the first writing the order's state entries, each emitting
/// one record, published and forgotten after.
fn commit_orders(
    store: &DurableStore,
    orders: &[String],
    events: usize,
    state: &[(&str, usize)],
    now_ms: u64,
    ids: &dyn Fn(usize) -> String,
) -> anyhow::Result<()> {
    let mut commits = Vec::new();
    for order in orders {
        for event in 0..events {
            let writes = if event == 0 || event + 1 == events {
                state.iter().map(|(prefix, bytes)| (format!("{prefix}{order}"), Some(vec![b'x'; *bytes]))).collect()
            } else {
                Vec::new()
            };
            let record =
                OutboxRecord { topic: "t".into(), key: order.clone(), value: "v".repeat(300), headers: vec![] };
            commits.push(Commit {
                writes,
                handled: Some(ids(event)),
                outbox: vec![record],
                now_ms,
                ..Commit::default()
            });
        }
    }
    store.commit_batch(&commits, &ReadSet::default())?;
    for commit in &commits {
        store.clear_outbox(commit.handled.as_deref().unwrap_or_default())?;
    }
    Ok(())
}

/// Removes the vault entries that expired before `before_ms`, as the
/// vault's sweep does.
fn expire_vault(vault: &DurableStore, before_ms: u64) -> anyhow::Result<()> {
    let keys = vault.keys("expires/", 5_000)?;
    let mut writes = Vec::new();
    for key in keys {
        let Some((at, order)) = key["expires/".len()..].split_once('/') else { continue };
        if at.parse::<u64>().unwrap_or(u64::MAX) >= before_ms {
            break;
        }
        writes.push((format!("card/tok_{order}"), None));
        writes.push((key.clone(), None));
    }
    if !writes.is_empty() {
        vault.commit(Commit { writes, now_ms: before_ms, ..Commit::default() })?;
    }
    Ok(())
}
