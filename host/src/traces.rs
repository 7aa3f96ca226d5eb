//! Traces across Kafka: the W3C `traceparent` every record carries, and the
//! OpenTelemetry export of the spans that handle them (OTLP over HTTP, on
//! only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set).
//!
//! The gateway starts an order's trace (or continues the caller's, from its
//! `traceparent` HTTP header); each record a component emits carries the
//! context of the span that handled its cause, a timer keeps the context of
//! the event that set it. Every event of an order descends from its
//! `OrderPlaced`, so an order is one trace. Without an exporter the ids are
//! still made and carried, so that a trace joins up once one is installed.

use std::fmt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// Name of the header (Kafka and HTTP) carrying the trace context.
pub const HEADER: &str = "traceparent";

/// Target of the stage spans (`handle`, `commit`, `publish`, `place_order`):
/// exported, never printed in the logs.
pub const STAGE_TARGET: &str = "shop_host::stage";

/// Environment variable that turns the export on (the OTLP endpoint, e.g.
/// `http://127.0.0.1:4318`; spans go to its `/v1/traces`).
pub const ENDPOINT_ENV: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// Whether spans are exported: stage spans are only made then.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The installed provider, flushed by [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// A W3C trace context (`traceparent`, version `00`): the trace, the span
/// that caused what carries it, and whether that trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value; `None` if it is not a valid one (the
    /// W3C rules: lowercase hex, non-zero ids, version `ff` refused, a
    /// later version may carry more fields after a `-`).
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        let bytes = text.as_bytes();
        if bytes.len() < 55 || (bytes.len() > 55 && bytes[55] != b'-') {
            return None;
        }
        let version = hex::<1>(&text[0..2])?[0];
        if version == 0xff || (version == 0 && bytes.len() != 55) {
            return None;
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return None;
        }
        let trace_id = hex::<16>(&text[3..35])?;
        let span_id = hex::<8>(&text[36..52])?;
        let flags = hex::<1>(&text[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self { trace_id, span_id, flags })
    }

    /// The context in `headers`, if one is there and valid: the
    /// `traceparent` header (the hop's own context, as OpenTelemetry's
    /// instrumentations set it), else the CloudEvents distributed-tracing
    /// extension's `ce_traceparent`; of a header given twice, the last.
    pub fn from_headers(headers: &[(String, Vec<u8>)]) -> Option<Self> {
        let extension = |key: &str| {
            key.get(..3).is_some_and(|ce| ce.eq_ignore_ascii_case("ce_")) && key[3..].eq_ignore_ascii_case(HEADER)
        };
        let valid = |wanted: &dyn Fn(&str) -> bool| {
            headers
                .iter()
                .rev()
                .filter(|(key, _)| wanted(key))
                .find_map(|(_, v)| Self::parse(std::str::from_utf8(v).ok()?))
        };
        valid(&|key| key.eq_ignore_ascii_case(HEADER)).or_else(|| valid(&extension))
    }

    /// A new trace's root context, with fresh random ids.
    pub fn random() -> Self {
        let ids = RandomIdGenerator::default();
        Self { trace_id: ids.new_trace_id().to_bytes(), span_id: ids.new_span_id().to_bytes(), flags: 1 }
    }

    /// A child of `self`: the same trace, a new span.
    pub fn child(&self) -> Self {
        Self { span_id: RandomIdGenerator::default().new_span_id().to_bytes(), ..*self }
    }

    /// The trace id as 32 hex digits.
    pub fn trace_hex(&self) -> String {
        TraceId::from_bytes(self.trace_id).to_string()
    }

    fn span_context(&self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        )
    }

    fn of(context: &SpanContext) -> Option<Self> {
        context.is_valid().then(|| Self {
            trace_id: context.trace_id().to_bytes(),
            span_id: context.span_id().to_bytes(),
            flags: context.trace_flags().to_u8(),
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", TraceId::from_bytes(self.trace_id), SpanId::from_bytes(self.span_id), self.flags)
    }
}

/// `N` bytes from exactly `2 * N` lowercase hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N || !digits.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)) {
        return None;
    }
    let mut out = [0; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Makes `span` the child of `parent` (a new trace without one) and returns
/// the context that what it causes carries. When exporting, that is the
/// exported span's own; otherwise fresh ids in the same trace.
pub fn begin(span: &tracing::Span, parent: Option<TraceParent>) -> TraceParent {
    if exporting() {
        if let Some(parent) = parent {
            let remote = opentelemetry::Context::new().with_remote_span_context(parent.span_context());
            // Fails only for a span that is disabled or already started.
            let _ = span.set_parent(remote);
        }
        if let Some(own) = TraceParent::of(span.context().span().span_context()) {
            return own;
        }
    }
    parent.map_or_else(TraceParent::random, |parent| parent.child())
}

/// A stage span (`name`: `handle`, `commit`, `publish`, ...) of `component`
/// at `version`, child of `parent`: made only while exporting, otherwise
/// [`tracing::Span::none`].
pub fn stage(name: &'static str, component: &str, version: &str, parent: Option<TraceParent>) -> tracing::Span {
    if !exporting() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(target: STAGE_TARGET, "stage", otel.name = name, component, version);
    begin(&span, parent);
    span
}

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The layer exporting spans through `provider` (its tracer named
/// `shop-host`): only the host's own spans, at `info` and above. Installing
/// it turns on [`stage`] spans.
pub fn layer<S>(provider: &SdkTracerProvider) -> impl Layer<S> + Send + Sync + use<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    EXPORTING.store(true, Ordering::Relaxed);
    let filter = tracing_subscriber::filter::Targets::new().with_target("shop_host", tracing::Level::INFO);
    tracing_opentelemetry::layer().with_tracer(provider.tracer("shop-host")).with_filter(filter)
}

/// The OTLP/HTTP exporting layer if [`ENDPOINT_ENV`] is set (the exporter
/// reads it and the other `OTEL_EXPORTER_OTLP_*` variables itself); `None`
/// otherwise. Spans are batched and sent from the SDK's own thread.
///
/// # Errors
/// The exporter cannot be built (e.g. its HTTP client).
pub fn from_env<S>() -> anyhow::Result<Option<impl Layer<S> + Send + Sync + 'static>>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    if std::env::var_os(ENDPOINT_ENV).is_none_or(|v| v.is_empty()) {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build()?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("shop-host").build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let layer = layer(&provider);
    let _ = PROVIDER.set(provider);
    Ok(Some(layer))
}

