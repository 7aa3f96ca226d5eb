//! The wire formats: binary mode written and read back, structured mode
//! and the version-1 envelope read, and every bad record refused with why.

use serde_json::json;

use super::{Envelope, MAX_ID_BYTES, raw};
use crate::traces::TraceParent;

const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect()
}

fn decode(pairs: &[(&str, &str)], key: Option<&str>, value: &str) -> Result<Envelope, String> {
    Envelope::decode(&headers(pairs), key.map(str::as_bytes), Some(value.as_bytes())).map_err(|e| e.to_string())
}

#[test]
fn binary_mode_is_written_and_read_back() {
    let first = Envelope::originate("OrderPlaced", "o1", "gateway", 1_764_100_000_123, json!({"a": 1}));
    let event = first.caused(0, "PaymentRequested", "o1", "order@abc", 1_764_100_000_456, raw(&json!({"b": [2]})));
    let trace = TraceParent::parse(TRACE).unwrap();
    let written = event.headers(Some(&trace));
    let get = |name: &str| written.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(get("ce_specversion"), Some("1.0"));
    assert_eq!(get("ce_id"), Some(event.id.as_str()));
    assert_eq!(get("ce_type"), Some("PaymentRequested"));
    assert_eq!(get("ce_source"), Some("/shop/order@abc"));
    assert_eq!(get("ce_subject"), Some("o1"));
    assert_eq!(get("ce_time"), Some("2025-11-25T19:46:40.456Z"));
    assert_eq!(get("content-type"), Some("application/json"));
    assert_eq!(get("ce_correlationid"), Some(first.id.as_str()));
    assert_eq!(get("ce_causationid"), Some(first.id.as_str()));
    assert_eq!((get("ce_traceparent"), get("traceparent")), (Some(TRACE), Some(TRACE)));
    assert_eq!(event.value(), br#"{"b":[2]}"#, "the value is the data, nothing around it");
    let read = Envelope::decode(&event.header_bytes(Some(&trace)), Some(b"o1"), Some(&event.value())).unwrap();
    assert_eq!(read, event);
    assert_eq!(read.producer(), "order@abc");
    assert_eq!(TraceParent::from_headers(&event.header_bytes(Some(&trace))), Some(trace));
    let first_read = Envelope::decode(&first.header_bytes(None), None, Some(&first.value())).unwrap();
    assert_eq!((first_read.causation_id, first_read.correlation_id), (None, first.id.clone()));
}

#[test]
fn binary_mode_of_another_producer_is_read_with_defaults() {
    // What the CloudEvents SDKs write: no subject (the key is the order),
    // no correlation id (the event starts its saga), no time, a charset.
    let read = decode(
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", "ext-1"),
            ("ce_source", "https://legacy.example/orders"),
            ("ce_type", "OrderPlaced"),
            ("content-type", "application/json; charset=utf-8"),
            ("ce_someextension", "ignored"),
        ],
        Some("o7"),
        r#"{"order_id":"o7"}"#,
    )
    .unwrap();
    assert_eq!((read.order_id.as_str(), read.correlation_id.as_str(), read.timestamp_ms), ("o7", "ext-1", 0));
    assert_eq!(
        (read.source.as_str(), read.producer()),
        ("https://legacy.example/orders", "https://legacy.example/orders")
    );
    let offset = decode(
        &[
            ("ce_specversion", "1.0"),
            ("ce_id", "e"),
            ("ce_source", "/s"),
            ("ce_type", "T"),
            ("ce_time", "2026-01-01T01:00:00.5+01:00"),
        ],
        Some("k"),
        "{}",
    )
    .unwrap();
    assert_eq!(offset.timestamp_ms, 1_767_225_600_500, "the offset is applied");
}

