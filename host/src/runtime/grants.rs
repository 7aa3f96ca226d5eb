//! Grants enforced: the manifest spells what a component is granted
//! beyond its world (`publishes`, `wasi`, `vault`: `crate::manifest`'s grant
//! types); the runtime enforces it when a component is loaded (its imports)
//! and when a call returns (its outgoing events).

use wasmtime::component::Component;

use super::bindings::OutgoingEvent;
use crate::manifest::{Grants, PublishGrants, WasiGrant, WasiGrants};

impl WasiGrants {
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

impl PublishGrants {
    /// Checks what a call emitted.
    ///
    /// # Errors
    /// The reason, naming the first event not granted and the grant.
    pub fn check(&self, outgoing: &[OutgoingEvent]) -> Result<(), String> {
        let Some(allowed) = &self.allowed else { return Ok(()) };
        if let (Some(key), Some(out)) = (&self.missing, outgoing.first()) {
            return Err(format!(
                "component emitted {}:{}, but it has no publishes grant ({key} is missing, and an absent grant \
                 grants nothing): list what it may publish, {key} = [\"{}:{}\", ...]",
                out.topic, out.event_type, out.topic, out.event_type
            ));
        }
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
        let missing = PublishGrants::missing("components.x.publishes");
        assert!(missing.check(&[]).is_ok(), "emitting nothing needs no grant");
        let err = missing.check(&[out("a", "B")]).unwrap_err();
        assert!(err.contains("no publishes grant") && err.contains("components.x.publishes is missing"), "{err}");
        assert!(PublishGrants::parse(&["payments"]).unwrap_err().contains("topic:EventType"));
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
