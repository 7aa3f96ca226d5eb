//! The parts of the host's manifest (`app.toml`) the benchmarks reuse: each
//! component's topics, group, limits and config, and the topic layout. Read
//! leniently (unknown keys ignored): the host validates the manifest, this
//! only borrows from it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

/// The manifest, as far as the benchmarks need it.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    /// Topic layout.
    #[serde(default)]
    pub kafka: Kafka,
    /// Where compiled components are cached.
    #[serde(default)]
    pub runtime: Runtime,
    /// The service components by name.
    pub components: BTreeMap<String, Component>,
}

/// `[kafka]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Kafka {
    /// Partitions of every topic.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
}

impl Default for Kafka {
    fn default() -> Self {
        Self { partitions: default_partitions() }
    }
}

fn default_partitions() -> i32 {
    3
}

/// `[runtime]`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Runtime {
    /// Compile cache of the host (relative to the manifest).
    pub cache_dir: Option<PathBuf>,
}

/// `[components.NAME]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Component {
    /// The `.wasm` file (relative to the manifest).
    pub wasm: PathBuf,
    /// Logical topics consumed.
    pub topics: Vec<String>,
    /// Consumer group (logical).
    pub group: String,
    /// Events one instance serves.
    #[serde(default = "one")]
    pub instance_reuse: u32,
    /// Time budget of a call.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Memory limit of an instance.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
    /// The component's config values.
    #[serde(default)]
    pub config: HashMap<String, String>,
}

fn one() -> u32 {
    1
}
fn default_timeout_ms() -> u64 {
    1_000
}
fn default_memory_mib() -> usize {
    64
}

impl Manifest {
    /// Reads `path`, making the component and cache paths absolute.
    ///
    /// # Errors
    /// When the file cannot be read or is not a manifest.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("failed to read the manifest {path:?}"))?;
        let mut manifest: Self = toml::from_str(&text).with_context(|| format!("failed to parse {path:?}"))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for component in manifest.components.values_mut() {
            component.wasm = base.join(&component.wasm);
        }
        manifest.runtime.cache_dir = manifest.runtime.cache_dir.map(|dir| base.join(dir));
        Ok(manifest)
    }

    /// The components subscribed to the logical `topic`, in name order.
    pub fn subscribers<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.components.iter().filter(move |(_, c)| c.topics.iter().any(|t| t == topic)).map(|(n, _)| n.as_str())
    }

    /// Every logical topic some component consumes, sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self.components.values().flat_map(|c| c.topics.iter().cloned()).collect();
        topics.sort();
        topics.dedup();
        topics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_manifest_reads_and_routes() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../app.toml");
        let manifest = Manifest::load(&path).unwrap();
        // The shop's services, and any other app.toml has (`just new-service`).
        let payments: Vec<&str> = manifest.subscribers("payments").collect();
        assert!(["analytics", "order", "payment"].iter().all(|n| payments.contains(n)), "{payments:?}");
        assert!(!payments.contains(&"email"), "email does not read payments");
        let topics = manifest.topics();
        assert!(["analytics", "emails", "orders", "payments"].iter().all(|t| topics.iter().any(|u| u == t)));
        let mut sorted = topics.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(topics, sorted, "sorted, each once");
        assert!(manifest.components["payment"].wasm.is_absolute() || path.is_relative());
    }
}
