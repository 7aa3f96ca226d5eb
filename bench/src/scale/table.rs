//! The scale-out runs as a table (a column per run) and the PostgreSQL
//! versus redb cost per event in one line.

use super::RunFigures;
use super::fleet::Backend;
use crate::report;

/// The table and the comparison line.
pub fn render(runs: &[RunFigures], partitions: i32) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: &str, cell: &dyn Fn(&RunFigures) -> String| {
        rows.push((label.to_owned(), runs.iter().map(cell).collect()));
    };
    let join = |values: &[String]| values.join("+");
    row("partitions per host", &|r| join(&r.partitions_per_host.iter().map(ToString::to_string).collect::<Vec<_>>()));
    row("ready s (start → spread)", &|r| format!("{:.1}", r.ready_s));
    row("events handled", &|r| format!("{}/{}", r.handled, r.events));
    row("handled per host", &|r| join(&r.handled_per_host.iter().map(ToString::to_string).collect::<Vec<_>>()));
    row("duplicates / dead letters", &|r| format!("{} / {}", r.duplicates_dropped, r.dead_lettered));
    row("produce s (all acked)", &|r| format!("{:.2}", r.produce_s));
    row("first produce → all handled s", &|r| format!("{:.2}", r.elapsed_s));
    row("events/s", &|r| format!("{:.0}", r.events_per_s));
    row("hosts CPU s", &|r| format!("{:.2}", r.hosts_cpu_s));
    row("host CPU ms / event", &|r| format!("{:.3}", r.host_cpu_ms_per_event));
    row("PostgreSQL CPU ms / event", &|r| format!("{:.3}", r.postgres_cpu_ms_per_event));
    row("broker CPU ms / event", &|r| format!("{:.3}", r.broker_cpu_ms_per_event));
    row("all three ms / event", &|r| format!("{:.3}", r.total_cpu_ms_per_event));
    row("machine busy", &|r| r.machine_busy_share.map_or("-".into(), |s| format!("{:.0} % of {}", s * 100.0, r.cores)));
    row("driver CPU s", &|r| format!("{:.2}", r.driver_cpu_s));
    let stage = |name: &'static str| move |r: &RunFigures| r.stage_mean_us.get(name).map_or("-".into(), us);
    row("dedup µs (mean / event)", &stage("dedup"));
    row("call µs (mean / event)", &stage("call"));
    row("commit µs (mean / batch)", &stage("commit"));
    row("events / batch", &|r| r.events_per_batch.map_or("-".into(), |v| format!("{v:.1}")));
    row("commit µs / event", &|r| r.commit_us_per_event.as_ref().map_or("-".into(), us));
    row("executor µs / event", &|r| r.executor_us_per_event.as_ref().map_or("-".into(), us));
    row("publish µs (mean / event)", &stage("publish"));
    row("hosts RSS MiB", &|r| format!("{:.0}", r.hosts_rss_mib));
    row("host log ERROR / WARN", &|r| format!("{} / {}", r.logs.errors, r.logs.warnings));
    let header: Vec<String> = runs.iter().map(|r| r.label.clone()).collect();
    let mut out = format!(
        "\nscale-out: the email component alone on N hosts (PostgreSQL shared, or redb), {} events on {partitions} \
         partitions, produced at once; CPU from /proc over first produce → all handled\n",
        runs.first().map_or(0, |r| r.events)
    );
    out.push_str(&report::render(&header, &rows));
    out.push_str(
        "  executor: decode + dedup + instantiate + call + commit per event, in a row on the one executor thread \
         each host has per component: 1e6 / it bounds each host's events/s\n",
    );
    out.push_str(&comparison(runs));
    out
}

fn us(value: &f64) -> String {
    format!("{value:.0}")
}

/// One host on PostgreSQL against one on redb.
fn comparison(runs: &[RunFigures]) -> String {
    let one = |backend| runs.iter().find(|r| r.backend == backend && r.hosts == 1);
    let (Some(pg), Some(redb)) = (one(Backend::Postgres), one(Backend::Redb)) else { return String::new() };
    format!(
        "  one host, PostgreSQL vs redb: {:.0} vs {:.0} events/s; host CPU {:.3} vs {:.3} ms/event, {:.3} vs {:.3} \
         with the database's own\n",
        pg.events_per_s,
        redb.events_per_s,
        pg.host_cpu_ms_per_event,
        redb.host_cpu_ms_per_event,
        pg.host_cpu_ms_per_event + pg.postgres_cpu_ms_per_event,
        redb.host_cpu_ms_per_event + redb.postgres_cpu_ms_per_event,
    )
}
