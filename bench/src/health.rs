//! Time to healthy: how long a freshly started host takes until every
//! port's `/health` answers 200.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use crate::gateway::Gateway;

const POLL: Duration = Duration::from_millis(10);

/// Waits until every URL in `urls` answers 200 and returns the time taken.
///
/// With `pid`, the clock starts when that process becomes the executable
/// named `exe_name`: `cargo run` execs the host in place, and its own
/// freshness check is no part of the host's start. Without it, or if the
/// exec already happened, the clock starts now.
///
/// # Errors
/// When `timeout` passes first (counted from the start of the clock), or
/// the process `pid` exits.
pub async fn wait(
    gateway: &Gateway,
    urls: &[String],
    pid: Option<u32>,
    exe_name: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let start = match pid {
        Some(pid) => exec_time(pid, exe_name, Instant::now() + EXEC_TIMEOUT).await?,
        None => Instant::now(),
    };
    let give_up = start + timeout;
    let mut pending: Vec<&String> = urls.iter().collect();
    loop {
        let mut still = Vec::with_capacity(pending.len());
        for url in pending {
            if !gateway.healthy(url).await {
                still.push(url);
            }
        }
        if still.is_empty() {
            let elapsed = start.elapsed();
            // Otherwise the answers came from another process on those ports.
            if let Some(pid) = pid {
                anyhow::ensure!(alive(pid), "the host (pid {pid}) exited; another process answers on its ports");
            }
            return Ok(elapsed);
        }
        if let Some(pid) = pid {
            anyhow::ensure!(alive(pid), "the host (pid {pid}) exited before it was healthy");
        }
        anyhow::ensure!(Instant::now() < give_up, "not healthy within {timeout:?}: {still:?} did not answer 200");
        pending = still;
        tokio::time::sleep(POLL).await;
    }
}

/// `cargo run` may first wait for the build directory's lock (another
/// build) or rebuild: allow for that before the host itself starts.
const EXEC_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// When `pid` started running `exe_name`, noticed within a millisecond.
async fn exec_time(pid: u32, exe_name: &str, give_up: Instant) -> anyhow::Result<Instant> {
    let exe = format!("/proc/{pid}/exe");
    let mut first_look = true;
    loop {
        let target = std::fs::read_link(&exe);
        let name = target.as_deref().ok().and_then(Path::file_name).and_then(|n| n.to_str()).unwrap_or("");
        // A rebuilt binary shows as "host (deleted)".
        if name == exe_name || name.starts_with(&format!("{exe_name} ")) {
            if first_look {
                eprintln!("bench: {exe_name} was already running when the clock started: the time is a lower bound");
            }
            return Ok(Instant::now());
        }
        anyhow::ensure!(alive(pid), "process {pid} exited before running {exe_name:?}");
        anyhow::ensure!(Instant::now() < give_up, "process {pid} did not start {exe_name:?} in time");
        first_look = false;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter says it is gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}
