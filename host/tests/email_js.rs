//! The email service in two languages: the Rust build (components/email)
//! and the JavaScript one (components/email-js, componentize-js).
//!
//! - `contract_*`: the email service's behaviour, run against both builds
//!   through the host's runtime (`ServiceRuntime` on an in-memory store, a
//!   fixed clock): once per order and kind, the rendering, the routes and
//!   errors; both builds write the same state bytes and emit the same
//!   events for the same input, and each takes over the other's state.
//! - `swapped_between_rust_and_javascript_under_a_stream_of_orders`: on a
//!   real broker, 1,200 orders while the email service is hot-swapped
//!   Rust → JavaScript → Rust → JavaScript (file change, admin upload, file
//!   change); an independent reader finds exactly one `EmailSent` of the
//!   right kind per order, and no copies.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::message::Message as _;
use serde_json::{Value, json};
use sha2::Digest as _;
use shop_events::{EmailKind, EmailRequested, LineItem};
use shop_host::clock::{Clock, ManualClock};
use shop_host::runtime::{
    CALL_THREAD_STACK, CallError, CanaryPolicy, Engine, Event, HandleError, Limits, LoadedComponent, Output, Request,
    Response, ServiceRuntime, ServiceSpec,
};
use shop_host::state::{Commit, MemoryStore, OutboxRecord, StateRead, StateStore, StoreReader, Write};
use support::*;

/// The two builds of the email service.
const BUILDS: [&str; 2] = ["email", "email-js"];
/// The contract tests' clock.
const NOW_MS: u64 = 7;

/// One engine for the contract tests, caching compiled components where the
/// host's tests do (the JavaScript build takes seconds to compile).
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::with_cache(Some(repo().join(".component-cache"))).unwrap())
}

/// Loads a build, one at a time: the first load of a version compiles and
/// caches it, the tests that wait then read it from the cache.
fn load(build: &str) -> LoadedComponent {
    static LOADING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOADING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    LoadedComponent::from_file(engine(), &component(build)).unwrap()
}

/// The email service of one build in the host's runtime, with its state.
struct Email {
    build: String,
    runtime: ServiceRuntime,
    store: Arc<dyn StateStore>,
    tokio: tokio::runtime::Runtime,
    handled: AtomicUsize,
}

impl Email {
    fn new(build: &str, config: &[(&str, &str)]) -> Self {
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::default());
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::at(NOW_MS));
        let runtime = ServiceRuntime::new(
            engine().clone(),
            ServiceSpec {
                name: "email".into(),
                component: load(build),
                store: store.clone(),
                config: config.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                clock,
                limits: Limits { timeout: Duration::from_secs(5), ..Limits::default() },
                canary: CanaryPolicy::default(),
                grants: Default::default(),
            },
        );
        // Queries and reloads run on its blocking threads, which call guests.
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_stack_size(CALL_THREAD_STACK)
            .enable_all()
            .build()
            .unwrap();
        Self { build: build.to_owned(), runtime, store, tokio, handled: AtomicUsize::new(0) }
    }

    /// Handles `event` and commits what it wrote, as the pipeline does;
    /// returns the events it emitted and its state writes.
    fn handle(&self, event: &Event) -> Result<(Vec<OutboxRecord>, Vec<Write>), CallError> {
        let view: Arc<dyn StateRead> = Arc::new(StoreReader(self.store.clone()));
        let called = self.runtime.call(event, view)?;
        let records: Vec<OutboxRecord> = called.outputs.into_iter().map(Output::bare_record).collect();
        let n = self.handled.fetch_add(1, Ordering::SeqCst);
        let commit = Commit {
            writes: called.writes.clone(),
            timers: called.timers,
            handled: Some(format!("{}-{n}", event.id)),
            outbox: records.clone(),
            now_ms: NOW_MS,
            ..Commit::default()
        };
        self.store.commit(commit).unwrap().wait_blocking().unwrap();
        Ok((records, called.writes))
    }

    fn query(&self, path_and_query: &str) -> Response {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let request = Request { method: "GET".into(), path: path.into(), query: query.into(), body: Vec::new() };
        self.tokio.block_on(self.runtime.query(&request)).unwrap()
    }

    fn emails(&self, order_id: &str) -> Vec<Value> {
        let response = self.query(&format!("/emails?order={order_id}"));
        assert_eq!((response.status, response.content_type.as_str()), (200, "application/json"), "{}", self.build);
        serde_json::from_slice(&response.body).unwrap()
    }

    /// Swaps in the other build, keeping the state.
    fn swap_to(&mut self, build: &str) {
        let bytes = std::fs::read(component(build)).unwrap();
        // Compiled once by `load` (cached), not by every test that swaps.
        drop(load(build));
        self.tokio.block_on(self.runtime.reload(build, bytes)).unwrap();
        self.build = build.to_owned();
    }
}

