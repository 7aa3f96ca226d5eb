//! On-disk cache of compiled components, keyed by the component's sha256 and
//! the engine's compatibility hash, so that a restart or a reload of a known
//! version skips Cranelift.
//!
//! A cached file is native code the host will run, so it is loaded only if
//! it carries this host's seal: an HMAC-SHA256 of the entry's name
//! (component sha256 and engine hash) and the compiled bytes, under a random
//! key kept *outside* the cache, in the state directory (mode 0600, owned by
//! the host's user, never read through a symbolic link). Whoever can write
//! the cache but not read the key cannot forge an entry: a planted, copied,
//! renamed, truncated or pre-seal file is not deserialized, the component is
//! compiled again and the entry replaced. A cache directory owned by another
//! user or writable by group or others is refused outright, as is a key
//! file open to them. Entries are written to a new file of a random name
//! (created exclusively, never through a link) and renamed into place.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac as _};
use wasmtime::component::Component;

use crate::perms;

type Seal = Hmac<sha2::Sha256>;

/// Bytes of the seal at the head of each entry.
const SEAL_BYTES: usize = 32;

/// Where a cache keeps its entries and its seal key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheLocation {
    /// The directory of the entries.
    pub dir: PathBuf,
    /// The seal key's file, outside `dir` (the host's state directory).
    pub key: PathBuf,
}

impl CacheLocation {
    /// Entries in `dir`, the key in `key`.
    pub fn new(dir: PathBuf, key: PathBuf) -> Self {
        Self { dir, key }
    }

    /// Entries in `dir`, the key beside it in `{dir}.key` (tests, benches).
    pub fn beside(dir: PathBuf) -> Self {
        let mut key = dir.clone().into_os_string();
        key.push(".key");
        Self { dir, key: PathBuf::from(key) }
    }

    /// Creates the directory (0700) if missing, then checks that it and the
    /// key, if there is one yet, are the host user's alone.
    ///
    /// # Errors
    /// A directory or key owned by another user or open to others, named
    /// with the fix.
    pub fn check(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        perms::create_private_dir(&self.dir)
            .with_context(|| format!("cannot create the component cache {:?}", self.dir))?;
        perms::check_private_dir(&self.dir, "the component cache directory")?;
        perms::read_private_file(&self.key, "the component cache's seal key")?;
        Ok(())
    }
}

/// A directory of `{sha256}-{engine}.cwasm` files.
#[derive(Debug, Clone)]
pub struct ComponentCache {
    dir: PathBuf,
    key_path: PathBuf,
    engine_key: String,
}

impl ComponentCache {
    /// A cache at `location` for components compiled by `engine` (see
    /// [`CacheLocation::check`], which the engine runs first).
    pub fn new(location: CacheLocation, engine: &wasmtime::Engine) -> Self {
        // The std hasher has fixed keys: the same engine settings and wasmtime
        // version give the same key on every run.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Self { dir: location.dir, key_path: location.key, engine_key: format!("{:016x}", hasher.finish()) }
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

    /// The seal key, created on first use (mode 0600 in the state
    /// directory); refused if another user owns it or others may read it.
    fn key(&self, create: bool) -> std::io::Result<Vec<u8>> {
        let damaged = || std::io::Error::other(format!("the cache's seal key {:?} is damaged", self.key_path));
        let what = "the component cache's seal key";
        match perms::read_private_file(&self.key_path, what)? {
            Some(key) if key.len() == 32 => return Ok(key),
            Some(_) => return Err(damaged()),
            None if !create => return Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
            None => {}
        }
        if let Some(dir) = self.key_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            perms::create_private_dir(dir)?;
        }
        // Random (v4 UUIDs come from the OS's generator): 244 bits.
        let key: Vec<u8> = (0..2).flat_map(|_| uuid::Uuid::new_v4().into_bytes()).collect();
        let tmp = tmp_path(&self.key_path);
        perms::write_new_private_file(&tmp, &key)?;
        // Linked into place only if no key is there yet: of hosts starting
        // together on one state directory, the first key wins.
        let linked = std::fs::hard_link(&tmp, &self.key_path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(key),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                perms::read_private_file(&self.key_path, what)?.filter(|k| k.len() == 32).ok_or_else(damaged)
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
        if let Err(err) = perms::check_private_dir(&self.dir, "the component cache directory") {
            tracing::warn!("not loading from the component cache: {err}");
            return None;
        }
        let bytes = read_entry(&path)?;
        let key = match self.key(false) {
            Ok(key) => key,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
            Err(err) => {
                tracing::warn!("not loading from the component cache: {err}");
                return None;
            }
        };
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
        perms::create_private_dir(&self.dir)?;
        perms::check_private_dir(&self.dir, "the component cache directory")?;
        let key = self.key(true)?;
        let seal = self.seal(&key, sha256, &bytes).finalize().into_bytes();
        let path = self.path(sha256);
        // Write then rename: a reader never sees half a file.
        let tmp = tmp_path(&path);
        let mut sealed = Vec::with_capacity(SEAL_BYTES + bytes.len());
        sealed.extend_from_slice(&seal);
        sealed.extend_from_slice(&bytes);
        if let Err(err) = perms::write_new_private_file(&tmp, &sealed) {
            let _ = std::fs::remove_file(&tmp);
            return Err(err.into());
        }
        // rename replaces a link at `path` itself, never what it points to.
        std::fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })?;
        Ok(())
    }
}

