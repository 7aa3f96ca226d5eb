//! Reload on file change: each component's `.wasm` is polled and, once a
//! change has settled (debounce), the new bytes are offered to
//! [`ServiceRuntime::reload`]. Polling rather than inotify: it sees every way
//! a build tool replaces a file (rename, copy, hard link) and needs no
//! platform support.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};
use tokio_util::sync::CancellationToken;

use crate::runtime::ServiceRuntime;

/// How often the file is checked, and how long a change must hold still.
#[derive(Debug, Clone, Copy)]
pub struct WatchTiming {
    pub poll: Duration,
    pub settle: Duration,
}

impl Default for WatchTiming {
    fn default() -> Self {
        Self { poll: Duration::from_millis(200), settle: Duration::from_millis(400) }
    }
}

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Watches `path` until `shutdown`, reloading `service` when it changes.
pub async fn watch(service: Arc<ServiceRuntime>, path: PathBuf, timing: WatchTiming, shutdown: CancellationToken) {
    let mut seen = stamp(&path);
    // The last bytes refused, so a rejected file is not offered again and
    // again until it changes. Bytes once accepted are offered again if
    // another version (an admin upload) has replaced them meanwhile.
    let mut rejected: Option<String> = None;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(timing.poll) => {}
        }
        let now = stamp(&path);
        if now == seen || now.is_none() {
            continue;
        }
        // Debounce: wait until the file stops changing.
        let mut settled = now;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(timing.settle) => {}
            }
            let again = stamp(&path);
            if again == settled {
                break;
            }
            settled = again;
        }
        seen = settled;
        let Ok(bytes) = tokio::fs::read(&path).await else { continue };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        if rejected.as_ref() == Some(&sha256) || sha256 == service.current().sha256 {
            continue;
        }
        tracing::info!(component = service.name(), ?path, "file changed: reloading");
        // Errors are logged and recorded in the history by `reload`.
        let reloaded = service.reload(&path.display().to_string(), bytes).await;
        rejected = reloaded.is_err().then_some(sha256);
    }
}
