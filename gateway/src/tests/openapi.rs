//! `GET /openapi.json` against the router: every documented answer is
//! produced by a real request and matches its schema, every error code of
//! the document is seen, and every other method on a documented path is 405.

use std::collections::BTreeSet;

use super::*;

/// Resolves a local `$ref` (`#/components/...`).
fn resolve<'a>(doc: &'a serde_json::Value, schema: &'a serde_json::Value) -> &'a serde_json::Value {
    match schema["$ref"].as_str() {
        Some(reference) => resolve(doc, doc.pointer(reference.trim_start_matches('#')).expect(reference)),
        None => schema,
    }
}

/// The subset of JSON Schema the document uses; returns what does not match.
fn violations(doc: &serde_json::Value, schema: &serde_json::Value, value: &serde_json::Value, at: &str) -> Vec<String> {
    let schema = resolve(doc, schema);
    let mut found = Vec::new();
    if let Some(all) = schema["allOf"].as_array() {
        all.iter().for_each(|s| found.extend(violations(doc, s, value, at)));
    }
    if let Some(one) = schema["oneOf"].as_array() {
        let matching = one.iter().filter(|s| violations(doc, s, value, at).is_empty()).count();
        if matching != 1 {
            found.push(format!("{at}: matches {matching} of oneOf"));
        }
    }
    if value.is_null() && schema["nullable"] == true {
        return found;
    }
    let type_ok = match schema["type"].as_str() {
        None => true,
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("integer") => value.is_u64() || value.is_i64(),
        Some(other) => panic!("type {other} not supported here"),
    };
    if !type_ok {
        found.push(format!("{at}: {value} is not {}", schema["type"]));
        return found;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        found.push(format!("{at}: {value} not in {allowed:?}"));
    }
    for name in schema["required"].as_array().into_iter().flatten() {
        if value.get(name.as_str().unwrap()).is_none() {
            found.push(format!("{at}: {name} is missing"));
        }
    }
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            if let Some(inner) = value.get(name) {
                found.extend(violations(doc, property, inner, &format!("{at}.{name}")));
            }
        }
    }
    if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
        for (i, inner) in values.iter().enumerate() {
            found.extend(violations(doc, items, inner, &format!("{at}[{i}]")));
        }
    }
    found
}

/// Sends `request` to `router` and checks the answer against `doc`: its
/// status is documented for the operation, its body matches that answer's
/// schema, and it carries every header documented for it. Returns the
/// operation, method and status answered, and the body's error code.
async fn answer(
    doc: &serde_json::Value,
    router: Router,
    request: Request<Body>,
) -> ((String, String, String), Option<String>) {
    let (method, path) = (request.method().as_str().to_lowercase(), request.uri().path().to_owned());
    let operation_path = template(doc, &path).unwrap_or_else(|| panic!("{path} is not documented"));
    let response = router.oneshot(request).await.unwrap();
    let status = response.status().as_u16().to_string();
    let headers = response.headers().clone();
    let content_type = headers[header::CONTENT_TYPE].to_str().unwrap().to_owned();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let documented = resolve(doc, &doc["paths"][&operation_path][&method]["responses"][&status]);
    assert!(documented.is_object(), "{method} {path} answered {status}, which is not documented");
    for name in documented["headers"].as_object().into_iter().flat_map(|h| h.keys()) {
        assert!(headers.contains_key(name.as_str()), "{method} {path} {status}: no {name} header");
    }
    let media = content_type.split(';').next().unwrap();
    let schema = &documented["content"][media]["schema"];
    assert!(schema.is_object(), "{method} {path} {status}: {media} is not documented");
    let mut code = None;
    if media == "application/json" {
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let wrong = violations(doc, schema, &body, "body");
        assert!(wrong.is_empty(), "{method} {path} {status}: {wrong:?} in {body}");
        code = body["error"]["code"].as_str().map(str::to_owned);
    }
    ((operation_path, method, status), code)
}

/// The documented operation a concrete path belongs to.
fn template(doc: &serde_json::Value, path: &str) -> Option<String> {
    doc["paths"].as_object().unwrap().keys().find_map(|documented| {
        let (ours, theirs): (Vec<_>, Vec<_>) = (documented.split('/').collect(), path.split('/').collect());
        let same = ours.len() == theirs.len()
            && ours.iter().zip(&theirs).all(|(a, b)| a == b || (a.starts_with('{') && !b.is_empty()));
        same.then(|| documented.clone())
    })
}

fn backend(change: impl FnOnce(&mut TwinBackend)) -> Arc<TwinBackend> {
    let mut twin = TwinBackend::default();
    change(&mut twin);
    Arc::new(twin)
}

