//! The shop host: runs service components (Wasm) on Kafka, each on its own
//! HTTP port, behind the API gateway.
//!
//! The modules stand on floors, each importing only those below it (see
//! docs/architecture.md; a unit test holds them): [`limits`]; the leaves
//! [`clock`], [`manifest`], [`perms`], [`schemas`] and [`status`]; the ports [`bus`] and
//! [`state`] (with in-memory twins, [`bus::MemoryBus`] and
//! [`state::MemoryStore`], beside [`clock::ManualClock`]); the card
//! [`vault`]; the [`runtime`]; the delivery core
//! ([`pipeline`], [`scheduler`], [`envelope`], [`deadlines`], [`traces`]);
//! the adapters ([`kafka`], [`http`], [`admin`], [`metrics`], [`logs`],
//! [`gateway_backend`], [`watch`], [`instance`], [`registry`]); and [`app`], which wires
//! them together.

pub mod admin;
pub mod app;
pub mod bus;
pub mod clock;
pub mod contracts;
pub mod deadlines;
pub mod envelope;
pub mod gateway_backend;
pub mod http;
pub mod instance;
pub mod kafka;
pub mod limits;
pub mod logs;
pub mod manifest;
pub mod metrics;
pub mod perms;
pub mod pipeline;
pub mod registry;
pub mod runtime;
pub mod scheduler;
pub mod schemas;
pub mod state;
pub mod status;
pub mod traces;
pub mod vault;
pub mod watch;

#[cfg(test)]
mod floors_tests;
#[cfg(test)]
mod house_tests;
