"""The adaptive limit (CFN_ADAPTIVE_LIMIT=delay): consumers measure each
message's sojourn (its age when taken; the id carries the microsecond it was
sent) and, once an interval, move the inbox's effective limit as Gradient2
moves a concurrency limit, so the queue holds about what drains within the
target; every sender, in every process, reserves below it. When the consumer
slows from 2,000 to 200 messages a second, the limit drops within 2 s, the
median sojourn stays under twice the target, and the consumer never finds
the inbox empty. (On Redis, whose round trips cap a consumer here near 1,000
messages a second, from 500 to 50 with a 100 ms target.)"""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time

import pytest

from cfn_fast import BackpressureTimeout, Config, InboxFull, MessageBus
from cfn_fast.overflow import OverflowMonitor

CTX = mp.get_context("fork")
FAST_S, SLOW_S = 2.5, 3.0
# per backend: messages the consumer takes a second, fast then slow, and the target sojourn (ms)
RATES = {"file": (2000, 200, 50), "redis": (500, 50, 100)}


def adaptive(target_ms: int) -> dict[str, object]:
    return dict(max_inbox_size=1000, adaptive_limit="delay", adaptive_target_ms=target_ms,
                adaptive_interval_ms=100, adaptive_floor=2, backpressure_wait_ms=100,
                backpressure_max_retries=100_000, breaker_failures=0)


def delivered_at(msg_id: str) -> float:
    """When a message went into the inbox: its id's second, and the microsecond in the hex after its sequence."""
    _, sec, _, tail = msg_id.split("-")[:4]
    return int(sec) + int(tail[:5], 16) / 1e6


def _sender(rank: int, until: float, target_ms: int) -> None:
    bus = MessageBus(config=Config.from_env().replace(**adaptive(target_ms)))
    while time.time() < until:
        # one sender id for all four: one sequence, so the inbox's (timestamp, sequence) order is the
        # order they went in, and the sojourns measured are the queue's, not the order's
        try:
            bus.send_with_backpressure("producer", "sink", "t", rank, timeout=max(0.001, until - time.time()))
        except BackpressureTimeout:  # no room expected before the run ends (a slow drain, a low limit):
            time.sleep(0.01)         # a real sender tries again later, and so does this one


def _consumer(start: float, fast: int, slow: int, target_ms: int,
              out: "mp.Queue[tuple[list[tuple[float, float]], list[float]]]") -> None:
    """`fast` messages a second (10 a tick) for FAST_S, then `slow` (1 a tick) for SLOW_S:
    each message's (when taken, its sojourn: how long it was in the inbox), and when a take came back short."""
    bus = MessageBus(config=Config.from_env().replace(**adaptive(target_ms)))
    every = 10 / fast
    got: list[tuple[float, float]] = []
    short: list[float] = []
    while time.time() < start:
        time.sleep(0.001)
    slow_at, end = start + FAST_S, start + FAST_S + SLOW_S
    tick = time.monotonic()
    while (now := time.time()) < end:
        want = 10 if now < slow_at else 1
        batch = bus.consume_messages("sink", want)
        got += [(now, now - delivered_at(m["msg_id"])) for m in batch]
        if len(batch) < want:  # the inbox ran dry under the consumer
            short.append(now - start)
        tick += every
        time.sleep(max(0.0, tick - time.monotonic()))
    out.put((got, short))


@pytest.mark.parametrize("backend", ["file", "redis"], indirect=True)
def test_a_consumer_that_slows_down_gets_a_lower_limit_and_a_short_queue(backend: str, make_bus) -> None:
    fast, slow, target_ms = RATES[backend]
    assert slow * 10 == fast  # the consumer takes 10 a tick, then 1 a tick
    bus = make_bus(**adaptive(target_ms))
    bus.init_message_bus("sink")
    start = time.time() + 0.3
    until = start + FAST_S + SLOW_S
    out: "mp.Queue[tuple[list[tuple[float, float]], list[float]]]" = CTX.Queue()
    consumer = CTX.Process(target=_consumer, args=(start, fast, slow, target_ms, out))
    senders = [CTX.Process(target=_sender, args=(r, until, target_ms)) for r in range(4)]
    for p in senders + [consumer]:
        p.start()
    limits: list[tuple[float, int]] = []
    while time.time() < until:
        f = bus.flow_status("sink")
        limits.append((time.time() - start, f.limit or f.capacity))
        time.sleep(0.05)
    got, short = out.get(timeout=60)
    for p in senders + [consumer]:
        p.join(30)
    fast_limit = statistics.median(lim for t, lim in limits if FAST_S - 0.5 <= t < FAST_S)
    later = [lim for t, lim in limits if FAST_S + 2.0 <= t]  # from 2 s after the slow-down
    slow_sojourns = [s for t, s in got if t - start >= FAST_S + 2.0]
    print(f"\n{backend}: limit {fast_limit} at {fast}/s, {statistics.median(later)} at {slow}/s; "
          f"median sojourn then {statistics.median(slow_sojourns) * 1000:.0f} ms (target {target_ms} ms); "
          f"takes that found the inbox short: {len([t for t in short if t < FAST_S])} at {fast}/s, "
          f"{len([t for t in short if t >= FAST_S])} at {slow}/s")
    assert fast_limit < 1000  # the limit is at work already (about fast x target)
    assert later[0] <= fast_limit / 2 and statistics.median(later) <= fast_limit / 2  # it dropped within 2 s
    assert statistics.median(slow_sojourns) < 2 * target_ms / 1000
    assert [t for t in short if t >= FAST_S] == []  # under the low limit the consumer never found it empty


def _plain_send(out: "mp.Queue[str]") -> None:
    bus = MessageBus(config=Config.from_env().replace(max_inbox_size=100))  # adaptive off here
    try:
        bus.send_message("other", "sink", "t", 0)
        out.put("sent")
    except InboxFull as e:
        out.put(str(e))


def test_every_sender_obeys_the_limit_and_the_monitor_reports_it(backend: str, make_bus) -> None:
    consumer = make_bus(**{**adaptive(50), "max_inbox_size": 100, "adaptive_interval_ms": 10})
    consumer.init_message_bus("sink")
    for i in range(100):
        consumer.send_message("producer", "sink", "t", i)
    time.sleep(0.3)  # they have waited 300 ms: six times the target
    consumer.consume_messages("sink", 1)  # the first interval begins
    time.sleep(0.02)
    for _ in range(10):
        consumer.consume_messages("sink", 1)  # the next ends it: the limit halves
    f = consumer.flow_status("sink")
    assert 1 <= f.limit <= 50 and f.sojourn_ms > 250 and f.count == 89
    out: "mp.Queue[str]" = CTX.Queue()
    p = CTX.Process(target=_plain_send, args=(out,))
    p.start()
    assert "is full" in out.get(timeout=60)  # 89 held, room for 11 more, yet another process is refused
    p.join(30)
    OverflowMonitor(consumer, 0.01).run_pass(reconcile=False)
    lines = [json.loads(x) for x in open(Config.from_env().metrics_file)]
    assert {m["metric"] for m in lines} >= {"inbox.limit", "inbox.sojourn_ms"}
    alerts = [json.loads(x) for x in open(Config.from_env().alert_log_file)]
    (delay,) = [a for a in alerts if a["alert"] == "inbox_delay_high"]
    assert f"held to {f.limit} of its 100 places" in delay["message"]