fn request(id: &str, order_id: &str, kind: EmailKind, reason: Option<&str>) -> Event {
    let payload = EmailRequested {
        order_id: order_id.into(),
        kind,
        to: "ada@example.com".into(),
        customer_name: "Ada".into(),
        items: vec![LineItem { sku: "book".into(), quantity: 2, unit_price_cents: 1250 }],
        total_cents: 2500,
        reason: reason.map(str::to_owned),
    };
    event(id, "EmailRequested", order_id, serde_json::to_vec(&payload).unwrap())
}

fn event(id: &str, event_type: &str, key: &str, payload: Vec<u8>) -> Event {
    Event {
        id: id.into(),
        event_type: event_type.into(),
        topic: "emails".into(),
        key: Some(key.into()),
        headers: Vec::new(),
        payload,
        timestamp_ms: NOW_MS,
    }
}

/// Runs `test` on a thread with the stack of the host's guest-calling
/// threads, once per build.
fn for_each_build(test: impl Fn(&str) + Send + Sync + 'static) {
    let test = Arc::new(test);
    for build in BUILDS {
        let test = test.clone();
        std::thread::Builder::new()
            .name(format!("contract-{build}"))
            .stack_size(CALL_THREAD_STACK)
            .spawn(move || test(build))
            .unwrap()
            .join()
            .unwrap_or_else(|_| panic!("the contract failed for the {build} build"));
    }
}

#[test]
fn contract_sends_once_per_order_and_kind_and_is_queryable() {
    for_each_build(|build| {
        let email = Email::new(build, &[("from", "Test <t@example.com>")]);
        let (out, writes) = email.handle(&request("e1", "o1", EmailKind::OrderConfirmed, None)).unwrap();
        assert_eq!(out.len(), 1, "{build}: {out:?}");
        assert_eq!((out[0].topic.as_str(), out[0].key.as_str()), ("analytics", "o1"), "{build}");
        assert_eq!(out[0].headers, [("ce_type".to_owned(), "EmailSent".to_owned())], "{build}");
        let sent: Value = serde_json::from_str(&out[0].value).unwrap();
        assert_eq!(
            sent,
            json!({"order_id": "o1", "email_id": "o1-order_confirmed", "kind": "order_confirmed",
                   "to": "ada@example.com", "subject": "Your order o1 is confirmed"}),
            "{build}"
        );
        let keys: Vec<&str> = writes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["email/o1/order_confirmed"], "{build}");
        // The same request again (another event id: the host's dedup does
        // not see it as a redelivery): nothing sent, nothing written.
        let (out, writes) = email.handle(&request("e2", "o1", EmailKind::OrderConfirmed, None)).unwrap();
        assert!(out.is_empty() && writes.is_empty(), "{build}: {out:?} {writes:?}");
        let emails = email.emails("o1");
        assert_eq!(emails.len(), 1, "{build}: {emails:?}");
        assert_eq!(emails[0]["from"], "Test <t@example.com>", "{build}");
        assert_eq!(emails[0]["sent_at_ms"], NOW_MS, "{build}");
        assert_eq!(emails[0]["email_id"], "o1-order_confirmed", "{build}");
        // Another kind of the same order is a second email.
        let (out, _) = email.handle(&request("e3", "o1", EmailKind::OrderRejected, Some("no funds"))).unwrap();
        assert_eq!(out.len(), 1, "{build}");
        let kinds: Vec<Value> = email.emails("o1").iter().map(|e| e["kind"].clone()).collect();
        assert_eq!(kinds, [json!("order_confirmed"), json!("order_rejected")], "{build}");
        assert_eq!(email.emails("o2"), Vec::<Value>::new(), "{build}");
    });
}