#[tokio::test]
async fn every_documented_answer_is_real_and_matches_its_schema() {
    let (status, doc) = send(app(backend(|_| {})), Request::get("/openapi.json").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    let key = |k: &'static str| [("idempotency-key", k)];
    let quick = Settings {
        publish_timeout: Duration::from_millis(50),
        request_timeout: Duration::from_millis(150),
        ..Settings::default()
    };
    let placed = backend(|_| {});
    let (_, accepted) = send(app(placed.clone()), post(&valid_order(), &key("k1"))).await;
    let order_path = format!("/order/{}", accepted["order_id"].as_str().unwrap());
    let mut other = valid_order();
    other["items"][0]["quantity"] = json!(9);
    let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
    let too_large = json!({ "customer": { "name": "x".repeat(MAX_BODY_BYTES) } });
    let cases: Vec<(Arc<TwinBackend>, Request<Body>)> = vec![
        (backend(|_| {}), get("/")),
        (backend(|_| {}), get("/health")),
        (backend(|b| b.down = AtomicBool::new(true)), get("/health")),
        (backend(|_| {}), get("/openapi.json")),
        (backend(|_| {}), get("/catalog")),
        (backend(|b| b.catalog_down = true), get("/catalog")),
        (backend(|_| {}), post(&line("lamp", 1, Some(1)), &[])),
        (backend(|_| {}), post(&valid_order(), &[])),
        (placed.clone(), post(&valid_order(), &key("k1"))),
        (
            backend(|_| {}),
            Request::post("/order").header("content-type", "application/json").body(Body::from("[")).unwrap(),
        ),
        (backend(|_| {}), post(&json!({ "customer": {} }), &[])),
        (backend(|_| {}), post(&valid_order(), &key(""))),
        (placed.clone(), post(&other, &key("k1"))),
        (backend(|_| {}), post(&too_large, &[])),
        (backend(|_| {}), Request::post("/order").body(Body::from(valid_order().to_string())).unwrap()),
        (backend(|b| b.down = AtomicBool::new(true)), post(&valid_order(), &[])),
        (backend(|b| b.hang = true), post(&valid_order(), &key("k2"))),
        (backend(|b| b.stuck = true), post(&valid_order(), &key("k3"))),
        (placed.clone(), get(&order_path)),
        (backend(|_| {}), get("/order/%FF")),
        (backend(|_| {}), get("/order/nope")),
        (backend(|b| b.stuck = true), get("/order/o1")),
        (backend(|b| b.fail = true), get("/order/o1")),
    ];
    let mut answered = BTreeSet::new();
    let mut codes = BTreeSet::new();
    for (backend, request) in cases {
        let (seen, code) = answer(&doc, app_with(backend, quick), request).await;
        answered.insert(seen);
        codes.extend(code);
    }
    // A client past its rate, on every operation: its second request.
    let limited = Settings { rates: RateLimits { orders_per_second: 0.001, queries_per_second: 0.001 }, ..quick };
    let operations: Vec<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (path.replace("{id}", "o1"), m.clone())))
        .collect();
    for (path, method) in operations {
        let router = app_with(backend(|_| {}), limited);
        let request = || match method.as_str() {
            "post" => post(&valid_order(), &[]),
            _ => get(&path),
        };
        router.clone().oneshot(request()).await.unwrap();
        let (seen, code) = answer(&doc, router, request()).await;
        assert_eq!(seen.2, "429", "{method} {path}");
        answered.insert(seen);
        codes.extend(code);
    }
    // A status query while every status slot is held (by a query the order
    // service never answers) waits a second, then is answered busy.
    let slotted = Settings { status_concurrency: 1, request_timeout: Duration::from_secs(30), ..Settings::default() };
    let router = app_with(backend(|b| b.stuck = true), slotted);
    let holder = tokio::spawn(router.clone().oneshot(get("/order/o1")));
    tokio::task::yield_now().await;
    let (seen, code) = answer(&doc, router, get("/order/o2")).await;
    assert_eq!((seen.2.as_str(), code.as_deref()), ("503", Some("busy")));
    holder.abort();
    answered.insert(seen);
    codes.extend(code);
    let mut promised = BTreeSet::new();
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            for status in operation["responses"].as_object().unwrap().keys() {
                promised.insert((path.clone(), method.clone(), status.clone()));
            }
        }
    }
    let never: Vec<_> = promised.difference(&answered).collect();
    assert!(never.is_empty(), "documented but never answered: {never:?}");
    let error = &doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"];
    let all_codes: BTreeSet<String> =
        error.as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    let unseen: Vec<_> = all_codes.difference(&codes).filter(|c| *c != "method_not_allowed").collect();
    assert!(unseen.is_empty(), "error codes never answered: {unseen:?}");
}

#[tokio::test]
async fn other_methods_are_405_and_other_paths_404_as_documented() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let schemas = &doc["components"]["schemas"];
    for (path, operations) in doc["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", "o1");
        let documented: BTreeSet<String> = operations.as_object().unwrap().keys().map(|m| m.to_uppercase()).collect();
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if documented.contains(method) {
                continue;
            }
            let request = Request::builder().method(method).uri(&concrete).body(Body::empty()).unwrap();
            let response = app(Arc::new(TwinBackend::default())).oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {concrete}");
            let allow: BTreeSet<String> = response.headers()["allow"]
                .to_str()
                .unwrap()
                .split(',')
                .map(|m| m.trim().to_owned())
                .filter(|m| m != "HEAD")
                .collect();
            assert_eq!(allow, documented, "{method} {concrete}: Allow");
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
            let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let wrong = violations(&doc, &schemas["MethodNotAllowed"], &body, "body");
            assert!(wrong.is_empty(), "{method} {concrete}: {wrong:?}");
        }
    }
    let (status, body) =
        send(app(Arc::new(TwinBackend::default())), Request::get("/nowhere").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(violations(&doc, &schemas["NotFound"], &body, "body").is_empty(), "{body}");
}

#[test]
fn the_validator_rejects_what_it_should() {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).unwrap();
    let schemas = &doc["components"]["schemas"];
    let not_confirmed = json!({ "error": { "code": "not_confirmed", "message": "m" } });
    assert!(!violations(&doc, &schemas["Unavailable"], &not_confirmed, "b").is_empty(), "order_id is required");
    let wrong_code = json!({ "error": { "code": "not_found", "message": "m" } });
    assert!(!violations(&doc, &schemas["KeyReused"], &wrong_code, "b").is_empty());
    assert!(!violations(&doc, &schemas["Accepted"], &json!({ "order_id": 1 }), "b").is_empty());
}