#[test]
fn structured_mode_is_read_with_or_without_its_content_type() {
    let value = json!({
        "specversion": "1.0", "id": "s-1", "source": "/py", "type": "OrderPlaced", "subject": "o2",
        "time": "2026-12-07T18:00:00Z", "datacontenttype": "application/json", "data": {"x": 1},
        "correlationid": "c-9", "causationid": "s-0", "traceparent": TRACE,
    })
    .to_string();
    let with = decode(&[("content-type", "application/cloudevents+json; charset=UTF-8")], Some("k"), &value).unwrap();
    let without = decode(&[], Some("k"), &value).unwrap();
    assert_eq!(with, without);
    assert_eq!((with.id.as_str(), with.order_id.as_str(), with.correlation_id.as_str()), ("s-1", "o2", "c-9"));
    assert_eq!(
        (with.causation_id.as_deref(), with.timestamp_ms, with.data.get()),
        (Some("s-0"), 1_796_666_400_000, r#"{"x":1}"#)
    );
}

#[test]
fn the_version_1_envelope_is_still_read() {
    let old = r#"{"id":"i1","type":"OrderPlaced","order_id":"o1","correlation_id":"i1","causation_id":null,
        "timestamp_ms":1764100000000,"schema_version":1,"producer":"gateway","data":{"order_id":"o1"}}"#;
    let read = decode(&[("event-type", "OrderPlaced"), ("traceparent", TRACE)], Some("o1"), old).unwrap();
    assert_eq!((read.id.as_str(), read.event_type.as_str(), read.order_id.as_str()), ("i1", "OrderPlaced", "o1"));
    assert_eq!(
        (read.source.as_str(), read.producer(), read.timestamp_ms),
        ("/shop/gateway", "gateway", 1_764_100_000_000)
    );
    assert_eq!(read.data.get(), r#"{"order_id":"o1"}"#);
}

#[test]
fn bad_records_say_why() {
    let ce = |extra: &[(&'static str, &'static str)]| {
        let mut pairs = vec![("ce_specversion", "1.0"), ("ce_id", "i"), ("ce_source", "/s"), ("ce_type", "T")];
        for (name, value) in extra {
            pairs.retain(|(k, _)| k != name);
            pairs.push((name, value));
        }
        pairs.retain(|(_, v)| !v.is_empty());
        pairs
    };
    // (headers, value, what the refusal says)
    type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], "", "no value"),
        (vec![], r#"{"id":1}"#, "neither a CloudEvent"),
        (vec![], "not json", "not JSON"),
        (ce(&[]), "", "no value"),
        (ce(&[("ce_id", "")]), "{}", "ce_id is missing"),
        (ce(&[("ce_type", "")]), "{}", "ce_type is missing"),
        (ce(&[("ce_specversion", "0.3")]), "{}", "specversion \"0.3\""),
        (ce(&[("content-type", "text/plain")]), "hello", "\"text/plain\" is not JSON"),
        (ce(&[]), "{not json", "not JSON"),
        (ce(&[("ce_time", "yesterday")]), "{}", "ce_time \"yesterday\" is not an RFC 3339 time"),
        (ce(&[("ce_time", "1969-12-31T23:59:59Z")]), "{}", "before 1970"),
        (vec![("content-type", "application/cloudevents-batch+json")], "[]", "batches"),
        (
            vec![("content-type", "application/cloudevents+json")],
            r#"{"specversion":"1.0","id":"i","source":"/s","type":"T","subject":"o"}"#,
            "data is missing",
        ),
        (
            vec![],
            r#"{"specversion":"1.0","id":"i","source":"/s","type":"T","subject":"o","data_base64":"AA=="}"#,
            "\"data_base64\" is not JSON",
        ),
        (
            vec![],
            r#"{"id":"","type":"T","order_id":"o","correlation_id":"c","timestamp_ms":1,"schema_version":1,"producer":"p","data":{}}"#,
            "id must not be empty",
        ),
        (
            vec![],
            r#"{"id":"i","type":"T","order_id":"o","correlation_id":"c","timestamp_ms":1,"schema_version":9,"producer":"p","data":{}}"#,
            "schema_version 9",
        ),
    ];
    for (pairs, value, needle) in cases {
        let err = Envelope::decode(&headers(&pairs), Some(b"k"), Some(value.as_bytes())).unwrap_err().to_string();
        assert!(err.contains(needle), "{pairs:?} {value:?}: {err:?} should mention {needle:?}");
    }
    let none = Envelope::decode(&headers(&ce(&[])), None, Some(b"{}")).unwrap_err().to_string();
    assert!(none.contains("ce_subject is missing"), "{none}");
    let mut bytes = headers(&ce(&[]));
    bytes.push(("ce_type".to_owned(), vec![0xff, 0xfe]));
    let err = Envelope::decode(&bytes, Some(b"k"), Some(b"{}")).unwrap_err().to_string();
    assert_eq!(err, "ce_type is not UTF-8");
    // What a refusal repeats of the record is cut.
    let huge: &'static str = "9".repeat(100_000).leak();
    let err = decode(&ce(&[("ce_specversion", huge)]), Some("k"), "{}").unwrap_err();
    assert!(err.contains("specversion") && err.len() < 400, "{} bytes", err.len());
    let err = decode(&ce(&[("ce_time", huge)]), Some("k"), "{}").unwrap_err();
    assert!(err.contains("not an RFC 3339 time") && err.len() < 600, "{} bytes", err.len());
}

