//! What a component is granted beyond its world: the topics and event types
//! it may publish, the WASI capabilities it gets, and whether it may redeem
//! card tokens from the host's vault. The manifest spells them (`publishes`,
//! `wasi`, `vault`); the runtime enforces them when a component is loaded
//! (its imports) and when a call returns (its outgoing events).

use std::collections::BTreeSet;

use wasmtime::component::Component;

use super::bindings::OutgoingEvent;

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

    fn has(self, grant: WasiGrant) -> bool {
        match grant {
            WasiGrant::Clocks => self.clocks,
            WasiGrant::Random => self.random,
            WasiGrant::Stderr => self.stderr,
        }
    }

    /// Checks every import of `component` against these grants.
    ///
    /// # Errors
    /// A message naming the first import that needs a capability not
    /// granted, or that the host does not offer at all.
    pub fn check_imports(self, component: &Component, engine: &wasmtime::Engine) -> Result<(), String> {
        check_imports(self, false, component, engine)
    }
}

/// Checks every import of `component` against `wasi` and the `vault` grant.
fn check_imports(
    wasi: WasiGrants,
    vault: bool,
    component: &Component,
    engine: &wasmtime::Engine,
) -> Result<(), String> {
    for (name, _) in component.component_type().imports(engine) {
        match import_needs(name) {
            Needs::Nothing => {}
            Needs::Vault if vault => {}
            Needs::Vault => {
                return Err(format!(
                    "imports {name}, which needs the vault grant (`vault = true` in its manifest block): \
                     only the component that charges cards may redeem card tokens"
                ));
            }
            Needs::Grant(grant) if wasi.has(grant) => {}
            Needs::Grant(grant) => {
                return Err(format!(
                    "imports {name}, which needs the WASI grant {:?} (add it to the component's `wasi` list)",
                    grant.name()
                ));
            }
            Needs::NotGrantable(what) => {
                return Err(format!("imports {name}: {what} are not grantable yet (no component gets them)"));
            }
            Needs::Unknown => return Err(format!("imports {name}, which the host does not offer")),
        }
    }
    Ok(())
}

/// What an import of a component needs from its grants.
enum Needs {
    /// Part of the world, or a WASI interface that carries no capability
    /// here: streams and polls, exit, stdin (empty), stdout and stderr
    /// (discarded unless `stderr` is granted), the environment (empty) and
    /// the filesystem (no directory is opened). Rust's std links several of
    /// these in every component.
    Nothing,
    Grant(WasiGrant),
    /// `shop:service/vault`: card numbers, for the `vault` grant only.
    Vault,
    NotGrantable(&'static str),
    Unknown,
}

fn import_needs(name: &str) -> Needs {
    let interface = name.split('@').next().unwrap_or(name);
    if interface == "shop:service/vault" {
        return Needs::Vault;
    }
    let (package, _) = interface.split_once('/').unwrap_or((interface, ""));
    match package {
        "shop:service" | "wasi:io" | "wasi:cli" | "wasi:filesystem" => Needs::Nothing,
        "wasi:clocks" => Needs::Grant(WasiGrant::Clocks),
        "wasi:random" => Needs::Grant(WasiGrant::Random),
        "wasi:sockets" => Needs::NotGrantable("sockets"),
        _ => Needs::Unknown,
    }
}

/// The topics and event types one component may publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishGrants {
    /// `(topic, event type)` pairs, `"*"` as the event type for any; `None`
    /// allows everything (a manifest entry without `publishes`).
    allowed: Option<BTreeSet<(String, String)>>,
}

impl PublishGrants {
    /// Everything may be published.
    pub fn any() -> Self {
        Self { allowed: None }
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
        Ok(Self { allowed: Some(allowed) })
    }

    /// Checks what a call emitted.
    ///
    /// # Errors
    /// The reason, naming the first event not granted and the grant.
    pub fn check(&self, outgoing: &[OutgoingEvent]) -> Result<(), String> {
        let Some(allowed) = &self.allowed else { return Ok(()) };
        for out in outgoing {
            let granted = |event_type: &str| allowed.contains(&(out.topic.clone(), event_type.to_owned()));
            if !granted(&out.event_type) && !granted("*") {
                let grant: Vec<String> = allowed.iter().map(|(t, e)| format!("{t}:{e}")).collect();
                return Err(format!(
                    "component emitted {}:{}, which its grant does not allow (publishes = {grant:?})",
                    out.topic, out.event_type
                ));
            }
        }
        Ok(())
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

impl Grants {
    /// Checks every import of `component`: its WASI capabilities and the vault.
    ///
    /// # Errors
    /// As [`WasiGrants::check_imports`], and for a component importing the
    /// vault without the grant.
    pub fn check_imports(&self, component: &Component, engine: &wasmtime::Engine) -> Result<(), String> {
        check_imports(self.wasi, self.vault, component, engine)
    }
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

    fn out(topic: &str, event_type: &str) -> OutgoingEvent {
        OutgoingEvent { topic: topic.into(), event_type: event_type.into(), key: "k".into(), payload: b"{}".to_vec() }
    }

    #[test]
    fn publish_grants_allow_only_what_they_list() {
        let grants = PublishGrants::parse(&["payments:PaymentAuthorized", "emails:*"]).unwrap();
        assert!(grants.check(&[out("payments", "PaymentAuthorized"), out("emails", "Anything")]).is_ok());
        let err = grants.check(&[out("payments", "PaymentAuthorized"), out("orders", "OrderConfirmed")]).unwrap_err();
        assert!(err.contains("orders:OrderConfirmed") && err.contains("payments:PaymentAuthorized"), "{err}");
        assert!(grants.check(&[out("payments", "PaymentRefunded")]).is_err(), "another type on a granted topic");
        assert!(PublishGrants::parse::<&str>(&[]).unwrap().check(&[out("a", "B")]).is_err(), "empty: nothing");
        assert!(PublishGrants::any().check(&[out("a", "B")]).is_ok());
        assert!(PublishGrants::parse(&["payments"]).unwrap_err().contains("topic:EventType"));
    }

    #[test]
    fn wasi_grant_names_are_checked() {
        assert_eq!(WasiGrants::parse(&["clocks"]).unwrap(), WasiGrants { clocks: true, ..WasiGrants::NONE });
        assert!(WasiGrants::parse(&["sockets"]).unwrap_err().contains("not grantable yet"));
        assert!(WasiGrants::parse(&["files"]).unwrap_err().contains("not grantable yet"));
        assert!(WasiGrants::parse(&["environment"]).unwrap_err().contains("not grantable yet"));
        assert!(WasiGrants::parse(&["clock"]).unwrap_err().contains("unknown WASI grant \"clock\""));
    }

    #[test]
    fn imports_are_classified_by_package() {
        assert!(matches!(import_needs("wasi:clocks/wall-clock@0.2.6"), Needs::Grant(WasiGrant::Clocks)));
        assert!(matches!(import_needs("wasi:random/insecure@0.2.6"), Needs::Grant(WasiGrant::Random)));
        assert!(matches!(import_needs("wasi:sockets/tcp@0.2.6"), Needs::NotGrantable(_)));
        assert!(matches!(import_needs("wasi:http/outgoing-handler@0.2.6"), Needs::Unknown));
        assert!(matches!(import_needs("wasi:cli/stderr@0.2.6"), Needs::Nothing));
        assert!(matches!(import_needs("shop:service/state@0.2.0"), Needs::Nothing));
        assert!(matches!(import_needs("shop:service/vault@0.2.0"), Needs::Vault));
    }
}
