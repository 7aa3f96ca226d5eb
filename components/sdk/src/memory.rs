//! In-memory [`Host`] for native unit tests of service logic, timers included.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use crate::{Card, Event, Host, Level, StateError, TIMER_TOPIC, VaultError};

/// A pending timer of a [`MemoryHost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledTimer {
    /// When it fires, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub event_type: String,
    pub key: String,
    pub payload: Vec<u8>,
}

/// A [`Host`] whose state, clock, config and log live in memory.
#[derive(Debug, Default)]
pub struct MemoryHost {
    /// The service's key-value state.
    pub state: BTreeMap<String, Vec<u8>>,
    /// Config values as the manifest would give them.
    pub config: HashMap<String, String>,
    /// Current time returned by [`Host::now_ms`].
    pub now_ms: u64,
    /// How far [`Host::deadline_now_ms`] is behind `now_ms` (an outage the
    /// host does not count).
    pub deadline_lag_ms: u64,
    /// Every line logged, in order.
    pub logs: RefCell<Vec<(Level, String)>>,
    /// Pending timers by id.
    pub timers: BTreeMap<String, ScheduledTimer>,
    /// The vault's twin: card numbers by token, with when they expire.
    pub vault: BTreeMap<String, (Card, u64)>,
    /// The vault cannot be read: every redeem is unavailable.
    pub vault_down: bool,
}

impl MemoryHost {
    /// An empty host at time `now_ms`.
    pub fn at(now_ms: u64) -> Self {
        Self { now_ms, ..Self::default() }
    }

    /// Sets a config value.
    pub fn with_config(mut self, key: &str, value: &str) -> Self {
        self.config.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Puts a card number in the vault twin under `token`, never expiring.
    pub fn with_card(mut self, token: &str, number: &str) -> Self {
        let card = Card {
            number: number.to_owned(),
            brand: shop_events::card::brand(number).to_owned(),
            last4: shop_events::card::last4(number).to_owned(),
        };
        self.vault.insert(token.to_owned(), (card, u64::MAX));
        self
    }

    /// Deposits a card number in the vault twin until `expires_ms`, as the
    /// gateway does; returns the token events carry.
    pub fn deposit_card(&mut self, number: &str, expires_ms: u64) -> shop_events::CardToken {
        let token = format!("tok_{}", self.vault.len() + 1);
        let brand = shop_events::card::brand(number).to_owned();
        let last4 = shop_events::card::last4(number).to_owned();
        let card = Card { number: number.to_owned(), brand: brand.clone(), last4: last4.clone() };
        self.vault.insert(token.clone(), (card, expires_ms));
        shop_events::CardToken { token, brand, last4 }
    }

    /// Removes the timers due at [`MemoryHost::now_ms`] and returns the events
    /// the host would deliver for them, earliest first (ties by timer id).
    ///
    /// The timers are removed before the events are handled, so a handler
    /// may schedule the same id again, as with the real host.
    pub fn take_due(&mut self) -> Vec<Event> {
        let due: Vec<String> =
            self.timers.iter().filter(|(_, timer)| timer.at_ms <= self.now_ms).map(|(id, _)| id.clone()).collect();
        let mut fired: Vec<(String, ScheduledTimer)> =
            due.into_iter().filter_map(|id| self.timers.remove(&id).map(|timer| (id, timer))).collect();
        fired.sort_by_key(|(_, timer)| timer.at_ms);
        fired
            .into_iter()
            .map(|(id, timer)| Event {
                id: format!("timer/{id}/{}", timer.at_ms),
                event_type: timer.event_type,
                topic: TIMER_TOPIC.to_owned(),
                key: Some(timer.key),
                headers: Vec::new(),
                payload: timer.payload,
                timestamp_ms: timer.at_ms,
            })
            .collect()
    }
}

impl Host for MemoryHost {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.state.get(key).cloned())
    }

    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StateError> {
        self.state.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<(), StateError> {
        self.state.remove(key);
        Ok(())
    }

    fn list_keys(&self, prefix: &str, limit: u32) -> Result<Vec<String>, StateError> {
        Ok(self
            .state
            .range(prefix.to_owned()..)
            .map(|(key, _)| key)
            .take_while(|key| key.starts_with(prefix))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    fn schedule(
        &mut self,
        id: &str,
        at_ms: u64,
        event_type: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<(), StateError> {
        let timer =
            ScheduledTimer { at_ms, event_type: event_type.to_owned(), key: key.to_owned(), payload: payload.to_vec() };
        self.timers.insert(id.to_owned(), timer);
        Ok(())
    }

    fn cancel(&mut self, id: &str) -> Result<(), StateError> {
        self.timers.remove(id);
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn deadline_now_ms(&self) -> u64 {
        self.now_ms.saturating_sub(self.deadline_lag_ms)
    }

    fn config(&self, key: &str) -> Option<String> {
        self.config.get(key).cloned()
    }

    fn log(&self, level: Level, message: &str, fields: &[(&str, &str)]) {
        let fields: Vec<String> = fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.logs.borrow_mut().push((level, format!("{message} {}", fields.join(" "))));
    }

    fn redeem_card(&self, token: &str) -> Result<Card, VaultError> {
        if self.vault_down {
            return Err(VaultError::Unavailable("the vault twin is down".into()));
        }
        match self.vault.get(token) {
            None => Err(VaultError::Unknown),
            Some((_, expires_ms)) if *expires_ms <= self.now_ms => Err(VaultError::Expired),
            Some((card, _)) => Ok(card.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_timers_fire_once_in_time_order_and_can_be_rescheduled() {
        let mut host = MemoryHost::at(100);
        host.schedule("b", 50, "B", "k", b"{}").unwrap();
        host.schedule("a", 80, "A", "k", b"1").unwrap();
        host.schedule("later", 101, "L", "k", b"{}").unwrap();
        host.schedule("gone", 10, "G", "k", b"{}").unwrap();
        host.cancel("gone").unwrap();
        host.cancel("never-set").unwrap();
        let due = host.take_due();
        let ids: Vec<&str> = due.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["timer/b/50", "timer/a/80"]);
        assert_eq!(
            (due[1].topic.as_str(), due[1].key.as_deref(), due[1].payload.as_slice()),
            (TIMER_TOPIC, Some("k"), b"1".as_slice())
        );
        assert!(host.take_due().is_empty(), "fired timers are gone");
        host.schedule("a", 90, "A", "k", b"{}").unwrap();
        assert_eq!(host.take_due().len(), 1, "a fired id can be scheduled again");
        assert_eq!(host.timers.keys().collect::<Vec<_>>(), ["later"]);
    }

    #[test]
    fn vault_twin_redeems_until_expiry() {
        let mut host = MemoryHost::at(100);
        let token = host.deposit_card("4242424242424242", 200);
        assert_eq!((token.brand.as_str(), token.last4.as_str()), ("visa", "4242"));
        assert_eq!(host.redeem_card(&token.token).unwrap().number, "4242424242424242");
        assert!(!format!("{:?}", host.redeem_card(&token.token).unwrap()).contains("4242424242"), "Debug hides it");
        assert_eq!(host.redeem_card("tok_nope"), Err(VaultError::Unknown));
        host.now_ms = 200;
        assert_eq!(host.redeem_card(&token.token), Err(VaultError::Expired));
    }
}
