//! The vault on the in-memory store and on redb: round trip, expiry and
//! sweep, binding to the token, the key's checks, group commit.

use std::os::unix::fs::PermissionsExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::clock::ManualClock;
use crate::state::{MemoryStore, ReadSet};

const CARD: &str = "4242424242424242";

fn vault_on(store: Arc<dyn StateStore>, clock: Arc<ManualClock>, key: &VaultKey) -> Vault {
    Vault::open(store, key, clock, Duration::from_secs(60)).unwrap()
}

fn key(byte: u8) -> VaultKey {
    VaultKey::from_bytes([byte; 32])
}

#[tokio::test]
async fn a_deposited_card_is_redeemed_and_stored_encrypted() {
    let store = Arc::new(MemoryStore::default());
    let vault = vault_on(store.clone(), Arc::new(ManualClock::at(1_000)), &key(7));
    let token = vault.deposit(CARD).await.unwrap();
    assert!(token.token.starts_with("tok_") && token.token.len() > 30, "{}", token.token);
    assert_eq!((token.brand.as_str(), token.last4.as_str()), ("visa", "4242"));
    let card = vault.redeem(&token.token).unwrap();
    assert_eq!((card.number.as_str(), card.brand.as_str(), card.last4.as_str()), (CARD, "visa", "4242"));
    assert!(!format!("{card:?}").contains(CARD), "Debug hides the number");
    assert_eq!(vault.redeem("tok_nope"), Err(VaultError::Unknown));
    let other = vault.deposit(CARD).await.unwrap();
    assert_ne!(token.token, other.token, "a token per deposit");
    for key in store.keys("", 100).unwrap() {
        let value = store.get(&key).unwrap().unwrap();
        let text = String::from_utf8_lossy(&value);
        assert!(!key.contains(CARD) && !text.contains(CARD) && !text.contains("4242 4242"), "{key}: {text}");
    }
}

#[tokio::test]
async fn entries_expire_and_are_swept() {
    let store = Arc::new(MemoryStore::default());
    let clock = Arc::new(ManualClock::at(1_000));
    let vault = vault_on(store.clone(), clock.clone(), &key(7));
    let token = vault.deposit(CARD).await.unwrap().token;
    clock.set(1_000 + 59_999);
    assert!(vault.redeem(&token).is_ok(), "still valid just before its TTL");
    clock.set(1_000 + 60_000);
    assert_eq!(vault.redeem(&token), Err(VaultError::Expired));
    // The writer sweeps about once a second, deposits or not.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.get(&card_key(&token)).unwrap().is_some() {
        assert!(Instant::now() < deadline, "not swept");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vault.redeem(&token), Err(VaultError::Unknown));
    assert!(store.keys("expires/", 10).unwrap().is_empty());
}

#[tokio::test]
async fn an_entry_moved_to_another_token_does_not_decrypt() {
    let store = Arc::new(MemoryStore::default());
    let vault = vault_on(store.clone(), Arc::new(ManualClock::at(1_000)), &key(7));
    let token = vault.deposit(CARD).await.unwrap().token;
    let entry = store.get(&card_key(&token)).unwrap();
    store.commit(Commit { writes: vec![(card_key("tok_moved"), entry)], ..Commit::default() }).unwrap();
    assert!(matches!(vault.redeem("tok_moved"), Err(VaultError::Unavailable(why)) if why.contains("decrypt")));
}

#[tokio::test]
async fn a_host_with_another_key_is_refused_by_the_store() {
    let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
    let clock = Arc::new(ManualClock::at(1_000));
    let first = vault_on(store.clone(), clock.clone(), &key(1));
    let token = first.deposit(CARD).await.unwrap().token;
    let err = Vault::open(store.clone(), &key(2), clock.clone(), DEFAULT_TTL).unwrap_err();
    assert!(err.to_string().contains("another key") && err.to_string().contains(KEY_ENV), "{err}");
    // The same key on another host: it redeems what the first deposited.
    let second = vault_on(store, clock, &key(1));
    assert_eq!(second.redeem(&token).unwrap().number, CARD);
}

/// A store whose commits take a while, counting them.
struct SlowStore {
    inner: MemoryStore,
    commits: AtomicUsize,
}

