//! The shop host: runs service components (Wasm) on Kafka, each on its own
//! HTTP port, behind the API gateway.
//!
//! Ports and adapters: the WIT world (`wit/`) is the set of ports;
//! [`kafka`], [`http`], [`state`] and [`clock`] are adapters. The messaging,
//! state and clock ports have in-memory twins ([`bus::MemoryBus`],
//! [`state::MemoryStore`], [`clock::ManualClock`]) for fast tests; HTTP has
//! none: its routers are driven directly. [`app`] wires them together.

pub mod admin;
pub mod app;
pub mod bus;
pub mod clock;
pub mod deadlines;
pub mod dlq;
pub mod envelope;
pub mod gateway_backend;
pub mod http;
pub mod instance;
pub mod kafka;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod pipeline;
pub mod runtime;
pub mod scheduler;
pub mod stages;
pub mod state;
pub mod traces;
pub mod watch;
