//! Load driver for the shop (`just bench`): places orders through the
//! gateway, follows each to its final status by polling and on the Kafka
//! `orders` topic, and reports throughput, latency percentiles and the
//! host's CPU and memory.

pub mod cleanup;
pub mod cli;
pub mod gateway;
pub mod health;
pub mod host;
pub mod load;
pub mod order;
pub mod phase;
pub mod report;
pub mod stats;
pub mod topic;