#[test]
fn contract_renders_each_kind() {
    for_each_build(|build| {
        let email = Email::new(build, &[]);
        let order = "0123456789";
        let items = vec![
            LineItem { sku: "pen".into(), quantity: 3, unit_price_cents: 105 },
            LineItem { sku: "lamp".into(), quantity: 1, unit_price_cents: 4_000 },
        ];
        let payload_of = |order: &str, kind, reason: Option<&str>| {
            let req = EmailRequested {
                order_id: order.into(),
                kind,
                to: "a@b.c".into(),
                customer_name: "Ada Lovelace".into(),
                items: items.clone(),
                total_cents: 4_315,
                reason: reason.map(str::to_owned),
            };
            serde_json::to_vec(&req).unwrap()
        };
        let payload = |kind, reason| payload_of(order, kind, reason);
        let cases = [
            (
                EmailKind::OrderConfirmed,
                None,
                "Your order 01234567 is confirmed",
                "Hello Ada Lovelace,\n\nThank you for your order 0123456789. Your payment was accepted.\n\n  3 x pen @ 1.05 = 3.15\n  1 x lamp @ 40.00 = 40.00\n  Total: 43.15\n\nThe Shop\n",
            ),
            (
                EmailKind::OrderRejected,
                Some("the card was declined"),
                "Your order 01234567 could not be completed",
                "Hello Ada Lovelace,\n\nWe could not complete your order 0123456789: the card was declined.\nYou have not been charged.\n\nThe Shop\n",
            ),
            (
                EmailKind::OrderCancelled,
                Some("out of stock: lamp"),
                "Your order 01234567 was cancelled",
                "Hello Ada Lovelace,\n\nWe cancelled your order 0123456789: out of stock: lamp.\nYour payment has been refunded.\n\nThe Shop\n",
            ),
        ];
        for (i, (kind, reason, subject, body)) in cases.into_iter().enumerate() {
            email.handle(&event(&format!("e{i}"), "EmailRequested", order, payload(kind, reason))).unwrap();
            let emails = email.emails(order);
            let kind = serde_json::to_value(kind).unwrap();
            let sent = emails.iter().find(|e| e["kind"] == kind).unwrap_or_else(|| panic!("{build}: {emails:?}"));
            assert_eq!((sent["subject"].as_str(), sent["body"].as_str()), (Some(subject), Some(body)), "{build}");
            assert_eq!(sent["from"], "Shop <orders@shop.example>", "{build}: the default sender");
        }
        // A cancellation without a reason, and one whose payment timed out.
        email.handle(&event("e9", "EmailRequested", "o2", payload_of("o2", EmailKind::OrderCancelled, None))).unwrap();
        let body = email.emails("o2")[0]["body"].as_str().unwrap().to_owned();
        assert!(body.contains("order o2: it could not be completed.\nYou have not been charged."), "{build}: {body}");
        let late = payload_of("o3", EmailKind::OrderCancelled, Some("no answer from payment within 30000 ms"));
        email.handle(&event("e10", "EmailRequested", "o3", late)).unwrap();
        let body = email.emails("o3")[0]["body"].as_str().unwrap().to_owned();
        assert!(body.contains("30000 ms.\nYou have not been charged."), "{build}: {body}");
    });
}

