use std::sync::Arc;

use super::*;
use crate::bus::{Inbound, MemoryBus};

const DLQ: &str = "p-dead-letters";

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec())).collect()
}

fn envelope(id: &str, event_type: &str) -> Vec<u8> {
    serde_json::json!({ "id": id, "type": event_type, "order_id": "o1", "data": {} }).to_string().into_bytes()
}

/// A dead letter of `component` for a record consumed from `source`.
fn consumed(component: &str, source: &str, event_id: &str) -> Outbound {
    Outbound {
        topic: DLQ.into(),
        key: "o1".into(),
        value: envelope(event_id, "EmailRequested"),
        headers: headers(&[
            ("event-type", "EmailRequested"),
            ("producer", "order@abc"),
            ("dlq-reason", "permanent: no"),
            ("dlq-component", component),
            ("dlq-version", "f00d"),
            ("dlq-source", source),
            ("dlq-attempts", "1"),
        ]),
    }
}

fn raw(offset: i64, timestamp_ms: i64, record: &Outbound) -> RawRecord {
    RawRecord {
        partition: 0,
        offset,
        timestamp_ms: Some(timestamp_ms),
        key: Some(record.key.clone().into_bytes()),
        value: Some(record.value.clone()),
        headers: record.headers.clone(),
    }
}

/// Five dead letters of every kind and a marker for the first.
fn topic() -> Vec<RawRecord> {
    let mut truncated = consumed("email", "p-emails/0/9", "e-cut");
    truncated.headers.extend(headers(&[("dlq-truncated", "1000000")]));
    let timer = consumed("order", "timer/-1/-1", "t1");
    let mut output = consumed("misbehave", "", "out1");
    output.headers.retain(|(k, _)| k != "dlq-source" && k != "dlq-attempts");
    output.headers.extend(headers(&[("dlq-target-topic", "p-out"), ("dlq-source-event", "cause-1")]));
    let marker = Outbound {
        topic: DLQ.into(),
        key: "0/0".into(),
        value: vec![],
        headers: headers(&[(REPLAY_OF, "0/0"), ("dlq-component", "email")]),
    };
    vec![
        raw(0, 1_000, &consumed("email", "p-emails/2/17", "e1")),
        raw(1, 2_000, &consumed("email", "p-emails/1/3", "e2")),
        raw(2, 3_000, &truncated),
        raw(3, 4_000, &timer),
        raw(4, 5_000, &output),
        raw(5, 6_000, &marker),
    ]
}

#[test]
fn ids_print_and_parse() {
    let id: DeadLetterId = "2/42".parse().unwrap();
    assert_eq!(id, DeadLetterId { partition: 2, offset: 42 });
    assert_eq!(id.to_string(), "2/42");
    for bad in ["", "2", "2/", "/4", "a/1", "-1/3", "1/-3", "1/2/3"] {
        assert!(bad.parse::<DeadLetterId>().unwrap_err().contains("PARTITION/OFFSET"), "{bad:?}");
    }
}

#[test]
fn dead_letters_are_read_from_their_headers_and_markers_apply() {
    let letters = collate(topic());
    assert_eq!(letters.len(), 5, "the marker is not a dead letter");
    let first = &letters[0];
    assert_eq!((first.component.as_str(), first.version.as_deref()), ("email", Some("f00d")));
    assert_eq!(first.origin, Origin::Topic { topic: "p-emails".into(), partition: 2, offset: 17 });
    assert_eq!((first.attempts, first.reason.as_str()), (Some(1), "permanent: no"));
    assert_eq!((first.event_id.as_deref(), first.event_type.as_deref()), (Some("e1"), Some("EmailRequested")));
    assert_eq!(
        first.replayed,
        Some(Replay { marker: DeadLetterId { partition: 0, offset: 5 }, timestamp_ms: Some(6_000) })
    );
    assert_eq!(letters[1].replayed, None);
    assert_eq!(letters[2].truncated_from, Some(1_000_000));
    assert_eq!(letters[3].origin, Origin::Timer);
    assert_eq!(
        letters[4].origin,
        Origin::Output { target_topic: "p-out".into(), source_event: Some("cause-1".into()) }
    );
    assert_eq!(letters[4].destination(), Ok("p-out"));
    let text = render_lines(&letters);
    assert_eq!(text.lines().count(), 5);
    assert!(text.lines().next().unwrap().starts_with("0/0 "), "{text}");
    assert!(text.contains("replayed(0/5)") && text.contains("truncated") && text.contains("not-replayable"), "{text}");
    let json = serde_json::to_value(&letters[0]).unwrap();
    assert_eq!(json["id"], "0/0");
    assert_eq!(json["origin"]["kind"], "topic");
}

