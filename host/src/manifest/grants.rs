//! What a component is granted beyond its world, as the manifest spells it:
//! the topics and event types it may publish (`publishes`), the WASI
//! capabilities it gets (`wasi`), and whether it may redeem card tokens
//! from the host's vault (`vault`). Plain data, parsed here; the runtime
//! enforces it (`runtime/grants.rs`).

use std::collections::BTreeSet;

/// A WASI capability a component can be granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasiGrant {
    /// `wasi:clocks/*`: wall clock and monotonic clock.
    Clocks,
    /// `wasi:random/*`: random bytes.
    Random,
    /// What the guest writes to `wasi:cli/stderr` (panic messages) reaches
    /// the host's stderr; without it the stream is discarded.
    Stderr,
}

impl WasiGrant {
    /// The manifest's name of the grant.
    pub fn name(self) -> &'static str {
        match self {
            Self::Clocks => "clocks",
            Self::Random => "random",
            Self::Stderr => "stderr",
        }
    }

    /// Parses a manifest name.
    ///
    /// # Errors
    /// A message for capabilities the host cannot grant (yet) or does not know.
    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "clocks" => Ok(Self::Clocks),
            "random" => Ok(Self::Random),
            "stderr" | "log" => Ok(Self::Stderr),
            "files" | "filesystem" | "environment" | "env" | "sockets" | "network" => Err(format!(
                "{name:?} is not grantable yet: components get no files, environment or sockets; \
                 grantable: \"clocks\", \"random\", \"stderr\""
            )),
            other => Err(format!("unknown WASI grant {other:?}; grantable: \"clocks\", \"random\", \"stderr\"")),
        }
    }
}

/// The WASI capabilities of one component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WasiGrants {
    pub clocks: bool,
    pub random: bool,
    pub stderr: bool,
}

impl Default for WasiGrants {
    /// Clocks, random and stderr: what a component gets when its manifest
    /// entry says nothing.
    fn default() -> Self {
        Self { clocks: true, random: true, stderr: true }
    }
}

impl WasiGrants {
    /// Nothing granted.
    pub const NONE: Self = Self { clocks: false, random: false, stderr: false };

    /// The grants named, nothing else.
    ///
    /// # Errors
    /// The first name [`WasiGrant::parse`] refuses.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, String> {
        let mut grants = Self::NONE;
        for name in names {
            match WasiGrant::parse(name.as_ref())? {
                WasiGrant::Clocks => grants.clocks = true,
                WasiGrant::Random => grants.random = true,
                WasiGrant::Stderr => grants.stderr = true,
            }
        }
        Ok(grants)
    }
}

/// The topics and event types one component may publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishGrants {
    /// `(topic, event type)` pairs, `"*"` as the event type for any; `None`
    /// allows everything (tests and benches, never a manifest).
    pub(crate) allowed: Option<BTreeSet<(String, String)>>,
    /// The manifest key that is missing (`components.NAME.publishes`), when
    /// it gave none: nothing is granted, and the refusal names it.
    pub(crate) missing: Option<String>,
}

impl PublishGrants {
    /// Everything may be published.
    pub fn any() -> Self {
        Self { allowed: None, missing: None }
    }

    /// Nothing may be published, because the manifest has no `key`: an
    /// absent grant grants nothing.
    pub fn missing(key: &str) -> Self {
        Self { allowed: Some(BTreeSet::new()), missing: Some(key.to_owned()) }
    }

    /// Parses the manifest's `"topic:EventType"` entries (`"topic:*"` for
    /// every event type on a topic); an empty list allows nothing.
    ///
    /// # Errors
    /// A message naming the first malformed entry.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut allowed = BTreeSet::new();
        for entry in entries {
            let entry = entry.as_ref();
            match entry.split_once(':') {
                Some((topic, event_type)) if !topic.is_empty() && !event_type.is_empty() => {
                    allowed.insert((topic.to_owned(), event_type.to_owned()));
                }
                _ => return Err(format!("{entry:?}: write \"topic:EventType\" (or \"topic:*\")")),
            }
        }
        Ok(Self { allowed: Some(allowed), missing: None })
    }
}

/// Everything one component is granted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    pub publishes: PublishGrants,
    pub wasi: WasiGrants,
    /// May import `shop:service/vault` and redeem card tokens. Never by
    /// default: the manifest says `vault = true`.
    pub vault: bool,
}

impl From<WasiGrants> for Grants {
    /// Those WASI capabilities; publishing anything; no vault.
    fn from(wasi: WasiGrants) -> Self {
        Self { wasi, ..Self::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasi_grant_names_are_checked() {
        assert_eq!(WasiGrants::parse(&["clocks"]).unwrap(), WasiGrants { clocks: true, ..WasiGrants::NONE });
        assert!(WasiGrants::parse(&["sockets"]).unwrap_err().contains("not grantable yet"));
        assert!(WasiGrants::parse(&["files"]).unwrap_err().contains("not grantable yet"));
        assert!(WasiGrants::parse(&["environment"]).unwrap_err().contains("not grantable yet"));
        assert!(WasiGrants::parse(&["clock"]).unwrap_err().contains("unknown WASI grant \"clock\""));
    }
}
