//! The card vault: where a customer's card number goes instead of onto
//! Kafka. The gateway deposits the number for its order and gets a token
//! (derived from the order id under a key of the vault's); events
//! carry the token with the brand and last four digits; only a component
//! granted the vault (payment) redeems the token, through the `vault` import.
//!
//! Entries are encrypted at rest with ChaCha20-Poly1305 under the host's
//! vault key ([`key`]), bound to their token and expiry (the associated
//! data), and live in the host's state adapter under a store of their own
//! ([`VAULT_STORE`]): the host's redb file for one host, the shared PostgreSQL for
//! several, so that whichever host serves payment redeems what any gateway
//! deposited. Entries expire after [`DEFAULT_TTL`] and are swept.
//!
//! Deposits are written by one thread in group commits: the deposits that
//! arrive while one commit is on its way to disk share the next.

pub mod key;

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac as _};
use sha2::{Digest, Sha256};
use shop_events::CardToken;

use crate::clock::Clock;
use crate::state::{Commit, StateStore, StoreError, Write};
pub use key::{KEY_ENV, KEY_FILE, VaultKey};

/// The name of the vault's store in the state adapter (tables `@vault/...`
/// in `state_dir/host.redb`, or component `@vault` in PostgreSQL): `@` is not
/// allowed in component names, so no component's store can be it.
pub const VAULT_STORE: &str = "@vault";
/// How long a deposited card can be redeemed: far beyond a payment's
/// deadline (a request past it is declined without redeeming), short
/// enough that the vault holds little.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// How often expired entries are swept, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Expired entries removed per sweep, at most.
const SWEEP_LIMIT: usize = 200;
/// The store key of the key's fingerprint.
const KEY_ID: &str = "meta/key-id";
/// Format version of an entry.
const VERSION: u8 = 1;

/// Why the vault could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// No such token: never issued, or expired and swept.
    #[error("no such card token")]
    Unknown,
    /// The token's entry expired.
    #[error("the card token expired")]
    Expired,
    /// The store cannot be read or written, or an entry cannot be decrypted.
    #[error("card vault unavailable: {0}")]
    Unavailable(String),
}

impl From<StoreError> for VaultError {
    fn from(err: StoreError) -> Self {
        Self::Unavailable(err.to_string())
    }
}

/// A redeemed card. Its `Debug` never shows the number.
pub use shop_events::card::Card;

/// A deposit waiting for the writer: its writes and who waits for them.
struct Deposit {
    writes: Vec<Write>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// The host's card vault.
pub struct Vault {
    store: Arc<dyn StateStore>,
    cipher: ChaCha20Poly1305,
    /// Derives an order's token ([`Vault::deposit_for`]): a key of its own,
    /// made from the vault key.
    tokens: Hmac<Sha256>,
    /// Orders whose card is being deposited, each with its turn.
    in_flight: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    writer: std::sync::Mutex<mpsc::Sender<Deposit>>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

fn card_key(token: &str) -> String {
    format!("card/{token}")
}

fn expiry_key(expires_ms: u64, token: &str) -> String {
    format!("expires/{expires_ms:020}/{token}")
}

/// What an entry is bound to: its token and expiry, so that an entry moved
/// under another token or given another expiry does not decrypt.
fn associated(token: &str, expires_ms: u64) -> Vec<u8> {
    [b"shop-vault/v1\0".as_slice(), token.as_bytes(), b"\0", &expires_ms.to_be_bytes()].concat()
}

impl Vault {
    /// Opens the vault in `store` under `key`. The store remembers the
    /// fingerprint of the key it was first opened with: a host with another
    /// key is refused, since it could redeem nothing the others deposited
    /// (and they nothing of its own).
    ///
    /// # Errors
    /// [`VaultError::Unavailable`] when the store cannot be read or written,
    /// or holds another key's fingerprint.
    pub fn open(
        store: Arc<dyn StateStore>,
        key: &VaultKey,
        clock: Arc<dyn Clock>,
        ttl: Duration,
    ) -> Result<Self, VaultError> {
        let fingerprint = key.fingerprint();
        match store.get(KEY_ID)? {
            Some(stored) if stored == fingerprint.as_bytes() => {}
            Some(stored) => {
                return Err(VaultError::Unavailable(format!(
                    "the card vault was created with another key (fingerprint {}, this host's is {fingerprint}): \
                     every host sharing the state store needs the same vault key ({KEY_ENV}, or the same \
                     {KEY_FILE} in each state_dir); with redb, a new state_dir starts an empty vault",
                    String::from_utf8_lossy(&stored)
                )));
            }
            None => {
                let writes = vec![(KEY_ID.to_owned(), Some(fingerprint.into_bytes()))];
                store.commit(Commit { writes, now_ms: clock.now_ms(), ..Commit::default() })?;
            }
        }
        let (sender, receiver) = mpsc::channel();
        let writer = (store.clone(), clock.clone());
        std::thread::Builder::new()
            .name("vault writer".into())
            .spawn(move || write_loop(&*writer.0, &*writer.1, &receiver))
            .map_err(|err| VaultError::Unavailable(format!("cannot start the vault writer: {err}")))?;
        Ok(Self {
            store,
            cipher: ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(key.bytes())),
            tokens: token_key(key.bytes()),
            in_flight: std::sync::Mutex::default(),
            clock,
            ttl,
            writer: std::sync::Mutex::new(sender),
        })
    }

