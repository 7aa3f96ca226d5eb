//! Which part of the manifest one host serves.

use crate::manifest::{Manifest, StateBackend};

/// What one host serves of the manifest: several hosts, each serving a
/// subset, share the work of one app through Kafka's consumer groups and
/// one PostgreSQL.
#[derive(Debug, Clone)]
pub struct Serving {
    /// Components this host runs (consumes for, serves the port of);
    /// `None`: all of the manifest's.
    pub components: Option<std::collections::BTreeSet<String>>,
    /// Whether this host serves the gateway.
    pub gateway: bool,
    /// Static group member id of this host; `None`: `kafka.instance_id`,
    /// else one of its own (see [`crate::instance`]).
    pub instance_id: Option<String>,
}

impl Default for Serving {
    fn default() -> Self {
        Self { components: None, gateway: true, instance_id: None }
    }
}

impl Serving {
    /// Whether this host runs component `name`.
    pub fn runs(&self, name: &str) -> bool {
        self.components.as_ref().is_none_or(|c| c.contains(name))
    }

    /// Checks the selection against the manifest.
    ///
    /// # Errors
    /// An unknown component, nothing to serve, or a gateway that could not
    /// read the order component's state.
    pub fn validate(&self, manifest: &Manifest) -> anyhow::Result<()> {
        if let Some(components) = &self.components {
            if let Some(unknown) = components.iter().find(|c| !manifest.components.contains_key(*c)) {
                let known: Vec<&String> = manifest.components.keys().collect();
                anyhow::bail!("--components: no component named {unknown:?} in the manifest (it has {known:?})");
            }
            anyhow::ensure!(
                self.gateway || !components.is_empty(),
                "nothing to serve: --no-gateway and no --components"
            );
        }
        let order = &manifest.gateway.order_component;
        anyhow::ensure!(
            !self.gateway || self.runs(order) || manifest.state.backend == StateBackend::Postgres,
            "the gateway answers GET /order/{{id}} from the state of component {order:?}, which this host does not run: \
             with the redb backend that state is local to the host running {order:?}; serve it here (--components) or \
             use the postgres backend ([state] backend = \"postgres\")"
        );
        if manifest.state.backend == StateBackend::Redb {
            for (name, _) in manifest.components.iter().filter(|(_, settings)| settings.vault) {
                anyhow::ensure!(
                    self.gateway == self.runs(name),
                    "with the redb backend the card vault is in this host's state_dir: the gateway (which deposits \
                     cards) and component {name:?} (which redeems them) must be served by the same host; or use the \
                     postgres backend ([state] backend = \"postgres\")"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(backend: &str) -> Manifest {
        let component = |name: &str, port: u16| {
            format!(
                "[components.{name}]\nwasm = \"{name}.wasm\"\nport = {port}\ntopics = [\"t\"]\ngroup = \"{name}\"\n"
            )
        };
        let text = format!(
            "[gateway]\nport = 1\n[state]\nbackend = \"{backend}\"\n{}{}",
            component("order", 2),
            component("payment", 3)
        );
        Manifest::parse(&text).unwrap()
    }

    fn serving(components: Option<&[&str]>, gateway: bool) -> Serving {
        let components = components.map(|c| c.iter().map(|n| (*n).to_owned()).collect());
        Serving { components, gateway, instance_id: None }
    }

    #[test]
    fn a_host_serves_a_subset_it_can_serve() {
        let redb = manifest("redb");
        assert!(serving(None, true).validate(&redb).is_ok());
        assert!(serving(Some(&["order"]), true).validate(&redb).is_ok());
        assert!(serving(Some(&["payment"]), false).validate(&redb).is_ok());
        let err = serving(Some(&["paymnet"]), true).validate(&redb).unwrap_err().to_string();
        assert!(err.contains("no component named \"paymnet\""), "{err}");
        let err = serving(Some(&[]), false).validate(&redb).unwrap_err().to_string();
        assert!(err.contains("nothing to serve"), "{err}");
        // A gateway without the order component needs the shared store.
        let err = serving(Some(&["payment"]), true).validate(&redb).unwrap_err().to_string();
        assert!(err.contains("postgres"), "{err}");
        assert!(serving(Some(&[]), true).validate(&manifest("postgres")).is_ok(), "a gateway-only host");
        assert!(serving(Some(&["payment"]), true).runs("payment") && !serving(Some(&["payment"]), true).runs("order"));
        // With redb the vault is local: who deposits and who redeems share a host.
        let mut vaulted = manifest("redb");
        vaulted.components.get_mut("payment").unwrap().vault = true;
        assert!(serving(None, true).validate(&vaulted).is_ok());
        let err = serving(Some(&["payment"]), false).validate(&vaulted).unwrap_err().to_string();
        assert!(err.contains("card vault") && err.contains("\"payment\""), "{err}");
        assert!(serving(Some(&["order"]), true).validate(&vaulted).is_err(), "a gateway whose cards no one redeems");
        let mut shared = manifest("postgres");
        shared.components.get_mut("payment").unwrap().vault = true;
        assert!(serving(Some(&["payment"]), false).validate(&shared).is_ok());
    }
}
