//! A guest's stderr, when granted: captured per call, bounded, and written
//! to the host's log as escaped lines of the component, never as raw bytes
//! into the host's own stderr (where they would break JSON logs and could
//! forge log lines). The last line names a trap's cause: a Rust guest's
//! panic message goes there.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Bytes of stderr kept from one call; the rest is counted and dropped
/// (the guest's writes still succeed).
pub const MAX_STDERR_BYTES: usize = 16 << 10;

/// Last lines of a call's stderr that a trap's message quotes.
const TAIL_LINES: usize = 3;

/// Lines of one call's stderr written to the log; the rest are counted.
const MAX_LOGGED_LINES: usize = 32;

/// Bytes kept from the end of a call's stderr once past the cap, so that
/// a trap still quotes its last lines.
const TAIL_BYTES: usize = 1024;

#[derive(Debug, Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: usize,
    /// The last bytes dropped (at most [`TAIL_BYTES`]).
    tail: Vec<u8>,
}

/// One store's stderr: every stream the guest opens on it writes here.
#[derive(Debug, Clone, Default)]
pub struct GuestStderr(Arc<Mutex<Captured>>);

impl GuestStderr {
    fn append(&self, bytes: &[u8]) {
        let mut captured = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = MAX_STDERR_BYTES.saturating_sub(captured.bytes.len()).min(bytes.len());
        captured.bytes.extend_from_slice(&bytes[..room]);
        let rest = &bytes[room..];
        if !rest.is_empty() {
            captured.dropped += rest.len();
            captured.tail.extend_from_slice(&rest[rest.len().saturating_sub(TAIL_BYTES)..]);
            let excess = captured.tail.len().saturating_sub(TAIL_BYTES);
            captured.tail.drain(..excess);
        }
    }

    /// Writes what the call wrote to the log, as `component`'s lines, and
    /// empties the capture; answers its last lines (up to three, escaped,
    /// joined by " / "): where a Rust guest panicked, the message, a note.
    pub fn drain_to_log(&self, component: &str) -> Option<String> {
        let Captured { bytes, dropped, tail } =
            std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        if bytes.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<String> =
            text.lines().filter(|l| !l.trim().is_empty()).map(super::guest_text::guest_message).collect();
        for line in lines.iter().take(MAX_LOGGED_LINES) {
            tracing::warn!(target: "component", component, stream = "stderr", "{line}");
        }
        let unlogged = lines.len().saturating_sub(MAX_LOGGED_LINES);
        if unlogged > 0 || dropped > 0 {
            tracing::warn!(target: "component", component, stream = "stderr", unlogged_lines = unlogged, dropped_bytes = dropped, "stderr cut");
        }
        // Past the cap, the last lines are the dropped part's (its first
        // line may be cut).
        let last: Vec<String> = match dropped {
            0 => lines,
            _ => String::from_utf8_lossy(&tail)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(super::guest_text::guest_message)
                .collect(),
        };
        let from = last.len().saturating_sub(TAIL_LINES);
        Some(super::guest_text::guest_message(&last[from..].join(" / ")))
    }
}

impl IsTerminal for GuestStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestStderr {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestStderr {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestStderr {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl AsyncWrite for GuestStderr {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_keeps_its_last_line_and_at_most_the_cap() {
        let stderr = GuestStderr::default();
        stderr.append(b"starting\nthread panicked at src/lib.rs:1:1:\n\x1b[31masked\tto panic\n\nnote: backtrace\n");
        assert_eq!(
            stderr.drain_to_log("c").as_deref(),
            Some("thread panicked at src/lib.rs:1:1: / \\u{1b}[31masked\\tto panic / note: backtrace")
        );
        assert_eq!(stderr.drain_to_log("c"), None, "drained");
        stderr.append(&vec![b'x'; MAX_STDERR_BYTES + 10]);
        {
            let captured = stderr.0.lock().unwrap();
            assert_eq!((captured.bytes.len(), captured.dropped), (MAX_STDERR_BYTES, 10));
        }
        // Past the cap, a panic at the end is still what the trap quotes.
        stderr.append(b"\npanicked at the end\n");
        let last = stderr.drain_to_log("c").unwrap();
        assert!(last.ends_with("panicked at the end"), "{last}");
    }
}
