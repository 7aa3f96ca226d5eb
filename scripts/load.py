#!/usr/bin/env python3
"""Places N orders through the gateway on loopback and prints throughput.

Bounded in count and time; targets 127.0.0.1 only.

    scripts/load.py [N] [CONCURRENCY]     # host already running (just run)
"""
import json
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

GATEWAY = "http://127.0.0.1:3005"
ANALYTICS = "http://127.0.0.1:3004"
N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
CONCURRENCY = int(sys.argv[2]) if len(sys.argv) > 2 else 16
DEADLINE_S = 300

ORDER = json.dumps({
    "customer": {"name": "Load", "email": "load@example.com"},
    "items": [{"sku": "pen", "quantity": 1, "unit_price_cents": 199}],
    "payment": {"card_number": "4242424242424242"},
}).encode()


def place(_):
    req = urllib.request.Request(f"{GATEWAY}/order", data=ORDER, headers={"content-type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 202, r.status
    return time.perf_counter() - start


def stats():
    with urllib.request.urlopen(f"{ANALYTICS}/stats", timeout=10) as r:
        return json.load(r)


base = stats()["orders_confirmed"]
t0 = time.perf_counter()
with ThreadPoolExecutor(CONCURRENCY) as pool:
    latencies = sorted(pool.map(place, range(N)))
t_accept = time.perf_counter() - t0
while stats()["orders_confirmed"] - base < N:
    if time.perf_counter() - t0 > DEADLINE_S:
        sys.exit(f"only {stats()['orders_confirmed'] - base} of {N} orders confirmed after {DEADLINE_S} s")
    time.sleep(0.05)
t_done = time.perf_counter() - t0
print(f"orders: {N}, concurrency: {CONCURRENCY}")
print(f"accepted (202 after Kafka ack): {N / t_accept:.0f} orders/s; "
      f"POST latency p50 {latencies[N // 2] * 1000:.1f} ms, p99 {latencies[int(N * 0.99) - 1] * 1000:.1f} ms")
print(f"all confirmed and counted by analytics after {t_done:.2f} s: {N / t_done:.0f} orders/s end to end")
