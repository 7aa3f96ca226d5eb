//! On-disk cache of compiled components, keyed by the component's sha256 and
//! the engine's compatibility hash, so that a restart or a reload of a known
//! version skips Cranelift.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;

/// A directory of `{sha256}-{engine}.cwasm` files.
#[derive(Debug, Clone)]
pub struct ComponentCache {
    dir: PathBuf,
    engine_key: String,
}

impl ComponentCache {
    /// A cache in `dir` for components compiled by `engine`.
    pub fn new(dir: PathBuf, engine: &wasmtime::Engine) -> Self {
        // The std hasher has fixed keys: the same engine settings and wasmtime
        // version give the same key on every run.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Self { dir, engine_key: format!("{:016x}", hasher.finish()) }
    }

    fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}-{}.cwasm", self.engine_key))
    }

    /// The compiled component for `sha256`, if cached and loadable.
    pub fn get(&self, engine: &wasmtime::Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        // Read, not mmap (`deserialize_file`): a cache file truncated by
        // someone else while mapped would crash the host with SIGBUS.
        let bytes = std::fs::read(&path).ok()?;
        // SAFETY: the bytes are a file this cache wrote from
        // `Component::serialize` with an engine of the same compatibility
        // hash, in a directory that belongs to the host. wasmtime still checks
        // the header and refuses a mismatch.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(?path, "ignoring unusable cache entry: {err:#}");
                None
            }
        }
    }

    /// Stores a compiled component; failures are logged, never fatal.
    pub fn put(&self, sha256: &str, component: &Component) {
        if let Err(err) = self.try_put(sha256, component) {
            tracing::warn!(dir = ?self.dir, "cannot write the component cache: {err:#}");
        }
    }

    fn try_put(&self, sha256: &str, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(anyhow::Error::from)?;
        std::fs::create_dir_all(&self.dir)?;
        let path = self.path(sha256);
        // Write then rename: a reader never sees half a file.
        let tmp = tmp_path(&path);
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension(format!("tmp-{}", std::process::id()))
}