#[test]
fn the_content_type_chooses_the_mode_and_a_header_given_twice_counts_by_its_last() {
    // Structured, with a `ce_*` header some middleware added: still structured.
    let value = json!({"specversion": "1.0", "id": "s", "source": "/s", "type": "T", "subject": "o", "data": {"d": 1}});
    let read = decode(
        &[("content-type", "application/cloudevents+json"), ("ce_traceparent", TRACE)],
        Some("k"),
        &value.to_string(),
    )
    .unwrap();
    assert_eq!((read.id.as_str(), read.data.get()), ("s", r#"{"d":1}"#));
    // The last of two ids is the id.
    let twice =
        [("ce_specversion", "1.0"), ("ce_id", "first"), ("ce_source", "/s"), ("ce_type", "T"), ("ce_id", "last")];
    assert_eq!(decode(&twice, Some("k"), "{}").unwrap().id, "last");
}

#[test]
fn a_source_has_a_bound_of_its_own() {
    let base = [("ce_specversion", "1.0"), ("ce_id", "i"), ("ce_type", "T")];
    let with = |source: &str| {
        let mut pairs = base.to_vec();
        pairs.push(("ce_source", source));
        decode(&pairs, Some("k"), "{}")
    };
    // The host's own: a component name of 200 characters and a SHA-256.
    let own = format!("/shop/{}@{}", "n".repeat(200), "a".repeat(64));
    assert!(with(&own).is_ok(), "the host reads what it writes");
    assert!(with(&"s".repeat(1025)).unwrap_err().contains("source is 1025 bytes long, over the limit of 1024"));
    let err = with("/s\u{1}").unwrap_err();
    assert!(err.contains("source contains the control character '\\u{1}'"), "{err}");
}

#[test]
fn version_1_is_written_as_hosts_before_cloudevents_wrote_it() {
    let first = Envelope::originate("OrderPlaced", "o1", "gateway", 5, json!({"a": 1}));
    let event = first.caused(0, "PaymentRequested", "o1", "order@abc", 6, raw(&json!({"b": 2})));
    let trace = TraceParent::parse(TRACE).unwrap();
    let (value, headers) = event.encode(crate::manifest::WireFormat::V1, Some(&trace));
    let expected = format!(
        r#"{{"id":"{}","type":"PaymentRequested","order_id":"o1","correlation_id":"{}","causation_id":"{}","timestamp_ms":6,"schema_version":1,"producer":"order@abc","data":{{"b":2}}}}"#,
        event.id, first.id, first.id
    );
    assert_eq!(value, expected);
    let names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["event-type", "producer", "traceparent"]);
    let bytes: Vec<(String, Vec<u8>)> = headers.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
    assert_eq!(Envelope::decode(&bytes, None, Some(value.as_bytes())).unwrap(), event, "read back the same");
    let (value, headers) = event.encode(crate::manifest::WireFormat::CloudEvents, Some(&trace));
    assert_eq!((value, headers), (r#"{"b":2}"#.to_owned(), event.headers(Some(&trace))));
}

#[test]
fn ids_that_no_store_can_keep_are_refused() {
    let long = "x".repeat(MAX_ID_BYTES + 1);
    let cases = [
        ("ce_id", "a\u{0}b", "id contains the control character '\\0'"),
        ("ce_id", long.as_str(), "id is 257 bytes long, over the limit of 256"),
        ("ce_subject", "o\n1", "subject (the order id) contains the control character '\\n'"),
        ("ce_correlationid", long.as_str(), "correlation id is 257 bytes"),
        ("ce_causationid", "c\u{7f}", "causation id contains"),
        ("ce_type", "T\u{1b}", "type contains"),
    ];
    let event = Envelope::originate("T", "o1", "p", 1, json!({}));
    for (name, value, needle) in cases {
        let mut pairs = event.header_bytes(None);
        pairs.retain(|(k, _)| k != name);
        pairs.push((name.to_owned(), value.as_bytes().to_vec()));
        let err = Envelope::decode(&pairs, None, Some(b"{}")).unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }
    let longest = "x".repeat(MAX_ID_BYTES);
    let with = |name: &str, value: &str| {
        let mut pairs = event.header_bytes(None);
        pairs.retain(|(k, _)| k != name);
        pairs.push((name.to_owned(), value.as_bytes().to_vec()));
        Envelope::decode(&pairs, None, Some(b"{}"))
    };
    assert!(with("ce_id", &longest).is_ok(), "the bound itself is allowed");
    assert!(with("ce_subject", "ordre-é-✓").is_ok(), "any printable text is an id");
    let legacy = r#"{"id":"a\u0000b","type":"T","order_id":"o","correlation_id":"c","timestamp_ms":1,"schema_version":1,"producer":"p","data":{}}"#;
    let err = decode(&[], None, legacy).unwrap_err();
    assert!(err.contains("id contains the control character"), "{err}");
}