    /// Deposits `number` (digits only) under a random token until the TTL
    /// passes; resolves once the entry is durable in the store. For a card
    /// tied to no order (tests, tools): the gateway's orders use
    /// [`Vault::deposit_for`].
    ///
    /// # Errors
    /// [`VaultError::Unavailable`] when it could not be stored.
    pub async fn deposit(&self, number: &str) -> Result<CardToken, VaultError> {
        self.deposit_as(&format!("tok_{}", uuid::Uuid::new_v4().simple()), number).await
    }

    /// Deposits `number` for the order `order_id`, under a token derived
    /// from the order id with a key of the vault's: a retry of the same
    /// order (the same `Idempotency-Key` and body give the same order id)
    /// gets the same token and keeps the card first deposited for it, so
    /// the `OrderPlaced` it publishes again is the same event, to the byte.
    /// Nobody without the vault key can tell an order's token.
    ///
    /// # Errors
    /// As [`Vault::deposit`], and when the order's entry exists but cannot
    /// be read.
    pub async fn deposit_for(self: &Arc<Self>, order_id: &str, number: &str) -> Result<CardToken, VaultError> {
        let token = self.order_token(order_id);
        // Retries of one order in flight at once take turns here, so that
        // the second finds the first's entry (across gateways, the order
        // service's own idempotency check is what holds).
        let turn =
            self.in_flight.lock().unwrap_or_else(PoisonError::into_inner).entry(token.clone()).or_default().clone();
        let held = turn.lock().await;
        // A store read (a round trip on PostgreSQL): off the async workers.
        let (vault, first) = (self.clone(), token.clone());
        let found = tokio::task::spawn_blocking(move || vault.open_entry(&first))
            .await
            .unwrap_or_else(|err| Err(VaultError::Unavailable(format!("the vault's read failed: {err}"))));
        let result = match found {
            Ok(Some((card, expires_ms))) if self.clock.now_ms() < expires_ms => {
                Ok(CardToken { token: token.clone(), brand: card.brand, last4: card.last4 })
            }
            // Expired: deposited again, with the card first given.
            Ok(Some((card, _))) => self.deposit_as(&token, &card.number).await,
            Ok(None) => self.deposit_as(&token, number).await,
            Err(err) => Err(err),
        };
        drop(held);
        let mut in_flight = self.in_flight.lock().unwrap_or_else(PoisonError::into_inner);
        // Nobody else waits for this order's turn: the map's and ours.
        if Arc::strong_count(&turn) == 2 {
            in_flight.remove(&token);
        }
        result
    }

    /// The token of `order_id`'s card.
    fn order_token(&self, order_id: &str) -> String {
        let digest = self.tokens.clone().chain_update(order_id.as_bytes()).finalize().into_bytes();
        format!("tok_{}", hex::encode(&digest[..16]))
    }

    /// [`Vault::deposit`] under a token of the caller's choosing, replacing
    /// any entry it had: [`Vault::deposit_for`]'s, and tools and benchmarks
    /// that replay recorded events.
    ///
    /// # Errors
    /// As [`Vault::deposit`].
    pub async fn deposit_as(&self, token: &str, number: &str) -> Result<CardToken, VaultError> {
        let token = token.to_owned();
        let expires_ms = self.clock.now_ms().saturating_add(self.ttl.as_millis() as u64);
        let entry = self.seal(&token, expires_ms, number)?;
        let writes = vec![(card_key(&token), Some(entry)), (expiry_key(expires_ms, &token), Some(Vec::new()))];
        let (done, stored) = tokio::sync::oneshot::channel();
        self.writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .send(Deposit { writes, done })
            .map_err(|_| VaultError::Unavailable("the vault writer stopped".into()))?;
        stored.await.map_err(|_| VaultError::Unavailable("the vault writer stopped".into()))??;
        Ok(CardToken {
            token,
            brand: shop_events::card::brand(number).to_owned(),
            last4: shop_events::card::last4(number).to_owned(),
        })
    }

    /// The card `token` stands for.
    ///
    /// # Errors
    /// [`VaultError::Unknown`], [`VaultError::Expired`], or
    /// [`VaultError::Unavailable`] when the store cannot be read or the entry
    /// does not decrypt (another key, or tampered with).
    pub fn redeem(&self, token: &str) -> Result<Card, VaultError> {
        match self.open_entry(token)? {
            None => Err(VaultError::Unknown),
            Some((_, expires_ms)) if self.clock.now_ms() >= expires_ms => Err(VaultError::Expired),
            Some((card, _)) => Ok(card),
        }
    }

