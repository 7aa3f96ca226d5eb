//! Defaults and bounds that the manifest names and other parts enforce
//! (the runtime, the pipeline, the store): a leaf importing nothing of the
//! host, so that the manifest need not import what it configures.

/// Wasm stack of a call unless the manifest says otherwise (`stack_kib`).
pub const DEFAULT_STACK_BYTES: usize = 512 << 10;

/// Deepest Wasm stack a component may be granted (`stack_kib` ≤ 4096).
pub const MAX_STACK_BYTES: usize = 4 << 20;

/// How long a call runs at full speed unless the manifest says otherwise:
/// a thousand times what one of the shop's events takes (about 0.1 ms),
/// short enough that a spinning guest is slowed within a tenth of a second.
/// A component whose calls compute longer on purpose raises it.
pub const DEFAULT_BURST: std::time::Duration = std::time::Duration::from_millis(100);

/// Share of a core a component gets past its burst, or while it keeps
/// failing, unless the manifest says otherwise. At 10, a write bomb still
/// took 10–15 % of another component's throughput in `bench isolation`:
/// its copies and freed memory cost the others more than its CPU.
pub const DEFAULT_CPU_PERCENT: u32 = 5;

/// Share of one core (percent) a shadow run's candidate gets past its
/// burst and for its faults, unless the manifest says otherwise: a
/// candidate that spins takes at most this from the version serving.
pub const DEFAULT_SHADOW_CPU_PERCENT: u32 = 5;

/// Queries one service answers at once unless the manifest says otherwise.
pub const DEFAULT_MAX_QUERIES: usize = 4;

/// Largest record value a component is given unless the manifest says
/// otherwise (`kafka.max_record_bytes`); a larger one is dead-lettered as
/// too large (see `Pipeline::set_max_record_bytes`).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 512 * 1024;

/// Distinct keys one call may write unless the manifest says otherwise
/// (`max_writes_per_call`).
pub const DEFAULT_MAX_WRITES: usize = 1_000;

/// Bytes one call may write unless the manifest says otherwise
/// (`max_write_bytes_per_call`).
pub const DEFAULT_MAX_WRITE_BYTES: usize = 8 << 20;

/// Timers one call may set or cancel unless the manifest says otherwise
/// (`max_timers_per_call`).
pub const DEFAULT_MAX_TIMERS: usize = 100;

/// PostgreSQL sessions' `lock_timeout` unless the manifest says otherwise
/// (`state.lock_timeout_ms`): a commit takes milliseconds; these timeouts
/// only end waits that would otherwise last until TCP keepalive notices
/// (~2 h).
pub const DEFAULT_PG_LOCK_TIMEOUT_MS: u64 = 2_000;

/// PostgreSQL sessions' `statement_timeout` (`state.statement_timeout_ms`).
pub const DEFAULT_PG_STATEMENT_TIMEOUT_MS: u64 = 5_000;

/// PostgreSQL sessions' `idle_in_transaction_session_timeout`
/// (`state.idle_in_transaction_timeout_ms`).
pub const DEFAULT_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 5_000;

/// Deadline of a whole PostgreSQL commit (`state.commit_timeout_ms`).
pub const DEFAULT_PG_COMMIT_TIMEOUT_MS: u64 = 10_000;

/// Log lines one call may write unless the manifest says otherwise
/// (`max_log_lines_per_call`): far above what the shop's components write
/// (one or two lines an event).
pub const DEFAULT_MAX_LOG_LINES_PER_CALL: u32 = 100;

/// Log lines one component may write a second (`max_log_lines_per_second`):
/// far above the shop's (at most ~800 events a second on this machine).
pub const DEFAULT_MAX_LOG_LINES_PER_SECOND: u32 = 10_000;

/// Keys of one component's state (`max_state_keys`).
pub const DEFAULT_MAX_STATE_KEYS: u64 = 1_000_000;

/// Bytes of one component's state, keys and values (`max_state_bytes`).
pub const DEFAULT_MAX_STATE_BYTES: u64 = 1 << 30;

/// Timers one component may have set (`max_timers`).
pub const DEFAULT_MAX_TIMERS_SET: u64 = 100_000;

/// Outbox entries one component may have waiting (`max_outbox_entries`).
pub const DEFAULT_MAX_OUTBOX_ENTRIES: u64 = 100_000;

/// Largest record the host writes: below the broker's default
/// `message.max.bytes` (1 MiB), so that a committed record can always be
/// published.
pub const MAX_RECORD_BYTES: usize = 900 * 1024;

/// Longest event type, topic or key of an event a component emits.
pub const MAX_OUTPUT_NAME_BYTES: usize = 256;

/// What a record holds besides its payload, at most: the CloudEvent's
/// headers (ids, type, source and subject each ≤ 256 bytes, time, trace
/// context and content type, names included).
pub const MAX_ENVELOPE_BYTES: usize = 16 << 10;

/// Largest payload a component may emit: its record, with the envelope,
/// stays within [`MAX_RECORD_BYTES`].
pub const MAX_PAYLOAD_BYTES: usize = MAX_RECORD_BYTES - MAX_ENVELOPE_BYTES;

/// `text` cut to at most `max` bytes at a character boundary, with a marker
/// naming its whole length: what a bounded message, header or report keeps.
pub fn cut_text(mut text: String, max: usize) -> String {
    let original = text.len();
    if original <= max {
        return text;
    }
    let mut at = max;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    text.push_str(&format!("… [cut: {original} bytes]"));
    text
}
