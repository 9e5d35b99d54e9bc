"""Capacity is strict under concurrency, and backpressure waits, wakes and gives up as configured."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from pathlib import Path

import pytest

from cfn_fast import BackpressureTimeout, Config, InboxFull, MessageBus, _core

CTX = mp.get_context("fork")


def json_count(base: Path, agent: str) -> int:
    return sum(1 for n in os.listdir(base / agent / "inbox") if n.endswith(".json"))


def _sampler(base: Path, agent: str, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], json_count(base, agent))


def _plain_sender(base: str, rank: int, n: int, results: "mp.Queue[tuple[int, int]]") -> None:
    bus = MessageBus(base, Config.from_env().replace(max_inbox_size=100))
    ok = full = 0
    for i in range(n):
        try:
            bus.send_message(f"s{rank}", "sink", "t", i)
            ok += 1
        except InboxFull:
            full += 1
    results.put((ok, full))


def test_many_processes_never_overfill(base: Path, make_bus) -> None:
    make_bus().init_message_bus("sink")
    results: "mp.Queue[tuple[int, int]]" = CTX.Queue()
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=_sampler, args=(base, "sink", stop, peak))
    sampler.start()
    procs = [CTX.Process(target=_plain_sender, args=(str(base), r, 60, results)) for r in range(8)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    stop.set()
    sampler.join()
    delivered = sum(ok for ok, _ in outcomes)
    refused = sum(full for _, full in outcomes)
    assert delivered == 100 and refused == 8 * 60 - 100
    assert json_count(base, "sink") == 100
    assert peak[0] <= 100


def test_many_threads_never_overfill(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=50)
    bus.init_message_bus("sink")
    counts = {"ok": 0, "full": 0}
    lock = threading.Lock()

    def worker(rank: int) -> None:
        for i in range(40):
            try:
                bus.send_message(f"t{rank}", "sink", "t", i)
                key = "ok"
            except InboxFull:
                key = "full"
            with lock:
                counts[key] += 1

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts == {"ok": 50, "full": 270}
    assert json_count(base, "sink") == 50 == bus.get_inbox_size("sink")


def test_backpressure_gives_up_after_its_retries(make_bus, base: Path) -> None:
    # the retries bound it (a total budget far above 4 x 5 ms), so a busy machine, where a 5 ms wait
    # takes 7, cannot spend the default budget of 20 ms in three
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=5, backpressure_max_retries=4,
                   backpressure_max_total_ms=10_000)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    res = None
    with pytest.raises(BackpressureTimeout, match="after 4 retries"):
        res = bus.deliver("alice", "bob", "t", "1")
    assert res is None and json_count(base, "bob") == 1


def test_exponential_backoff_stays_inside_the_total_budget(make_bus) -> None:
    # waits 10, 20, 40, 80, 160 ms, then the rest of the 500 ms budget: 6 retries, not 50
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=10, backpressure_max_retries=50,
                   backpressure_backoff="exponential")
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    with pytest.raises(BackpressureTimeout, match="after 6 retries"):
        bus.send_with_backpressure("alice", "bob", "t", 1)


def test_decorrelated_jitter_stays_inside_the_total_budget(make_bus) -> None:
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=10, backpressure_max_retries=20,
                   backpressure_backoff="decorrelated")
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    with pytest.raises(BackpressureTimeout) as info:
        bus.send_with_backpressure("alice", "bob", "t", 1)
    retries = int(str(info.value).split("after ")[1].split(" ")[0])
    assert 1 <= retries < 20  # waits grow, so the 200 ms budget runs out before the retries do


def test_a_consumer_wakes_a_waiting_sender(make_bus) -> None:
    # the configured wait is a minute: only the futex wake can let this finish in time
    bus = make_bus(max_inbox_size=1, backpressure_wait_ms=60_000, backpressure_max_retries=1)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    result: list[_core.SendResult] = []
    sender = threading.Thread(target=lambda: result.append(bus.deliver("alice", "bob", "t", "1")))
    sender.start()
    while not any(s.agent == "bob" and s.waiters for s in bus.storage.slots()):
        time.sleep(0.001)
    assert [m["payload"] for m in bus.consume_messages("bob")] == [0]
    sender.join(timeout=30)
    assert not sender.is_alive()
    (res,) = result
    assert res.retries == 0 and res.wakeups >= 1
    assert [m["payload"] for m in bus.receive_messages("bob")] == [1]


def test_backpressure_success_after_clearing(make_bus) -> None:
    bus = make_bus(max_inbox_size=2, backpressure_wait_ms=20, backpressure_max_retries=100)
    bus.init_message_bus("bob")
    for i in range(2):
        bus.send_with_backpressure("alice", "bob", "t", i)
    timer = threading.Timer(0.1, bus.clear_inbox, args=("bob",))
    timer.start()
    bus.send_with_backpressure("alice", "bob", "t", 2)
    timer.join()
    assert [m["payload"] for m in bus.receive_messages("bob")] == [2]