impl StateStore for SlowStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn keys(&self, prefix: &str, limit: usize) -> Result<Vec<String>, StoreError> {
        self.inner.keys(prefix, limit)
    }
    fn commit_batch(&self, commits: &[Commit], reads: &ReadSet) -> Result<crate::state::Durable, StoreError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        self.inner.commit_batch(commits, reads)
    }
    fn sync_point(&self) -> crate::state::Durable {
        self.inner.sync_point()
    }
    fn was_handled(&self, id: &str) -> Result<bool, StoreError> {
        self.inner.was_handled(id)
    }
    fn outbox(&self, source: &str) -> Result<Option<crate::state::OutboxEntry>, StoreError> {
        self.inner.outbox(source)
    }
    fn pending_outbox(&self, limit: usize) -> Result<Vec<crate::state::OutboxEntry>, StoreError> {
        self.inner.pending_outbox(limit)
    }
    fn clear_outbox(&self, source: &str) -> Result<(), StoreError> {
        self.inner.clear_outbox(source)
    }
    fn timer(&self, id: &str) -> Result<Option<crate::state::Timer>, StoreError> {
        self.inner.timer(id)
    }
    fn due_timers(&self, now_ms: u64, limit: usize) -> Result<Vec<crate::state::Timer>, StoreError> {
        self.inner.due_timers(now_ms, limit)
    }
    fn timer_count(&self) -> Result<u64, StoreError> {
        self.inner.timer_count()
    }
    fn outbox_count(&self) -> Result<u64, StoreError> {
        self.inner.outbox_count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deposits_share_commits() {
    let store = Arc::new(SlowStore { inner: MemoryStore::default(), commits: AtomicUsize::new(0) });
    let vault = Arc::new(vault_on(store.clone(), Arc::new(ManualClock::at(1_000)), &key(7)));
    let before = store.commits.load(Ordering::SeqCst);
    let deposits: Vec<_> = (0..50)
        .map(|_| {
            let vault = vault.clone();
            tokio::spawn(async move { vault.deposit(CARD).await.unwrap().token })
        })
        .collect();
    let mut tokens = Vec::new();
    for deposit in deposits {
        tokens.push(deposit.await.unwrap());
    }
    let commits = store.commits.load(Ordering::SeqCst) - before;
    assert!(commits < 25, "50 deposits took {commits} commits");
    assert!(tokens.iter().all(|t| vault.redeem(t).is_ok()), "every one durable once answered");
}

#[tokio::test]
async fn on_redb_the_file_holds_no_card_number() {
    let dir = std::env::temp_dir().join(format!("vault-redb-{}", uuid::Uuid::new_v4().simple()));
    let path = dir.join(format!("{VAULT_STORE}.redb"));
    let store = Arc::new(crate::state::DurableStore::open(&path).unwrap());
    let vault = vault_on(store, Arc::new(ManualClock::at(1_000)), &key(7));
    let mut tokens = Vec::new();
    for _ in 0..20 {
        tokens.push(vault.deposit(CARD).await.unwrap().token);
    }
    assert_eq!(vault.redeem(&tokens[0]).unwrap().number, CARD);
    drop(vault);
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(CARD.len()).any(|w| w == CARD.as_bytes()), "the number is in the redb file");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_key_file_is_created_private_and_checked() {
    let dir = std::env::temp_dir().join(format!("vault-key-{}", uuid::Uuid::new_v4().simple()));
    // The test process must not see a key in its environment.
    assert!(std::env::var(KEY_ENV).is_err(), "unset {KEY_ENV} to run this test");
    let created = VaultKey::load(&dir).unwrap();
    let path = dir.join(KEY_FILE);
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(VaultKey::load(&dir).unwrap(), created, "the same key on the next start");
    assert!(!format!("{created:?}").contains(&hex::encode(created.bytes())), "Debug shows no key");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = VaultKey::load(&dir).unwrap_err().to_string();
    assert!(err.contains("mode 644") && err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, "not hex").unwrap();
    let err = format!("{:#}", VaultKey::load(&dir).unwrap_err());
    assert!(err.contains("64 hex digits") && !err.contains("not hex"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
    assert_eq!(VaultKey::from_hex(&"ab".repeat(32)).unwrap(), VaultKey::from_bytes([0xab; 32]));
    assert!(VaultKey::from_hex("abcd").is_err());
}

/// A retried order gets its first token and card again: the OrderPlaced it
/// publishes again is the same event. Another order, or another vault key,
/// gets another token; an order deposited again after its entry expired is
/// not swept by the old entry's expiry.
#[tokio::test]
async fn an_order_keeps_one_token_across_retries() {
    let store = Arc::new(MemoryStore::default());
    let clock = Arc::new(ManualClock::at(1_000));
    let vault = Arc::new(vault_on(store.clone(), clock.clone(), &key(7)));
    let first = vault.deposit_for("order-1", CARD).await.unwrap();
    let retried = vault.deposit_for("order-1", "4000000000000002").await.unwrap();
    assert_eq!(retried, first, "the same token, brand and last four");
    assert_eq!(vault.redeem(&first.token).unwrap().number, CARD, "the first card stays");
    assert_ne!(vault.deposit_for("order-2", CARD).await.unwrap().token, first.token);
    let elsewhere = Arc::new(vault_on(Arc::new(MemoryStore::default()), clock.clone(), &key(8)));
    assert_ne!(elsewhere.deposit_for("order-1", CARD).await.unwrap().token, first.token, "keyed");

    clock.set(1_000 + 60_000);
    assert_eq!(vault.redeem(&first.token), Err(VaultError::Expired));
    let again = vault.deposit_for("order-1", "4000000000000002").await.unwrap();
    assert_eq!(again, first, "deposited again with the card first given");
    // The old entry's expiry key is swept; the new entry stays.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.keys("expires/", 10).unwrap().len() > 1 {
        assert!(Instant::now() < deadline, "the old expiry was not swept");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(vault.redeem(&again.token).unwrap().number, CARD);
}

/// Two retries of one order at once: both get the same token and the same
/// card, whichever came first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_of_one_order_at_once_agree_on_its_card() {
    for round in 0..20 {
        let vault = Arc::new(vault_on(Arc::new(MemoryStore::default()), Arc::new(ManualClock::at(1_000)), &key(7)));
        let order = format!("order-{round}");
        let (a, b) = tokio::join!(vault.deposit_for(&order, CARD), vault.deposit_for(&order, "5555555555554444"));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a, b, "round {round}");
        assert_eq!(vault.redeem(&a.token).unwrap().last4, a.last4);
        assert!(vault.in_flight.lock().unwrap().is_empty(), "turns are forgotten");
    }
}