    /// The card of `token`'s entry and when it expires, expired or not.
    fn open_entry(&self, token: &str) -> Result<Option<(Card, u64)>, VaultError> {
        let Some(entry) = self.store.get(&card_key(token))? else {
            return Ok(None);
        };
        let corrupt = || VaultError::Unavailable(format!("the vault entry of {token} does not decrypt"));
        let (header, rest) = entry.split_at_checked(9).ok_or_else(corrupt)?;
        let (nonce, sealed) = rest.split_at_checked(12).ok_or_else(corrupt)?;
        if header[0] != VERSION {
            return Err(corrupt());
        }
        let expires_ms = u64::from_be_bytes(header[1..9].try_into().map_err(|_| corrupt())?);
        let aad = associated(token, expires_ms);
        let number =
            self.cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: &aad }).map_err(|_| corrupt())?;
        let number = String::from_utf8(number).map_err(|_| corrupt())?;
        let card = Card {
            brand: shop_events::card::brand(&number).to_owned(),
            last4: shop_events::card::last4(&number).to_owned(),
            number,
        };
        Ok(Some((card, expires_ms)))
    }

    /// `[version][expires_ms][nonce][ciphertext and tag]`.
    fn seal(&self, token: &str, expires_ms: u64, number: &str) -> Result<Vec<u8>, VaultError> {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|err| VaultError::Unavailable(format!("no randomness: {err}")))?;
        let aad = associated(token, expires_ms);
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: number.as_bytes(), aad: &aad })
            .map_err(|_| VaultError::Unavailable("cannot encrypt".into()))?;
        Ok([&[VERSION][..], &expires_ms.to_be_bytes(), &nonce, &sealed].concat())
    }
}

/// The writer thread: each commit takes every deposit waiting, and the
/// expired entries found by a sweep (at most one per [`SWEEP_EVERY`]). Ends
/// when the vault is dropped.
fn write_loop(store: &dyn StateStore, clock: &dyn Clock, deposits: &mpsc::Receiver<Deposit>) {
    let mut last_sweep: Option<Instant> = None;
    loop {
        let mut batch = match deposits.recv_timeout(SWEEP_EVERY) {
            Ok(first) => vec![first],
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        batch.extend(deposits.try_iter());
        // The sweep's deletes come first: a deposit in the same commit
        // (an order's token deposited again after it expired) wins.
        let mut writes: Vec<Write> = Vec::new();
        if last_sweep.is_none_or(|at| at.elapsed() >= SWEEP_EVERY) {
            last_sweep = Some(Instant::now());
            match expired(store, clock.now_ms()) {
                Ok(gone) => writes.extend(gone),
                Err(err) => tracing::warn!("card vault: cannot sweep expired entries: {err}"),
            }
        }
        writes.extend(batch.iter().flat_map(|d| d.writes.iter().cloned()));
        if writes.is_empty() {
            continue;
        }
        let result = store.commit(Commit { writes, now_ms: clock.now_ms(), ..Commit::default() }).map(|_| ());
        if let Err(err) = &result
            && batch.is_empty()
        {
            tracing::warn!("card vault: cannot remove expired entries: {err}");
        }
        for deposit in batch {
            let _ = deposit.done.send(result.clone());
        }
    }
}

/// Deletes of the entries expired at `now_ms` (oldest first, a bounded number).
fn expired(store: &dyn StateStore, now_ms: u64) -> Result<Vec<Write>, StoreError> {
    let mut gone = Vec::new();
    for key in store.keys("expires/", SWEEP_LIMIT)? {
        let Some((at, token)) = key.trim_start_matches("expires/").split_once('/') else { continue };
        match at.parse::<u64>() {
            Ok(at) if at <= now_ms => {
                // Unless the token was deposited again since (an order's
                // token, [`Vault::deposit_for`]): its entry then has a later
                // expiry of its own.
                let entry = store.get(&card_key(token))?;
                let expires = entry.as_deref().and_then(|e| e.get(1..9)).and_then(|b| b.try_into().ok());
                if expires.is_none_or(|b: [u8; 8]| u64::from_be_bytes(b) <= now_ms) {
                    gone.push((card_key(token), None));
                }
                gone.push((key.clone(), None));
            }
            // Keys are in expiry order: the rest expire later.
            Ok(_) => break,
            Err(_) => gone.push((key.clone(), None)),
        }
    }
    Ok(gone)
}

/// The key that derives orders' tokens: the vault key's HMAC of a label of
/// its own, so that it is never the encryption key itself.
fn token_key(key: &[u8]) -> Hmac<Sha256> {
    let mut derive = <Hmac<Sha256> as hmac::Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    derive.update(b"shop-vault/order-token/v1");
    let derived = derive.finalize().into_bytes();
    <Hmac<Sha256> as hmac::Mac>::new_from_slice(&derived).expect("HMAC takes a key of any length")
}

/// The key's fingerprint as stored: a digest under its own label, which
/// tells keys apart without revealing anything of them.
fn fingerprint(key: &[u8; 32]) -> String {
    let digest = Sha256::new().chain_update(b"shop-vault/key-id/v1\0").chain_update(key).finalize();
    hex::encode(&digest[..8])
}

#[cfg(test)]
mod tests;
