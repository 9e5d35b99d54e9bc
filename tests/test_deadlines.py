"""Deadlines and retry hints: ``send_with_backpressure(..., timeout=s)``
bounds the whole call, a wait that cannot end before the deadline is not
started (tenacity#423's complaint), and ``InboxFull`` / ``BackpressureTimeout``
say when room is expected (``retry_after``), from how fast the inbox drained
over the last second, as measured by every consumer on the machine."""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time

import pytest

from cfn_fast import BackpressureTimeout, Config, InboxFull, InvalidArgument, MessageBus

CTX = mp.get_context("fork")


def _full_bus(make_bus, cap: int = 5, **settings: object) -> MessageBus:
    bus = make_bus(max_inbox_size=cap, **settings)
    bus.init_message_bus("bob")
    for i in range(cap):
        bus.send_message("alice", "bob", "t", i)
    return bus


def _drain(every_s: float, for_s: float, refill: bool) -> None:
    """A consumer in its own process: one message every ``every_s`` for
    ``for_s`` seconds; with ``refill`` it puts one back after each it takes,
    so the inbox is full again when it stops."""
    bus = MessageBus(config=Config.from_env())
    end = time.monotonic() + for_s
    while time.monotonic() < end:
        t = time.monotonic()
        if bus.consume_messages("bob", 1) and refill:
            bus.send_message("refill", "bob", "t", 0)
        time.sleep(max(0.0, every_s - (time.monotonic() - t)))


@pytest.fixture
def drained_at_10_per_s(backend: str, make_bus) -> MessageBus:
    """bob's inbox (capacity 5), drained at 10 messages a second by another
    process for the last 1.2 s, and full again, with nobody draining it now."""
    bus = _full_bus(make_bus, backpressure_wait_ms=20, backpressure_max_retries=10_000)
    p = CTX.Process(target=_drain, args=(0.1, 1.2, True))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and bus.get_inbox_size("bob") == 5
    return bus


def test_a_full_inbox_says_when_room_comes_and_a_send_that_cannot_wait_that_long_does_not(
        drained_at_10_per_s: MessageBus) -> None:
    bus = drained_at_10_per_s
    with pytest.raises(InboxFull) as info:
        bus.send_message("alice", "bob", "t", 1)
    e = info.value
    assert f"retry after {e.retry_after:.3g} s" in str(e)
    # one place freed every 0.1 s: the next is expected about 0.1 s on
    assert 0.05 <= e.retry_after <= 0.3
    # a wait that cannot end before the deadline is not started (tenacity#423)
    # (30 ms: far below the ~0.1 s the drain promises, and far above the time a loaded runner takes
    # to reach the first check, which would otherwise find the deadline already past)
    with pytest.raises(BackpressureTimeout, match="cannot have room before") as timed_out:
        bus.send_with_backpressure("alice", "bob", "t", 1, timeout=0.03)
    e = timed_out.value
    assert e.retries == 0 and e.waited_ns == 0  # it did not wait out its 30 ms only to fail
    assert e.deadline and not e.locked and 0.05 <= e.retry_after <= 0.3


def test_a_send_whose_room_comes_in_time_waits_for_it(backend: str, make_bus) -> None:
    bus = _full_bus(make_bus, backpressure_wait_ms=20, backpressure_max_retries=10_000)
    p = CTX.Process(target=_drain, args=(0.1, 1.0, False))
    p.start()
    try:
        assert bus.deliver("alice", "bob", "t", 1, timeout=5.0).msg_id
    finally:
        p.join(30)


def test_the_timeout_bounds_the_whole_call(backend: str, make_bus) -> None:
    # retries and budget far beyond the timeout; nothing drains, so each wait is the 20 ms retry wait
    bus = _full_bus(make_bus, backpressure_wait_ms=20, backpressure_max_retries=1_000_000,
                    backpressure_max_total_ms=600_000)
    t0 = time.monotonic()
    with pytest.raises(BackpressureTimeout) as info:
        bus.send_with_backpressure("alice", "bob", "t", 1, timeout=0.3)
    took = time.monotonic() - t0
    assert 0.2 <= took < 0.3 + 0.25, took
    e = info.value
    assert e.deadline and e.retries >= 5
    assert e.retry_after == pytest.approx(0.02)  # nothing drained: the base retry wait
    assert bus.get_inbox_size("bob") == 5


def test_with_no_drain_the_next_retry_wait_decides(make_bus) -> None:
    bus = _full_bus(make_bus, backpressure_wait_ms=1000)
    with pytest.raises(BackpressureTimeout, match=r"room expected in 1000 ms") as info:
        bus.send_with_backpressure("alice", "bob", "t", 1, timeout=0.2)
    assert info.value.retries == 0 and info.value.waited_ns == 0  # refused at once, no wait begun


def test_a_zero_timeout_is_one_try(make_bus) -> None:
    bus = make_bus(max_inbox_size=2)
    bus.init_message_bus("bob")
    assert bus.send_with_backpressure("alice", "bob", "t", 1, timeout=0)
    bus.send_message("alice", "bob", "t", 2)
    with pytest.raises(BackpressureTimeout):
        bus.send_with_backpressure("alice", "bob", "t", 3, timeout=0)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True, 10**9])
def test_a_bad_timeout_is_refused(bus: MessageBus, bad: object) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        bus.send_with_backpressure("alice", "bob", "t", 1, timeout=bad)  # type: ignore[arg-type]


def test_a_deadline_failure_is_not_an_overflow_alert_but_a_spent_budget_is(make_bus, base) -> None:
    bus = _full_bus(make_bus, cap=1, backpressure_wait_ms=5, backpressure_max_retries=1000)
    with pytest.raises(BackpressureTimeout) as info:
        bus.send_with_backpressure("alice", "bob", "t", 1, timeout=0.02)
    assert info.value.deadline
    alerts_file = Config.from_env().alert_log_file
    assert not _alerts(alerts_file)
    with pytest.raises(BackpressureTimeout) as info:
        make_bus(max_inbox_size=1, backpressure_wait_ms=5, backpressure_max_retries=3).send_with_backpressure(
            "alice", "bob", "t", 1)
    assert not info.value.deadline
    assert [a["alert"] for a in _alerts(alerts_file)] == ["inbox_overflow"]


def _alerts(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f]
    except FileNotFoundError:
        return []


def test_the_cli_prints_retry_after_on_the_error_line(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    monkeypatch.setenv("BACKPRESSURE_WAIT_MS", "250")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True,
                              timeout=60)

    assert cli("bus", "init", "bob").returncode == 0
    assert cli("bus", "send", "a", "bob", "t", "1").returncode == 0
    r = cli("bus", "send", "a", "bob", "t", "2")
    assert r.returncode == 1 and r.stderr.endswith("full (1 messages); retry after 0.25 s\n"), r.stderr
    assert len(r.stderr.splitlines()) == 1
