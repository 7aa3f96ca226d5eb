use std::sync::Arc;

use super::*;

fn store_with(pairs: &[(&str, &str)]) -> Arc<dyn StateStore> {
    Arc::new(MemoryStore::with(pairs))
}

#[test]
fn txn_reads_its_own_writes_and_commits_nothing_until_asked() {
    let store = store_with(&[("a", "1"), ("b", "2")]);
    let mut txn = Txn::new(Arc::new(StoreReader(store.clone())));
    txn.put("a", Some(b"9".to_vec())).unwrap();
    txn.put("b", None).unwrap();
    txn.put("c", Some(b"3".to_vec())).unwrap();
    assert_eq!(txn.get("a").unwrap(), Some(b"9".to_vec()));
    assert_eq!(txn.get("b").unwrap(), None);
    assert_eq!(txn.keys("", 10).unwrap(), ["a", "c"]);
    assert_eq!(store.get("a").unwrap(), Some(b"1".to_vec()), "uncommitted writes are invisible");
    let (writes, _) = txn.take_changes();
    store.commit(Commit { writes, ..Commit::default() }).unwrap();
    assert_eq!(store.keys("", 10).unwrap(), ["a", "c"]);
}

#[test]
fn deletes_do_not_starve_listing() {
    let store = store_with(&[("k1", "1"), ("k2", "2"), ("k3", "3")]);
    let mut txn = Txn::new(Arc::new(StoreReader(store)));
    txn.put("k1", None).unwrap();
    assert_eq!(txn.keys("k", 2).unwrap(), ["k2", "k3"]);
}

#[test]
fn read_only_and_oversized_writes_are_refused() {
    let store = store_with(&[]);
    let mut ro = Txn::read_only(Arc::new(StoreReader(store.clone())));
    assert!(matches!(ro.put("a", None), Err(AccessError::Invalid(m)) if m.contains("read-only")));
    let mut txn = Txn::new(Arc::new(StoreReader(store)));
    assert!(matches!(txn.put("", None), Err(AccessError::Invalid(_))));
    assert!(matches!(txn.put("a", Some(vec![0; MAX_VALUE_BYTES + 1])), Err(AccessError::Invalid(_))));
}