/// The bytes of the entry at `path`: a regular file, not read through a
/// symbolic link (which could name a device that never ends).
fn read_entry(path: &Path) -> Option<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
    Some(bytes)
}

/// A new name beside `path`, random: nobody can place a file or link there
/// ahead of the write (which is exclusive in any case).
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", uuid::Uuid::new_v4().simple()));
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::runtime::tests::wasm;
    use crate::runtime::{Engine, LoadedComponent};

    /// A fresh directory with `cache/` (entries) and `state/` (the key).
    fn location() -> (PathBuf, CacheLocation) {
        let root = std::env::temp_dir().join(format!("sealed-cache-{}", uuid::Uuid::new_v4().simple()));
        let location = CacheLocation::new(root.join("cache"), root.join("state/component-cache.key"));
        (root, location)
    }

    fn load(location: &CacheLocation, name: &str) -> LoadedComponent {
        let engine = Engine::with_cache_at(Some(location.clone())).unwrap();
        LoadedComponent::from_bytes(&engine, &wasm(name), &std::fs::read(wasm(name)).unwrap()).unwrap()
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        entries
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Whoever can write the cache cannot seal an entry: the key is in the
    /// state directory, and a key planted in the cache (as the cache kept it
    /// before) seals nothing the host loads.
    #[test]
    fn the_seal_key_lives_outside_the_cache_so_a_planted_key_seals_nothing() {
        let (root, ours) = location();
        assert!(!load(&ours, "payment").from_cache);
        assert!(load(&ours, "payment").from_cache, "sealed with the state directory's key");
        let cached = entries(&ours.dir);
        assert_eq!(cached.len(), 1, "only the entry in the cache, no key: {cached:?}");
        assert_eq!((mode(&ours.dir), mode(&ours.key)), (0o700, 0o600));
        assert_eq!(mode(ours.key.parent().unwrap()), 0o700);

        // The planter writes a key of their own into the cache and re-seals
        // the entry with it.
        let planted = CacheLocation::new(ours.dir.clone(), ours.dir.join(".key"));
        std::fs::remove_file(&cached[0]).unwrap();
        assert!(!load(&planted, "payment").from_cache);
        assert!(load(&planted, "payment").from_cache, "valid under the planted key");
        assert!(!load(&ours, "payment").from_cache, "the host's own key does not verify it: compiled again");
        assert!(load(&ours, "payment").from_cache, "and replaced with an entry it sealed");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_cache_directory_or_key_others_may_write_is_refused() {
        let (root, ours) = location();
        load(&ours, "payment");
        std::fs::set_permissions(&ours.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = format!("{:#}", Engine::with_cache_at(Some(ours.clone())).err().unwrap());
        assert!(err.contains("component cache directory") && err.contains("mode 0777"), "{err}");
        std::fs::set_permissions(&ours.dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let engine = Engine::with_cache_at(Some(ours.clone())).unwrap();
        // Opened while closed, opened up afterwards: nothing is loaded from it.
        std::fs::set_permissions(&ours.dir, std::fs::Permissions::from_mode(0o770)).unwrap();
        let bytes = std::fs::read(wasm("payment")).unwrap();
        assert!(!LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache);
        std::fs::set_permissions(&ours.dir, std::fs::Permissions::from_mode(0o700)).unwrap();

        std::fs::set_permissions(&ours.key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", Engine::with_cache_at(Some(ours.clone())).err().unwrap());
        assert!(err.contains("seal key") && err.contains("mode 0644"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Temporary files have random names and are created exclusively: a
    /// link planted where the old predictable name was, or at the entry's
    /// own name, never has the host write through it.
    #[test]
    fn entries_are_never_written_through_a_planted_link() {
        let (root, ours) = location();
        std::fs::create_dir_all(&root).unwrap();
        let victim = root.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let engine = Engine::with_cache_at(Some(ours.clone())).unwrap();
        let entry = engine.cache().unwrap().path(&load(&ours, "payment").sha256);
        std::fs::remove_file(&entry).unwrap();
        let old_tmp = entry.with_extension(format!("tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &old_tmp).unwrap();
        std::os::unix::fs::symlink(&victim, &entry).unwrap();
        let bytes = std::fs::read(wasm("payment")).unwrap();
        assert!(!LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::symlink_metadata(&entry).unwrap().is_file(), "the link itself was replaced");
        assert!(LoadedComponent::from_bytes(&engine, &wasm("payment"), &bytes).unwrap().from_cache);
        assert_eq!(mode(&entry), 0o600);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
