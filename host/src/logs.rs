//! Log output: plain text (coloured only on a terminal) or one JSON object
//! per line. Guest log lines are made safe to print by the runtime
//! (`runtime/guest_text.rs`) before they get here.
//!
//! Events are handled inside an `event` span carrying `component`,
//! `version`, `event_id`, `event_type` and `order_id` (see
//! [`crate::pipeline`]): in text every line within it is prefixed with them,
//! in JSON they are the `span` object of the line.

use std::io::IsTerminal as _;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when writing to a terminal
    /// (and `NO_COLOR` is unset).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `message`,
    /// the event's fields, and `span` with the handled event's fields.
    Json,
}

/// Installs the global subscriber: `RUST_LOG` filters (default `info`),
/// lines go to stdout, or to stderr when `stderr` (a command whose output is
/// what it prints). With `OTEL_EXPORTER_OTLP_ENDPOINT` set, spans are also
/// exported ([`crate::traces`]); stage spans are never printed.
///
/// # Panics
/// If a global subscriber was installed before.
pub fn init(format: LogFormat, stderr: bool) {
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if let Ok(stages) = format!("{}=off", crate::traces::STAGE_TARGET).parse() {
        filter = filter.add_directive(stages);
    }
    let (writer, terminal) = match stderr {
        true => (BoxMakeWriter::new(std::io::stderr), std::io::stderr().is_terminal()),
        false => (BoxMakeWriter::new(std::io::stdout), std::io::stdout().is_terminal()),
    };
    let colour = terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(colour).with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![fmt];
    let failed = match crate::traces::from_env::<Registry>() {
        Ok(otel) => {
            layers.extend(otel.map(|otel| otel.boxed()));
            None
        }
        Err(err) => Some(err),
    };
    tracing_subscriber::registry().with(layers).init();
    if let Some(err) = failed {
        tracing::error!("traces are not exported: {err:#}");
    }
}
