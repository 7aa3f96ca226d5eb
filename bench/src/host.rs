//! CPU time and memory of a process, read from `/proc` (Linux only).

use std::path::PathBuf;

use anyhow::Context as _;
use serde::Serialize;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// User plus system CPU time since the process started, in seconds.
    pub cpu_s: f64,
    /// Resident set size, in MiB.
    pub rss_mib: f64,
    /// Peak resident set size so far (`VmHWM`), in MiB.
    pub peak_rss_mib: f64,
}

/// Which process to read: a pid, or the driver itself.
#[derive(Debug, Clone, Copy)]
pub enum Process {
    /// Another process, e.g. the host.
    Pid(u32),
    /// This process.
    Myself,
}

impl Process {
    fn dir(self) -> PathBuf {
        match self {
            Self::Pid(pid) => PathBuf::from(format!("/proc/{pid}")),
            Self::Myself => PathBuf::from("/proc/self"),
        }
    }

    /// Reads the process's counters now.
    ///
    /// # Errors
    /// When the process is gone or `/proc` cannot be read or parsed.
    pub fn sample(self) -> anyhow::Result<Sample> {
        let dir = self.dir();
        let stat = std::fs::read_to_string(dir.join("stat")).with_context(|| format!("failed to read {dir:?}/stat"))?;
        let status =
            std::fs::read_to_string(dir.join("status")).with_context(|| format!("failed to read {dir:?}/status"))?;
        let ticks = parse_cpu_ticks(&stat).with_context(|| format!("unexpected {dir:?}/stat: {stat:?}"))?;
        Ok(Sample {
            cpu_s: ticks as f64 / clock_ticks_per_second(),
            rss_mib: status_kib(&status, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
            peak_rss_mib: status_kib(&status, "VmHWM:").unwrap_or(0) as f64 / 1024.0,
        })
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The value in kB of `key` (e.g. `VmRSS:`) in `/proc/PID/status`.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "4242 (my (odd) host) S 1 4242 4242 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 9 0 1000 1 2";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn rss_is_read_in_kib() {
        let status = "Name:\thost\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads:\t9\n";
        assert_eq!(status_kib(status, "VmRSS:"), Some(102_400));
        assert_eq!(status_kib(status, "VmHWM:"), Some(204_800));
        assert_eq!(status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = Process::Myself.sample().unwrap();
        assert!(sample.rss_mib > 0.0 && sample.peak_rss_mib >= sample.rss_mib);
    }
}
