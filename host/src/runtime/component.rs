//! A version of a component: compiled, checked against the world and its
//! grants, pre-instantiated.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::{Engine, Grants, HostState, bindings};

/// A component that cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read component {path:?}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path:?} is not a valid Wasm component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("{path:?} does not implement the world shop:service/service@0.2.0: {message}")]
    World { path: PathBuf, message: String },
    #[error("{path:?} is refused by its grants: {message}")]
    Ungranted { path: PathBuf, message: String },
    #[error("{path:?} is refused by the contracts between components: {message}")]
    Contract { path: PathBuf, message: String },
}

/// A compiled, pre-instantiated version of a component.
pub struct LoadedComponent {
    pub(super) pre: bindings::ServicePre<HostState>,
    /// Hex sha256 of the component bytes: the version shown everywhere.
    pub sha256: String,
    /// Where the bytes came from.
    pub path: PathBuf,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
    /// What it says it publishes and consumes (its `shop:contract`
    /// section), if it says.
    pub contract: Option<crate::contracts::Contract>,
}

impl LoadedComponent {
    /// Compiles `bytes` and checks them against the world.
    ///
    /// # Errors
    /// [`LoadError::Compile`] for bytes that are not a component,
    /// [`LoadError::World`] for a component with the wrong imports or
    /// exports, [`LoadError::Contract`] for a `shop:contract` section that
    /// cannot be read.
    pub fn from_bytes(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Self, LoadError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let cached = engine.cache().and_then(|cache| cache.get(engine.wasmtime(), &sha256));
        let from_cache = cached.is_some();
        let component = match cached {
            Some(component) => component,
            None => {
                let component = Component::new(engine.wasmtime(), bytes)
                    .map_err(|err| LoadError::Compile { path: path.to_owned(), message: format!("{err:#}") })?;
                if let Some(cache) = engine.cache() {
                    cache.put(&sha256, &component);
                }
                component
            }
        };
        // Read once the bytes are known to be a component.
        let contract = crate::contracts::Contract::from_wasm(bytes)
            .map_err(|message| LoadError::Contract { path: path.to_owned(), message })?;
        let world = |err: wasmtime::Error| LoadError::World { path: path.to_owned(), message: format!("{err:#}") };
        let pre = engine.linker().instantiate_pre(&component).map_err(world)?;
        let pre = bindings::ServicePre::new(pre).map_err(world)?;
        Ok(Self { pre, sha256, path: path.to_owned(), loaded_at: SystemTime::now(), from_cache, contract })
    }

    /// Checks the component's imports against `grants` (its WASI
    /// capabilities and the vault).
    ///
    /// # Errors
    /// [`LoadError::Ungranted`] naming the first import that needs a
    /// capability not granted, or one the host does not offer.
    pub fn check_grants(&self, engine: &Engine, grants: impl Into<Grants>) -> Result<(), LoadError> {
        let grants: Grants = grants.into();
        grants
            .check_imports(self.pre.instance_pre().component(), engine.wasmtime())
            .map_err(|message| LoadError::Ungranted { path: self.path.clone(), message })
    }

    /// Reads and loads a component file.
    ///
    /// # Errors
    /// As [`LoadedComponent::from_bytes`], plus [`LoadError::Read`].
    pub fn from_file(engine: &Engine, path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read { path: path.to_owned(), source })?;
        Self::from_bytes(engine, path, &bytes)
    }
}