#[test]
fn the_list_filters_by_component_and_time() {
    let letters = collate(topic());
    let ids = |filter: Filter| -> Vec<String> {
        letters.iter().filter(|l| filter.matches(l)).map(|l| l.id.to_string()).collect()
    };
    assert_eq!(ids(Filter::default()).len(), 5);
    assert_eq!(ids(Filter { component: Some("email".into()), since_ms: None }), ["0/0", "0/1", "0/2"]);
    assert_eq!(ids(Filter { component: Some("email".into()), since_ms: Some(2_000) }), ["0/1", "0/2"]);
    assert_eq!(ids(Filter { component: None, since_ms: Some(4_500) }), ["0/4"]);
    assert!(ids(Filter { component: Some("nobody".into()), since_ms: None }).is_empty());
}

#[test]
fn a_selection_is_ids_or_all_of_one_component() {
    let ids = |ids: &[&str]| ids.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        Selection::new(&ids(&["0/1"]), false, None),
        Ok(Selection::Ids { ids: vec![DeadLetterId { partition: 0, offset: 1 }], component: None })
    );
    assert_eq!(Selection::new(&[], true, Some("email".into())), Ok(Selection::All { component: "email".into() }));
    assert!(Selection::new(&[], true, None).unwrap_err().contains("needs a component"));
    assert!(Selection::new(&[], true, Some(String::new())).unwrap_err().contains("needs a component"));
    assert!(Selection::new(&[], false, Some("email".into())).unwrap_err().contains("name the dead letters"));
    assert!(Selection::new(&ids(&["0/1"]), true, Some("email".into())).unwrap_err().contains("not both"));
    assert!(Selection::new(&ids(&["zero"]), false, None).unwrap_err().contains("invalid dead-letter id"));
}

#[test]
fn the_plan_refuses_what_cannot_be_replayed_and_says_why() {
    let letters = collate(topic());
    let ids: Vec<String> = ["0/0", "0/1", "0/2", "0/3", "0/4", "0/9", "0/1"].iter().map(|s| (*s).to_owned()).collect();
    let (chosen, refused) = plan(&letters, &Selection::new(&ids, false, None).unwrap());
    let chosen: Vec<String> = chosen.iter().map(|l| l.id.to_string()).collect();
    assert_eq!(chosen, ["0/1", "0/4"], "each once, in dead-letter order");
    let why = |id: &str| refused.iter().find(|r| r.id.to_string() == id).map(|r| r.reason.clone()).unwrap();
    assert!(why("0/0").contains("already replayed (marker 0/5"), "{}", why("0/0"));
    assert!(why("0/2").contains("cut to fit") && why("0/2").contains("p-emails/0/9"), "{}", why("0/2"));
    assert!(why("0/3").contains("scheduler fires"), "{}", why("0/3"));
    assert!(why("0/9").contains("no dead letter"), "{}", why("0/9"));
    assert_eq!(refused.len(), 4);

    let guarded = Selection::Ids { ids: vec!["0/4".parse().unwrap()], component: Some("email".into()) };
    let (chosen, refused) = plan(&letters, &guarded);
    assert!(chosen.is_empty() && refused[0].reason.contains("set aside by \"misbehave\""), "{refused:?}");

    // All of a component: what was replayed is left out without a word.
    let (chosen, refused) = plan(&letters, &Selection::All { component: "email".into() });
    assert_eq!(chosen.iter().map(|l| l.id.to_string()).collect::<Vec<_>>(), ["0/1"]);
    assert_eq!(refused.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(), ["0/2"]);
}

#[tokio::test]
async fn a_replay_publishes_the_original_record_once_and_remembers_it() {
    let bus = Arc::new(MemoryBus::default());
    for record in [consumed("email", "p-emails/2/17", "e1"), consumed("email", "p-emails/1/3", "e2")] {
        bus.push(record);
    }
    bus.push(consumed("payment", "p-payments/0/1", "pay1"));
    let allowed = BTreeSet::from(["p-emails".to_owned(), "p-payments".to_owned()]);
    let dead_letters = DeadLetters::new(Arc::new(MemoryLog::new(bus.clone(), DLQ)), bus.clone(), allowed);
    let all = Selection::All { component: "email".into() };

    let report = dead_letters.replay(&all).await.unwrap();
    let replayed: Vec<(String, &str)> = report.replayed.iter().map(|r| (r.id.to_string(), r.topic.as_str())).collect();
    assert_eq!(replayed, [("0/0".to_owned(), "p-emails"), ("0/1".to_owned(), "p-emails")]);
    assert!(report.refused.is_empty());
    let sent = bus.records("p-emails");
    assert_eq!(sent.len(), 2);
    assert_eq!((sent[0].key.as_str(), sent[0].value.as_slice()), ("o1", envelope("e1", "EmailRequested").as_slice()));
    let names: Vec<&str> = sent[0].headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["event-type", "producer", REPLAYED_FROM], "the original headers, minus dlq-*");
    assert_eq!(sent[0].headers[2].1, b"p-dead-letters/0/0");

    let listed = dead_letters.list(&Filter::default()).await.unwrap();
    let states: Vec<(String, bool)> = listed.iter().map(|l| (l.id.to_string(), l.replayed.is_some())).collect();
    assert_eq!(states, [("0/0".into(), true), ("0/1".into(), true), ("0/2".into(), false)]);

    let again = dead_letters.replay(&all).await.unwrap();
    assert_eq!(again, ReplayReport::default(), "nothing is replayed twice");
    assert_eq!(bus.records("p-emails").len(), 2);
}

