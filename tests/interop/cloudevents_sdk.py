"""Interop with clients we did not write: the official CloudEvents SDK for
Python (PyPI `cloudevents` 2.2.0) and `confluent-kafka` against a host
started by scripts/interop-test.sh.

1. Publishes two `OrderPlaced` events made with the SDK, one in binary mode
   and one in structured mode, as a service outside the host would (its own
   source, the SDK's ids and times, the Kafka key the order id), each data
   checked against schemas/OrderPlaced.json first.
2. Reads every record of both orders off the app's topics until each saga
   ended (a final order event and its email sent), parses each with the
   SDK (`from_kafka`, which detects the mode), and checks: a valid
   CloudEvent 1.0, the order as subject and key, the saga's correlation id,
   a causation id naming an event of the same saga, the trace context, a
   source naming the producing component and its version, and the data
   valid against the checked-in schema of its type (`jsonschema`, draft
   2020-12).

Exits non-zero, saying why, on the first broken expectation.

Environment: KAFKA_BROKERS, TOPIC_PREFIX, SCHEMAS_DIR.
"""

import json
import os
import sys
import time
import uuid

from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka, to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Consumer, Producer, TopicPartition
from jsonschema import Draft202012Validator

BROKERS = os.environ.get("KAFKA_BROKERS", "127.0.0.1:9092")
PREFIX = os.environ["TOPIC_PREFIX"]
SCHEMAS = os.environ["SCHEMAS_DIR"]
TOPICS = [PREFIX + t for t in ("orders", "payments", "emails", "analytics")]
FINAL = {"OrderConfirmed", "OrderRejected", "OrderCancelled"}
SOURCE = "/interop/python-sdk"
TIMEOUT_S = 90


def fail(message):
    print(f"interop: FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def validator(event_type, cache={}):
    if event_type not in cache:
        path = os.path.join(SCHEMAS, f"{event_type}.json")
        if not os.path.exists(path):
            fail(f"no checked-in schema for {event_type} ({path})")
        with open(path) as f:
            schema = json.load(f)
        Draft202012Validator.check_schema(schema)
        cache[event_type] = Draft202012Validator(schema)
    return cache[event_type]


def check_data(event_type, data, where):
    errors = sorted(validator(event_type).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        fail(f"{where}: {event_type} data breaks its schema at {list(first.path)}: {first.message}")


def order_placed(order_id):
    return {
        "order_id": order_id,
        "customer": {"name": "Interop Py", "email": "py@example.com"},
        "items": [{"sku": "book", "quantity": 2, "unit_price_cents": 1250}],
        "total_cents": 2500,
        # A service outside the host holds no vault token: the payment
        # service declines it and the saga ends OrderRejected.
        "card": {"token": "tok_interop_" + order_id[:8], "brand": "visa", "last4": "4242"},
        "idempotency": None,
    }


def publish(producer, order_id, mode):
    data = order_placed(order_id)
    check_data("OrderPlaced", data, f"the {mode} OrderPlaced we send")
    event = CloudEvent(
        attributes={
            "type": "OrderPlaced",
            "source": SOURCE,
            "subject": order_id,
            "datacontenttype": "application/json",
            "partitionkey": order_id,
        },
        data=data,
    )
    message = (to_binary if mode == "binary" else to_structured)(event, JSONFormat())
    producer.produce(
        PREFIX + "orders", key=message.key, value=message.value, headers=list(message.headers.items())
    )
    return event.get_id()


def read_sagas(orders):
    consumer = Consumer({
        "bootstrap.servers": BROKERS,
        "group.id": f"interop-{uuid.uuid4()}",
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    partitions = []
    for topic in TOPICS:
        metadata = consumer.list_topics(topic, timeout=10)
        for p in metadata.topics[topic].partitions:
            partitions.append(TopicPartition(topic, p, 0))
    consumer.assign(partitions)
    events = {order: [] for order in orders}
    deadline = time.monotonic() + TIMEOUT_S

    def ended(order):
        types = [e.get_type() for _, e in events[order]]
        return any(t in FINAL for t in types) and "EmailSent" in types

    while not all(ended(o) for o in orders):
        if time.monotonic() > deadline:
            seen = {o: [e.get_type() for _, e in events[o]] for o in orders}
            fail(f"sagas not ended within {TIMEOUT_S} s: {seen}")
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            fail(f"reading the topics: {message.error()}")
        key = message.key().decode() if message.key() else None
        if key not in events:
            continue
        headers = {k: v for k, v in (message.headers() or [])}
        where = f"{message.topic()}/{message.partition()}/{message.offset()}"
        try:
            event = from_kafka(KafkaMessage(headers=headers, key=message.key(), value=message.value()), JSONFormat())
        except Exception as err:  # the SDK's own refusal, whatever its class
            fail(f"{where}: the SDK does not read it as a CloudEvent: {err!r} (headers {sorted(headers)})")
        events[key].append((message.topic(), event))
    consumer.close()
    return events


def check_saga(order_id, first_id, mode, saga):
    ids = {e.get_id() for _, e in saga}
    types = [e.get_type() for _, e in saga]
    for topic, event in saga:
        where = f"{order_id} ({mode}) {event.get_type()} on {topic}"
        if event.get_specversion() != "1.0":
            fail(f"{where}: specversion {event.get_specversion()}")
        if event.get_subject() != order_id or event.get_extension("partitionkey") != order_id:
            fail(f"{where}: subject {event.get_subject()!r} / key {event.get_extension('partitionkey')!r}")
        if event.get_time() is None:
            fail(f"{where}: no time")
        if event.get_id() == first_id:
            if event.get_source() != SOURCE:
                fail(f"{where}: our own event came back with source {event.get_source()!r}")
        else:
            source = event.get_source()
            name = source.removeprefix("/shop/").split("@")[0]
            if not source.startswith("/shop/") or "@" not in source and name != "gateway":
                fail(f"{where}: source {source!r} does not name a component and its version")
            if event.get_extension("correlationid") != first_id:
                fail(f"{where}: correlationid {event.get_extension('correlationid')!r}, not {first_id}")
            if event.get_extension("causationid") not in ids:
                fail(f"{where}: causationid {event.get_extension('causationid')!r} is no event of this saga")
            if not str(event.get_extension("traceparent") or "").startswith("00-"):
                fail(f"{where}: no traceparent extension")
            if event.get_datacontenttype() != "application/json":
                fail(f"{where}: datacontenttype {event.get_datacontenttype()!r}")
        check_data(event.get_type(), event.get_data(), where)
    for expected in ("OrderPlaced", "PaymentRequested", "PaymentDeclined", "OrderRejected", "EmailRequested", "EmailSent"):
        if expected not in types:
            fail(f"{order_id} ({mode}): no {expected} in {types}")
    print(f"interop: {order_id} ({mode}): {len(saga)} records, each a CloudEvent the SDK reads, data valid: {types}")


def main():
    producer = Producer({"bootstrap.servers": BROKERS, "enable.idempotence": True})
    sent = {}
    for mode in ("binary", "structured"):
        order_id = f"py-{mode}-{uuid.uuid4()}"
        sent[order_id] = (publish(producer, order_id, mode), mode)
    if producer.flush(30) != 0:
        fail("the OrderPlaced events were not acknowledged within 30 s")
    sagas = read_sagas(list(sent))
    for order_id, (first_id, mode) in sent.items():
        check_saga(order_id, first_id, mode, sagas[order_id])
    print("interop: ok")


if __name__ == "__main__":
    main()
