//! A host's identity in Kafka's consumer groups.
//!
//! Static membership (`group.instance.id`) lets a restarted host take its
//! partitions back at once instead of waiting for the broker to expire the
//! dead member; but two live hosts with one id fence each other. So each
//! host needs an id of its own that survives its restarts: given
//! explicitly (`--instance-id`, `HOST_INSTANCE_ID`, `kafka.instance_id`),
//! or taken from the first free slot file under `state_dir/instances/`,
//! locked for the host's lifetime. A restarted host finds its slot free
//! again and keeps its id; a second host on the same directory takes the
//! next slot, and a host on another machine has its own directory.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};

use anyhow::Context as _;

use crate::manifest::Manifest;

/// Slots tried before giving up.
const SLOTS: usize = 256;

/// This host's member id, and the slot it holds while running.
#[derive(Debug)]
pub struct Instance {
    id: String,
    _slot: Option<File>,
}

impl Instance {
    /// The id (each component's consumer joins as `{id}-{component}`).
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// This host's id: `explicit`, else the manifest's, else a slot's.
///
/// # Errors
/// An id with characters Kafka refuses, or a state directory that cannot
/// hold the slots.
pub fn resolve(manifest: &Manifest, explicit: Option<&str>) -> anyhow::Result<Instance> {
    if let Some(id) = explicit.filter(|id| !id.is_empty()).or(manifest.kafka.instance_id.as_deref()) {
        if let Some(bad) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
            anyhow::bail!("instance id {id:?} contains {bad:?}; use letters, digits, '.', '_' or '-'");
        }
        return Ok(Instance { id: id.to_owned(), _slot: None });
    }
    let dir = manifest.runtime.state_dir.join("instances");
    // 0700: the state directory also holds the compile cache's seal key.
    crate::perms::create_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for n in 0..SLOTS {
        let path = dir.join(format!("slot-{n}"));
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(err)) => {
                return Err(err).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        let mut id = String::new();
        file.read_to_string(&mut id).with_context(|| format!("cannot read {}", path.display()))?;
        let id = id.trim().to_owned();
        let id = if id.is_empty() || id.chars().any(|c| !(c.is_ascii_alphanumeric() || c == '-')) {
            let id = format!("host-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
            file.set_len(0)?;
            file.rewind()?;
            file.write_all(id.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
            id
        } else {
            id
        };
        return Ok(Instance { id, _slot: Some(file) });
    }
    anyhow::bail!("all {SLOTS} instance slots under {} are held by running hosts", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(state_dir: &std::path::Path) -> Manifest {
        let mut manifest = Manifest::parse(
            "[gateway]\nport = 1\n[components.c]\nwasm = \"c.wasm\"\nport = 2\ntopics = [\"t\"]\ngroup = \"g\"\n",
        )
        .unwrap();
        manifest.runtime.state_dir = state_dir.to_owned();
        manifest
    }

    #[test]
    fn hosts_on_one_directory_get_distinct_ids_that_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("instance-{}", uuid::Uuid::new_v4().simple()));
        let manifest = manifest(&dir);
        let first = resolve(&manifest, None).unwrap();
        let second = resolve(&manifest, None).unwrap();
        assert_ne!(first.id(), second.id(), "two live hosts never share an id");
        let id = first.id().to_owned();
        drop(first);
        assert_eq!(resolve(&manifest, None).unwrap().id(), id, "a restarted host keeps its id");
        assert_eq!(resolve(&manifest, Some("edge-1")).unwrap().id(), "edge-1");
        assert!(resolve(&manifest, Some("no spaces")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
