//! On-disk cache of compiled components, keyed by the component's sha256 and
//! the engine's compatibility hash, so that a restart or a reload of a known
//! version skips Cranelift.
//!
//! A cached file is native code the host will run, so it is loaded only if
//! it carries this cache's seal: an HMAC-SHA256, under a random key kept in
//! the cache directory (`.key`, readable by the host's user only), of the
//! entry's name (component sha256 and engine hash) and the compiled bytes.
//! A file written by anyone who cannot read the key (a shared or copied
//! cache, a group-writable directory), another entry's file renamed, a
//! truncated or corrupted one, or one from before seals existed, is not
//! deserialized: the component is compiled again and the entry replaced.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac as _};
use wasmtime::component::Component;

type Seal = Hmac<sha2::Sha256>;

/// Bytes of the seal at the head of each entry.
const SEAL_BYTES: usize = 32;

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

    /// The seal of `bytes` as the entry for `sha256`.
    fn seal(&self, key: &[u8], sha256: &str, bytes: &[u8]) -> Seal {
        // Any key length is accepted by HMAC.
        let mut mac = Seal::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(sha256.as_bytes());
        mac.update(b"\0");
        mac.update(self.engine_key.as_bytes());
        mac.update(b"\0");
        mac.update(bytes);
        mac
    }

    /// The cache's key, created on first use (only the host's user may read it).
    fn key(&self, create: bool) -> std::io::Result<Vec<u8>> {
        let path = self.dir.join(".key");
        match std::fs::read(&path) {
            Ok(key) if key.len() == 32 => return Ok(key),
            Ok(_) if !create => return Err(std::io::Error::other("the cache key is damaged")),
            Err(err) if !create => return Err(err),
            _ => {}
        }
        // Random (v4 UUIDs come from the OS's generator): 244 bits.
        let key: Vec<u8> = (0..2).flat_map(|_| uuid::Uuid::new_v4().into_bytes()).collect();
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(&tmp)?, &key)?;
        // Linked into place only if no key is there yet: of hosts starting
        // together on one cache, the first key wins and the others read it.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(key),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                let key = std::fs::read(&path)?;
                if key.len() == 32 { Ok(key) } else { Err(std::io::Error::other("the cache key is damaged")) }
            }
            Err(err) => Err(err),
        }
    }

    /// The compiled component for `sha256`, if cached, sealed by this cache
    /// and loadable.
    pub fn get(&self, engine: &wasmtime::Engine, sha256: &str) -> Option<Component> {
        let path = self.path(sha256);
        // Read, not mmap (`deserialize_file`): a cache file truncated by
        // someone else while mapped would crash the host with SIGBUS.
        let bytes = std::fs::read(&path).ok()?;
        let key = self.key(false).ok()?;
        let sealed = bytes.len() > SEAL_BYTES
            && self.seal(&key, sha256, &bytes[SEAL_BYTES..]).verify_slice(&bytes[..SEAL_BYTES]).is_ok();
        if !sealed {
            tracing::warn!(?path, "ignoring a cache entry this host did not write (no valid seal): compiling again");
            return None;
        }
        // SAFETY: the bytes are exactly what this cache wrote from
        // `Component::serialize` for this component and engine (the seal
        // proves it to whoever holds the key). wasmtime still checks the
        // header and refuses a mismatch.
        match unsafe { Component::deserialize(engine, &bytes[SEAL_BYTES..]) } {
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
        let key = self.key(true)?;
        let seal = self.seal(&key, sha256, &bytes).finalize().into_bytes();
        let path = self.path(sha256);
        // Write then rename: a reader never sees half a file.
        let tmp = tmp_path(&path);
        let mut sealed = Vec::with_capacity(SEAL_BYTES + bytes.len());
        sealed.extend_from_slice(&seal);
        sealed.extend_from_slice(&bytes);
        std::fs::write(&tmp, sealed)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension(format!("tmp-{}", std::process::id()))
}
