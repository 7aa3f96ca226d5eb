//! The vault key: 32 random bytes that whoever holds them can decrypt every
//! card in the vault with, so the one secret an operator must protect.
//!
//! From [`KEY_ENV`] (64 hex digits) if set, else from [`KEY_FILE`] in the
//! state directory, created on first start (0600, random). A key file owned
//! by another user or readable by group or others is refused. Hosts sharing
//! one PostgreSQL must share the key: give each the same [`KEY_ENV`] (or copy
//! one key file into each state directory); the vault refuses a host whose
//! key differs from the one it was created with ([`super::Vault::open`]).

use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::Context as _;

/// The environment variable holding the vault key (64 hex digits).
pub const KEY_ENV: &str = "HOST_VAULT_KEY";
/// The key file's name in the state directory.
pub const KEY_FILE: &str = "vault.key";

/// The vault key. Its `Debug` shows only the fingerprint.
#[derive(Clone, PartialEq, Eq)]
pub struct VaultKey([u8; 32]);

impl std::fmt::Debug for VaultKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VaultKey({})", self.fingerprint())
    }
}

impl VaultKey {
    /// A key of these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A new random key.
    ///
    /// # Errors
    /// When the system has no randomness to give.
    pub fn random() -> anyhow::Result<Self> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|err| anyhow::anyhow!("no randomness for the vault key: {err}"))?;
        Ok(Self(bytes))
    }

    /// Parses 64 hex digits (surrounding whitespace ignored).
    ///
    /// # Errors
    /// Anything else, without quoting it (it may be most of a key).
    pub fn from_hex(text: &str) -> anyhow::Result<Self> {
        let bytes = hex::decode(text.trim()).ok().and_then(|b| <[u8; 32]>::try_from(b).ok());
        bytes.map(Self).context("a vault key is 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`")
    }

    pub(super) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A short digest that tells keys apart and reveals nothing of them.
    pub fn fingerprint(&self) -> String {
        super::fingerprint(&self.0)
    }

    /// The host's key: [`KEY_ENV`] if set, else `state_dir/vault.key`,
    /// created on first start.
    ///
    /// # Errors
    /// A malformed key, or a key file that cannot be read or created, is not
    /// a regular file, belongs to another user or is readable by group or
    /// others.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        match std::env::var(KEY_ENV) {
            // Empty is unset (compose passes `${HOST_VAULT_KEY:-}` through).
            Ok(text) if text.trim().is_empty() => {}
            Ok(text) => return Self::from_hex(&text).context(KEY_ENV),
            Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("{KEY_ENV} is not 64 hex digits"),
            Err(std::env::VarError::NotPresent) => {}
        }
        let path = state_dir.join(KEY_FILE);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => Self::read_file(&path),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Self::create_file(state_dir, &path),
            Err(err) => Err(err).with_context(|| format!("cannot read the vault key {}", path.display())),
        }
    }

    fn read_file(path: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
        anyhow::ensure!(meta.file_type().is_file(), "the vault key {} is not a regular file", path.display());
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        anyhow::ensure!(
            meta.uid() == me,
            "the vault key {} belongs to user {}, not to this host's user {me}: whoever owns it can read every card",
            path.display(),
            meta.uid()
        );
        let mode = meta.permissions().mode() & 0o777;
        anyhow::ensure!(
            mode & 0o077 == 0,
            "the vault key {} has mode {mode:o}: group and others must have no access (chmod 600 it)",
            path.display()
        );
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_hex(&text).with_context(|| format!("the vault key {}", path.display()))
    }

    fn create_file(state_dir: &Path, path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir).with_context(|| format!("cannot create {}", state_dir.display()))?;
        let key = Self::random()?;
        // Exclusive and 0600 from the start: never a moment readable by others.
        let created = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
        match created {
            Ok(mut file) => {
                file.write_all(format!("{}\n", hex::encode(key.0)).as_bytes())
                    .and_then(|()| file.sync_all())
                    .with_context(|| format!("cannot write the vault key {}", path.display()))?;
                tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(), "created the card vault key");
                Ok(key)
            }
            // Another process created it meanwhile: use theirs.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => Self::read_file(path),
            Err(err) => Err(err).with_context(|| format!("cannot create the vault key {}", path.display())),
        }
    }
}