tokio::task_local! {
    /// The trace context of the HTTP request being served, if it had one.
    static REQUEST: Option<TraceParent>;
}

/// Middleware for the gateway: a request's valid `traceparent` header is
/// the parent of what serving it starts ([`request_parent`]).
pub async fn from_request(request: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let parent = request.headers().get(HEADER).and_then(|value| value.to_str().ok()).and_then(TraceParent::parse);
    REQUEST.scope(parent, next.run(request)).await
}

/// The trace context of the HTTP request being served ([`from_request`]).
pub fn request_parent() -> Option<TraceParent> {
    REQUEST.try_with(|parent| *parent).ok().flatten()
}

/// Flushes and stops the exporter, if one was installed: spans not yet sent
/// go now.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(err) = provider.shutdown()
    {
        tracing::warn!("trace export did not shut down cleanly: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_round_trips() {
        let parsed = TraceParent::parse(VALID).unwrap();
        assert_eq!(parsed.trace_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parsed.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(parsed.flags, 1);
        assert_eq!(parsed.to_string(), VALID);
        let random = TraceParent::random();
        assert_eq!(TraceParent::parse(&random.to_string()), Some(random));
    }

    #[test]
    fn an_invalid_traceparent_is_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47x6-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may add fields; what is known is read.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert_eq!(TraceParent::parse(later).map(|t| t.flags), Some(1));
    }

    #[test]
    fn a_context_is_found_in_headers_and_passed_on_to_a_child() {
        let headers = vec![("event-type".to_owned(), b"X".to_vec()), ("traceparent".to_owned(), VALID.into())];
        let parent = TraceParent::from_headers(&headers).unwrap();
        let span = tracing::Span::none();
        let child = begin(&span, Some(parent));
        assert_eq!(child.trace_id, parent.trace_id, "same trace");
        assert_ne!(child.span_id, parent.span_id, "its own span");
        assert_eq!(child.flags, parent.flags);
        let root = begin(&span, None);
        assert_ne!(root.trace_id, parent.trace_id, "no parent: a new trace");
        assert_eq!(TraceParent::from_headers(&[("traceparent".to_owned(), b"junk".to_vec())]), None);
        let extension = vec![("ce_type".to_owned(), b"X".to_vec()), ("ce_traceparent".to_owned(), VALID.into())];
        assert_eq!(TraceParent::from_headers(&extension), Some(parent), "the CloudEvents extension is read too");
    }
}
