//! CPU time and memory of a process, of a set of processes (a database
//! server and its backends) and of the whole machine, read from `/proc`
//! (Linux only).

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
    /// Context switches of all its threads so far, voluntary (waiting for
    /// something: a wake-up) and not, from each `task/*/status`; threads
    /// that ended are not counted.
    pub switches: u64,
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
            rss_mib: status_number(&status, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
            peak_rss_mib: status_number(&status, "VmHWM:").unwrap_or(0) as f64 / 1024.0,
            switches: thread_switches(&dir),
        })
    }
}

/// Context switches of every thread of the process in `dir` so far.
fn thread_switches(dir: &std::path::Path) -> u64 {
    let Ok(tasks) = std::fs::read_dir(dir.join("task")) else { return 0 };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("status")).ok())
        .map(|status| {
            status_number(&status, "voluntary_ctxt_switches:").unwrap_or(0)
                + status_number(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0)
        })
        .sum()
}

/// A set of processes whose CPU time is counted together.
#[derive(Debug, Clone, Copy)]
pub enum Processes<'a> {
    /// Every process whose command name (`comm`) is this, e.g. `postgres`:
    /// a server and its backends.
    Named(&'a str),
    /// Every process whose command line holds this, e.g. `kafka.Kafka`.
    CommandLine(&'a str),
}

impl Processes<'_> {
    /// CPU seconds of every process of the set now, counting what each has
    /// reaped of its children (`cutime + cstime`): a backend that exits
    /// during a window moves its time to the server's children total, so a
    /// difference of two readings holds it.
    ///
    /// # Errors
    /// When `/proc` cannot be listed.
    pub fn cpu_s(self) -> anyhow::Result<f64> {
        let mut ticks = 0;
        for entry in std::fs::read_dir("/proc").context("failed to list /proc")? {
            let Ok(entry) = entry else { continue };
            if !entry.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                continue;
            }
            // A process may exit between the listing and the reads: skip it.
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let member = match self {
                Self::Named(name) => command_name(&stat) == Some(name),
                Self::CommandLine(part) => std::fs::read(entry.path().join("cmdline"))
                    .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(part)),
            };
            if member {
                ticks += parse_cpu_ticks_with_children(&stat).unwrap_or(0);
            }
        }
        Ok(ticks as f64 / clock_ticks_per_second())
    }
}

/// The machine's CPU time since boot, from `/proc/stat`, in seconds summed
/// over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct MachineSample {
    /// Time the cores were busy (all but idle and iowait).
    pub busy_s: f64,
    /// All time, busy or not.
    pub total_s: f64,
}

impl MachineSample {
    /// Reads `/proc/stat` now.
    ///
    /// # Errors
    /// When `/proc/stat` cannot be read or parsed.
    pub fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("failed to read /proc/stat")?;
        parse_machine(&stat).with_context(|| format!("unexpected /proc/stat: {stat:?}"))
    }

    /// The share of the cores' time that was busy between `before` and `self`.
    pub fn busy_share_since(self, before: Self) -> Option<f64> {
        let total = self.total_s - before.total_s;
        (total > 0.0).then(|| (self.busy_s - before.busy_s) / total)
    }
}

fn parse_machine(stat: &str) -> Option<MachineSample> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice,
    // already counted in user and nice].
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    let hz = clock_ticks_per_second();
    Some(MachineSample { busy_s: total.saturating_sub(idle) as f64 / hz, total_s: total as f64 / hz })
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

/// The command name (field 2, between the first `(` and the last `)`).
fn command_name(stat: &str) -> Option<&str> {
    let start = stat.find('(')?;
    let end = stat.rfind(')')?;
    stat.get(start + 1..end)
}

/// `utime + stime + cutime + cstime` (fields 14 to 17) of a `/proc/PID/stat` line.
fn parse_cpu_ticks_with_children(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let mut ticks = 0;
    for field in fields.get(11..15)? {
        // cutime and cstime are signed in the kernel's format.
        ticks += field.parse::<i64>().ok()?.max(0) as u64;
    }
    Some(ticks)
}

/// The number after `key` in `/proc/PID/status`: kB for `VmRSS:`, a count
/// for `voluntary_ctxt_switches:`.
fn status_number(status: &str, key: &str) -> Option<u64> {
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
        assert_eq!(status_number(status, "VmRSS:"), Some(102_400));
        assert_eq!(status_number(status, "VmHWM:"), Some(204_800));
        assert_eq!(status_number(status, "VmSwap:"), None);
    }

    #[test]
    fn a_server_counts_its_reaped_children() {
        let stat = "15234 (postgres) S 1 15234 15234 0 -1 4194560 100 0 0 0 250 50 700 300 20 0 1 0 1000 1 2";
        assert_eq!(command_name(stat), Some("postgres"));
        assert_eq!(parse_cpu_ticks_with_children(stat), Some(1_300));
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
        let sample = parse_machine(stat).unwrap();
        let hz = clock_ticks_per_second();
        assert_eq!((sample.busy_s * hz, sample.total_s * hz), (150.0, 1_000.0));
        let later = MachineSample { busy_s: sample.busy_s + 1.0, total_s: sample.total_s + 2.0 };
        assert_eq!(later.busy_share_since(sample), Some(0.5));
    }

    #[test]
    fn this_process_is_found_by_its_command_line() {
        let own = std::fs::read("/proc/self/cmdline").unwrap();
        let own = String::from_utf8_lossy(&own);
        let name = own.split('\0').next().unwrap();
        // Busy until the kernel has counted a few ticks of this process.
        while Process::Myself.sample().unwrap().cpu_s < 0.05 {
            std::hint::black_box((0..10_000u64).sum::<u64>());
        }
        assert!(Processes::CommandLine(name).cpu_s().unwrap() >= 0.05);
    }

    #[test]
    fn this_process_can_be_sampled() {
        let sample = Process::Myself.sample().unwrap();
        assert!(sample.rss_mib > 0.0 && sample.peak_rss_mib >= sample.rss_mib);
    }
}