#[tokio::test]
async fn the_pipeline_writes_what_the_list_reads() {
    let service = Arc::new(crate::runtime::tests::runtime("misbehave", 1000));
    let topics = crate::pipeline::Topics { prefix: "p-".into(), dead_letter: "dead-letters".into() };
    let clock = Arc::new(crate::clock::ManualClock::at(1));
    let pipeline = crate::pipeline::Pipeline::new(service.clone(), topics, Default::default(), clock);
    let record = Inbound {
        topic: "p-in".into(),
        partition: 2,
        offset: 7,
        key: Some(b"k".to_vec()),
        value: Some(b"not an envelope".to_vec()),
        headers: headers(&[("trace", "1")]),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let Some(crate::pipeline::Disposition::DeadLetter { record, .. }) = pipeline.process(&record, &shutdown).await
    else {
        panic!("an invalid envelope is dead-lettered");
    };
    let letters = collate(vec![raw(0, 1, &record)]);
    let letter = &letters[0];
    assert_eq!(letter.origin, Origin::Topic { topic: "p-in".into(), partition: 2, offset: 7 });
    assert_eq!((letter.component.as_str(), letter.version.as_ref()), ("misbehave", Some(&service.current().sha256)));
    assert_eq!(letter.attempts, Some(0));
    assert!(letter.reason.contains("not an event this host reads"), "{}", letter.reason);
    let replay = letter.replay_record("p-in", DLQ);
    assert_eq!((replay.key.as_str(), replay.value.as_slice()), ("k", b"not an envelope".as_slice()));
    assert_eq!(replay.headers[0], ("trace".to_owned(), b"1".to_vec()));
}

/// Headers are data: a dead letter naming a topic outside the app (the
/// orders topic of another app, a topic that makes a payment authorized)
/// is refused, whether as a consumed record or as an output.
#[tokio::test]
async fn a_replay_goes_only_to_the_apps_topics() {
    let bus = Arc::new(MemoryBus::default());
    bus.push(consumed("email", "p-emails/0/1", "e1"));
    bus.push(consumed("email", "elsewhere/0/1", "e2"));
    let mut output = consumed("email", "", "e3");
    output.headers.retain(|(k, _)| k != "dlq-source");
    output.headers.extend(headers(&[("dlq-target-topic", "p-payment-authorized-forged")]));
    bus.push(output);
    bus.push(consumed("email", &format!("{DLQ}/0/0"), "e4"));
    let allowed = BTreeSet::from(["p-emails".to_owned()]);
    let dead_letters = DeadLetters::new(Arc::new(MemoryLog::new(bus.clone(), DLQ)), bus.clone(), allowed);

    let report = dead_letters.replay(&Selection::All { component: "email".into() }).await.unwrap();
    let replayed: Vec<String> = report.replayed.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(replayed, ["0/0"]);
    let refused: Vec<String> = report.refused.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(refused, ["0/1", "0/2", "0/3"], "{report:?}");
    assert!(report.refused.iter().all(|r| r.reason.contains("no component of this app")), "{report:?}");
    assert!(bus.records("elsewhere").is_empty() && bus.records("p-payment-authorized-forged").is_empty());
    assert_eq!(bus.records(DLQ).len(), 5, "four dead letters and one marker, nothing replayed onto itself");
}

#[test]
fn the_replay_topics_are_the_consumed_and_granted_ones() {
    let text = r#"
[kafka]
topic_prefix = "p-"
dead_letter_topic = "dead"
[gateway]
port = 1
order_component = "a"
[components.a]
wasm = "a.wasm"
port = 2
topics = ["in", "dead"]
group = "a"
publishes = ["out:Thing", "other:*"]
"#;
    let manifest = crate::manifest::Manifest::parse(text).unwrap();
    let topics: Vec<String> = replay_topics(&manifest).into_iter().collect();
    assert_eq!(topics, ["p-in", "p-other", "p-out"]);
}