#[test]
fn contract_routes_and_errors() {
    for_each_build(|build| {
        let email = Email::new(build, &[]);
        let error = |path: &str| {
            let response = email.query(path);
            let body: Value = serde_json::from_slice(&response.body).unwrap();
            (response.status, body["error"]["code"].as_str().unwrap_or_default().to_owned())
        };
        assert_eq!(error("/emails"), (400, "missing_order".into()), "{build}");
        assert_eq!(error("/emails?order="), (400, "missing_order".into()), "{build}");
        assert_eq!(error("/nope"), (404, "not_found".into()), "{build}");
        assert_eq!(error("/emails/o1"), (404, "not_found".into()), "{build}");
        let none = email.query("/emails?order=none");
        assert_eq!((none.status, none.body.as_slice()), (200, b"[]".as_slice()), "{build}");
        // Percent-decoded order ids.
        email.handle(&request("e1", "a b/c", EmailKind::OrderConfirmed, None)).unwrap();
        assert_eq!(email.emails("a%20b%2Fc").len(), 1, "{build}");
        assert_eq!(email.emails("a+b%2fc").len(), 1, "{build}");
        // Other event types are ignored; a malformed request is permanent.
        let (out, writes) = email.handle(&event("e2", "OrderConfirmed", "o1", b"{}".to_vec())).unwrap();
        assert!(out.is_empty() && writes.is_empty(), "{build}");
        for bad in [&b"{"[..], b"{\"order_id\":\"o1\"}", b"{\"order_id\":\"o1\",\"kind\":\"order_lost\",\"to\":\"\",\"customer_name\":\"\",\"items\":[],\"total_cents\":0}", b"\xff"] {
            match email.handle(&event("e3", "EmailRequested", "o1", bad.to_vec())) {
                Err(CallError::Handle(HandleError::Permanent(msg))) => {
                    assert!(msg.contains("malformed EmailRequested payload in event e3"), "{build}: {msg}")
                }
                other => panic!("{build}: {:?} gave {other:?}", String::from_utf8_lossy(bad)),
            }
        }
        assert_eq!(email.emails("o1"), Vec::<Value>::new(), "{build}");
    });
}

/// Both builds, given the same requests, write the same bytes under the
/// same keys and emit the same events: either can read the other's state.
#[test]
fn contract_both_builds_write_the_same_bytes() {
    let outputs: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let collected = outputs.clone();
    for_each_build(move |build| {
        let email = Email::new(build, &[("from", "Ünïcode \"Shop\" <o@shop.example>")]);
        let mut seen = Vec::new();
        let reasons = [None, Some("card \"declined\"\n\t\u{1}"), Some("out of stock: lamp; refund")];
        for (i, kind) in
            [EmailKind::OrderConfirmed, EmailKind::OrderRejected, EmailKind::OrderCancelled].into_iter().enumerate()
        {
            let order = format!("😀ö-{i}-ördér-long-id");
            let (out, writes) = email.handle(&request(&format!("e{i}"), &order, kind, reasons[i])).unwrap();
            seen.extend(out.iter().map(|r| format!("{} {} {}", r.topic, r.key, r.value)));
            seen.extend(
                writes.iter().map(|(k, v)| format!("{k} = {}", String::from_utf8_lossy(v.as_deref().unwrap()))),
            );
            let query = email.query(&format!("/emails?order={order}"));
            seen.push(String::from_utf8_lossy(&query.body).into_owned());
        }
        collected.lock().unwrap().insert(build.to_owned(), seen);
    });
    let outputs = outputs.lock().unwrap();
    assert_eq!(outputs["email"], outputs["email-js"]);
}

/// One service, swapped between the builds by the runtime's reload: each
/// build reads what the other wrote, and sends nothing the other sent.
#[test]
fn contract_each_build_takes_over_the_others_state() {
    std::thread::Builder::new()
        .stack_size(CALL_THREAD_STACK)
        .spawn(|| {
            let mut email = Email::new("email", &[]);
            email.handle(&request("e1", "o1", EmailKind::OrderConfirmed, None)).unwrap();
            email.swap_to("email-js");
            assert_eq!(email.emails("o1").len(), 1, "JavaScript reads what Rust wrote");
            let (out, _) = email.handle(&request("e2", "o1", EmailKind::OrderConfirmed, None)).unwrap();
            assert!(out.is_empty(), "JavaScript does not send again what Rust sent: {out:?}");
            let (out, _) = email.handle(&request("e3", "o2", EmailKind::OrderRejected, None)).unwrap();
            assert_eq!(out.len(), 1);
            email.swap_to("email");
            assert_eq!(email.emails("o2").len(), 1, "Rust reads what JavaScript wrote");
            let (out, _) = email.handle(&request("e4", "o2", EmailKind::OrderRejected, None)).unwrap();
            assert!(out.is_empty(), "Rust does not send again what JavaScript sent: {out:?}");
            assert_eq!(email.emails("o1")[0]["kind"], "order_confirmed");
        })
        .unwrap()
        .join()
        .unwrap();
}

const ORDERS: usize = 1_200;
/// The swaps start after 300, 600 and 900 orders were placed.
const SEGMENT: usize = 300;
/// How far the stream may run ahead of a swap still compiling.
const AHEAD: usize = 100;

