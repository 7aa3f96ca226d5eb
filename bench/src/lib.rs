//! Load driver for the shop (`just bench`): places orders through the
//! gateway, follows each to its final status by polling and on the Kafka
//! `orders` topic, and reports throughput, latency percentiles, the host's
//! CPU and memory and each component's stage costs; swaps a component under
//! load; measures the broker's physical limit with plain Kafka relays, the
//! cost of Wasm per event against the components' native logic, and one
//! component scaled out over several hosts.

pub mod cleanup;
pub mod cli;
pub mod email_js;
pub mod gateway;
pub mod health;
pub mod host;
pub mod hotswap;
pub mod isolation;
pub mod load;
pub mod manifest;
pub mod order;
pub mod phase;
pub mod physical;
pub mod report;
pub mod scale;
pub mod shadow;
pub mod stages;
pub mod stats;
pub mod store;
pub mod suite;
pub mod topic;
pub mod wasm;
