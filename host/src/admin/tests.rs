use axum::body::Body;
use axum::http::Request;
use sha2::{Digest as _, Sha256};
use tower::ServiceExt as _;

use super::*;
use crate::runtime::tests::{event, runtime, wasm};

const TOKEN: &str = "0123456789abcdef-token";

fn app_with(service: Arc<ServiceRuntime>) -> Router {
    let managed = Managed { service, wasm: wasm("misbehave") };
    admin_app(BTreeMap::from([("svc".to_owned(), managed)]), TOKEN, None)
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = app.clone().oneshot(request.body(Body::from(body)).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn requests_without_the_token_are_refused() {
    let app = app_with(Arc::new(runtime("misbehave", 1000)));
    let order = std::fs::read(wasm("order")).unwrap();
    for token in [None, Some("wrong"), Some("0123456789abcdef-toke")] {
        assert_eq!(call(&app, "GET", "/components", token, vec![]).await.0, StatusCode::UNAUTHORIZED);
        let (status, _) = call(&app, "POST", "/components/svc/reload", token, order.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
}

#[tokio::test]
async fn the_token_is_checked_before_any_of_the_body_is_read() {
    let app = app_with(Arc::new(runtime("misbehave", 1000)));
    // A body that never arrives: reading it first would hang.
    let endless = Body::from_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>());
    let request = Request::builder()
        .method("POST")
        .uri("/components/svc/reload")
        .header("authorization", "Bearer wrong")
        .header("content-length", "60000000")
        .body(endless)
        .unwrap();
    let answered = tokio::time::timeout(std::time::Duration::from_secs(5), app.oneshot(request)).await;
    assert_eq!(answered.expect("answered without reading the body").unwrap().status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_reload_swaps_versions_and_keeps_state() {
    let service = Arc::new(runtime("misbehave", 1000));
    let app = app_with(service.clone());
    crate::runtime::tests::handle(&service, &event("Echo", "kept")).await.unwrap();
    let misbehave = std::fs::read(wasm("misbehave")).unwrap();
    let order = std::fs::read(wasm("order")).unwrap();

    let (status, body) = call(&app, "POST", "/components/svc/reload", Some(TOKEN), order.clone()).await;
    assert_eq!((status, body["version"].as_str()), (StatusCode::OK, Some(sha(&order).as_str())), "{body}");
    assert_eq!(service.current().sha256, sha(&order));
    // The order service ignores this event type: the new version is serving.
    let handled = crate::runtime::tests::handle(&service, &event("Echo", "x")).await.unwrap();
    assert!(crate::runtime::tests::emitted(&handled).is_empty());

    // An empty body reloads the manifest's file.
    let (status, body) = call(&app, "POST", "/components/svc/reload", Some(TOKEN), vec![]).await;
    assert_eq!((status, body["version"].as_str()), (StatusCode::OK, Some(sha(&misbehave).as_str())), "{body}");
    assert_eq!(service.state_store().get("kept").unwrap(), Some(b"\"hello\"".to_vec()), "state carries over");

    let (status, list) = call(&app, "GET", "/components", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK);
    let outcomes: Vec<&str> =
        list["svc"]["history"].as_array().unwrap().iter().map(|h| h["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["replaced", "replaced", "serving"]);
    assert_eq!(list["svc"]["current"]["version"], sha(&misbehave));
}

#[tokio::test]
async fn bad_components_are_rejected_and_the_old_version_keeps_serving() {
    let service = Arc::new(runtime("misbehave", 1000));
    let app = app_with(service.clone());
    let before = service.current().sha256.clone();
    let (status, body) = call(&app, "POST", "/components/svc/reload", Some(TOKEN), b"not a component".to_vec()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().unwrap().contains("not a valid Wasm component"), "{body}");
    assert_eq!(service.current().sha256, before);
    assert!(crate::runtime::tests::handle(&service, &event("Echo", "k")).await.is_ok());
    let history = service.history();
    assert!(history.last().unwrap().outcome.starts_with("rejected"), "{history:?}");
    let (status, _) = call(&app, "POST", "/components/nope/reload", Some(TOKEN), vec![1]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_through_the_api() {
    use crate::bus::{MemoryBus, Outbound};
    use crate::dlq::{DeadLetters, MemoryLog};
    let bus = Arc::new(MemoryBus::default());
    let dead_letter = |component: &str, offset: u32| Outbound {
        topic: "dlq".into(),
        key: "o1".into(),
        value: b"{}".to_vec(),
        headers: [
            ("dlq-reason", "permanent: no"),
            ("dlq-component", component),
            ("dlq-source", &format!("emails/0/{offset}")),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
        .collect(),
    };
    bus.push(dead_letter("email", 3));
    bus.push(dead_letter("payment", 4));
    let managed = Managed { service: Arc::new(runtime("misbehave", 1000)), wasm: wasm("misbehave") };
    let dead_letters = DeadLetters::new(Arc::new(MemoryLog::new(bus.clone(), "dlq")), bus.clone());
    let app = admin_app(BTreeMap::from([("svc".to_owned(), managed)]), TOKEN, Some(dead_letters));

    assert_eq!(call(&app, "GET", "/dlq", None, vec![]).await.0, StatusCode::UNAUTHORIZED);
    let (status, body) = call(&app, "GET", "/dlq?component=email", Some(TOKEN), vec![]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["topic"].as_str(), body["dead_letters"].as_array().map(Vec::len)), (Some("dlq"), Some(1)));
    assert_eq!(body["dead_letters"][0]["id"], "0/0");
    let (status, body) = call(&app, "GET", "/dlq?since=someday", Some(TOKEN), vec![]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_since")));

    for bad in [&b"{\"all\": true}"[..], b"{\"ids\": [\"x\"]}", b"{}", b"not json", b"{\"ids\": [], \"typo\": 1}"] {
        let (status, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), bad.to_vec()).await;
        assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_selection")));
    }
    let all = br#"{"all": true, "component": "email"}"#.to_vec();
    let (status, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), all.clone()).await;
    assert_eq!((status, body["replayed"][0]["id"].as_str()), (StatusCode::OK, Some("0/0")), "{body}");
    assert_eq!(bus.records("emails").len(), 1);
    let (_, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), all).await;
    assert_eq!(body["replayed"].as_array().map(Vec::len), Some(0), "{body}");
    let (_, body) = call(&app, "POST", "/dlq/replay", Some(TOKEN), br#"{"ids": ["0/0", "0/1"]}"#.to_vec()).await;
    assert_eq!(body["replayed"][0]["id"], "0/1", "{body}");
    assert!(body["refused"][0]["reason"].as_str().unwrap().contains("already replayed"), "{body}");

    let without = app_with(Arc::new(runtime("misbehave", 1000)));
    assert_eq!(call(&without, "GET", "/dlq", Some(TOKEN), vec![]).await.0, StatusCode::NOT_FOUND);
}