fn sha(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn replace_file(path: &Path, from: &Path) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// What order `i` of the stream is, and the email it must get.
fn order_body(i: usize) -> (Value, &'static str) {
    let (card, sku, kind) = match i % 5 {
        1 => ("4000 0000 0000 0002", "pen", "order_rejected"),
        // `sold-out` has no stock (test manifests): paid, refunded, cancelled.
        2 => ("4242 4242 4242 4242", "sold-out", "order_cancelled"),
        _ => ("4242 4242 4242 4242", "pen", "order_confirmed"),
    };
    let body = json!({
        "customer": { "name": format!("Swap {i}"), "email": "swap@example.com" },
        "items": [ { "sku": sku, "quantity": 1 } ],
        "payment": { "card_number": card }
    });
    (body, kind)
}

async fn email_version(client: &reqwest::Client, port: u16) -> Option<String> {
    let health = get_json(client, &format!("http://127.0.0.1:{port}/health")).await?;
    health["version"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_between_rust_and_javascript_under_a_stream_of_orders() {
    let brokers = brokers();
    let dir = temp_dir("email-js-swap");
    let ports = Ports::free();
    let (manifest, prefix) = write_manifest(&dir, ports);
    // The email service runs from a file of its own, which the test changes.
    let live = dir.join("email.wasm");
    let (rust, js) = (component("email"), component("email-js"));
    std::fs::copy(&rust, &live).unwrap();
    let text =
        std::fs::read_to_string(&manifest).unwrap().replace(&rust.display().to_string(), &live.display().to_string());
    std::fs::write(&manifest, text).unwrap();
    let (rust_sha, js_sha) = (sha(&rust), sha(&js));

    let host = HostProcess::start(&manifest, Some(&brokers));
    let client = reqwest::Client::new();
    let gateway = format!("http://127.0.0.1:{}", ports.gateway);
    let admin = format!("http://127.0.0.1:{}", ports.admin);
    wait_host_healthy(&client, ports, &host).await;
    assert_eq!(email_version(&client, ports.email).await, Some(rust_sha.clone()));

    // The stream: two workers, paced, never more than AHEAD orders past a
    // swap that has not finished (so every swap happens while orders flow).
    let placed = Arc::new(AtomicUsize::new(0));
    let swaps_done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (client, gateway) = (client.clone(), gateway.clone());
            let (placed, swaps_done, next) = (placed.clone(), swaps_done.clone(), next.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= ORDERS {
                        return mine;
                    }
                    let gate = i.saturating_sub(AHEAD) / SEGMENT;
                    while swaps_done.load(Ordering::SeqCst) < gate.min(3) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let (body, kind) = order_body(i);
                    let accepted = place_until_accepted(&client, &gateway, &format!("swap-{i}"), &body).await;
                    mine.push((accepted["order_id"].as_str().unwrap().to_owned(), kind));
                    placed.fetch_add(1, Ordering::SeqCst);
                    // Pacing, so that the stream lasts across the swaps.
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        })
        .collect();

    let started = Instant::now();
    let mut schedule = vec![rust_sha.clone()];
    let mut swap_times = Vec::new();
    for swap in 0..3 {
        let at = (swap + 1) * SEGMENT;
        eventually(Duration::from_secs(120), &format!("{at} orders placed"), || async {
            (placed.load(Ordering::SeqCst) >= at).then_some(())
        })
        .await;
        let swap_started = Instant::now();
        let target = match swap {
            // Rust -> JavaScript: the file named in the manifest changes.
            0 => {
                replace_file(&live, &js);
                &js_sha
            }
            // JavaScript -> Rust: new bytes through the admin API.
            1 => {
                let response = client
                    .post(format!("{admin}/components/email/reload"))
                    .bearer_auth(ADMIN_TOKEN)
                    .body(std::fs::read(&rust).unwrap())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
                &rust_sha
            }
            // Rust -> JavaScript: the admin API re-reads the manifest's file.
            _ => {
                let response = client
                    .post(format!("{admin}/components/email/reload"))
                    .bearer_auth(ADMIN_TOKEN)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
                &js_sha
            }
        };
        // The first load of the JavaScript build may compile it (seconds).
        eventually(Duration::from_secs(120), &format!("swap {swap} to be served"), || async {
            (email_version(&client, ports.email).await.as_ref() == Some(target)).then_some(())
        })
        .await;
        swap_times.push(swap_started.elapsed());
        schedule.push(target.clone());
        assert!(placed.load(Ordering::SeqCst) < ORDERS, "the stream ended before swap {swap} was served");
        swaps_done.fetch_add(1, Ordering::SeqCst);
    }
    let mut orders: HashMap<String, &str> = HashMap::new();
    for worker in workers {
        orders.extend(worker.await.unwrap());
    }
    assert_eq!(orders.len(), ORDERS);
    let streamed = started.elapsed();

    // Analytics counts every EmailSent; wait for all of them.
    let stats_url = format!("http://127.0.0.1:{}/stats", ports.analytics);
    let stats = eventually(Duration::from_secs(120), "every email to be reported", || async {
        let stats = get_json(&client, &stats_url).await?;
        (stats["emails_sent"].as_u64()? >= ORDERS as u64).then_some(stats)
    })
    .await;

    // An independent reader of the analytics topic: exactly one EmailSent
    // per order, of the kind its outcome asks for, and no copies.
    let consumer = reader(&brokers, &[&format!("{prefix}analytics")]);
    let mut sent: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut by_version: HashMap<String, usize> = HashMap::new();
    let mut runs: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    let (mut records, mut idle) = (0, 0);
    while idle < 12 {
        let Some(message) = consumer.poll(Duration::from_millis(250)) else {
            if records >= ORDERS {
                idle += 1;
            }
            continue;
        };
        idle = 0;
        let message = message.unwrap();
        let envelope = event_json(&headers_of(&message), message.payload().unwrap()).expect("a CloudEvent");
        if envelope["type"] != "EmailSent" {
            continue;
        }
        records += 1;
        let version = envelope["producer"].as_str().unwrap().strip_prefix("email@").unwrap().to_owned();
        assert!(version == rust_sha || version == js_sha, "EmailSent from an unexpected version {version}");
        *by_version.entry(version.clone()).or_default() += 1;
        let run = runs.entry(message.partition()).or_default();
        if run.last() != Some(&version) {
            run.push(version);
        }
        let order_id = envelope["order_id"].as_str().unwrap().to_owned();
        let kind = envelope["data"]["kind"].as_str().unwrap().to_owned();
        sent.entry((order_id, kind)).or_default().push(envelope["id"].as_str().unwrap().to_owned());
    }
    let copies: Vec<_> = sent.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(copies.is_empty(), "EmailSent more than once: {copies:?}");
    for (order_id, kind) in &orders {
        assert!(sent.contains_key(&(order_id.clone(), (*kind).to_owned())), "order {order_id}: no {kind} email");
    }
    assert_eq!(sent.len(), ORDERS, "emails of orders not placed, or of the wrong kind");
    assert_eq!(records, ORDERS, "records on the topic");
    assert_eq!(stats["emails_sent"], ORDERS, "{stats}");
    // In each partition the versions take turns as the swaps happened.
    for (partition, versions) in &runs {
        assert_eq!(versions, &schedule, "partition {partition}: the versions that sent, in order");
    }

    // The JavaScript build serves every order's emails now, those the Rust
    // build recorded too: one, of the right kind.
    let mut checked = 0;
    for (order_id, kind) in &orders {
        let emails = eventually(Duration::from_secs(10), "the email query", || async {
            get_json(&client, &format!("http://127.0.0.1:{}/emails?order={order_id}", ports.email)).await
        })
        .await;
        let emails = emails.as_array().unwrap();
        assert_eq!(emails.len(), 1, "order {order_id}: {emails:?}");
        assert_eq!(emails[0]["kind"], *kind, "order {order_id}");
        checked += 1;
    }
    eprintln!(
        "EMAIL-JS SWAP FIGURES: {ORDERS} orders streamed in {streamed:.1?}; swaps (file, admin upload, admin re-read) \
         served after {swap_times:?}; EmailSent by Rust {} / JavaScript {}; {checked} orders queried",
        by_version.get(&rust_sha).copied().unwrap_or(0),
        by_version.get(&js_sha).copied().unwrap_or(0),
    );
    drop(host);
}
