//! The host's redb store as it grows: `bench store-usage` prints where a
//! stopped host's file spends its bytes, table by table; `bench store`
//! ([`growth`]) fills one with orders' worth of commits.

use std::path::PathBuf;

use clap::Args;

pub mod growth;
use shop_host::state::HostStore;

/// Options of `bench store-usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The host's store file (`state_dir/host.redb`) of a stopped host.
    #[arg(long)]
    path: PathBuf,
    /// Orders the file went through, to print bytes per order.
    #[arg(long)]
    orders: Option<u64>,
}

/// Prints the file's tables, largest first.
///
/// # Errors
/// The file cannot be opened (a host still runs on it) or read.
pub fn usage(args: &UsageArgs) -> anyhow::Result<()> {
    let store = HostStore::open(&args.path)?;
    let usage = store.usage()?;
    let per = |bytes: u64| args.orders.map_or(String::new(), |n| format!(" ({:.0} B/order)", bytes as f64 / n as f64));
    println!(
        "file {} B{}, allocated {} B{}, keys and values {} B{}",
        usage.file_bytes,
        per(usage.file_bytes),
        usage.allocated_bytes,
        per(usage.allocated_bytes),
        usage.stored_bytes,
        per(usage.stored_bytes)
    );
    println!("{:<32} {:>10} {:>12} {:>8} {:>12}", "table", "entries", "stored B", "pages", "fragmented B");
    for t in &usage.tables {
        println!(
            "{:<32} {:>10} {:>12} {:>8} {:>12}{}",
            t.name,
            t.entries,
            t.stored_bytes,
            t.pages,
            t.fragmented_bytes,
            per(t.pages * 4096)
        );
    }
    Ok(())
}
