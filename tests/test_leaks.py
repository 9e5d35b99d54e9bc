"""The C core's entry points called thousands of times keep memory and file
descriptors flat (as psutil's test_memleaks does for its C core): a leak of
even a few bytes or one descriptor per call shows."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from cfn_fast import MessageBus, storage

PROC = psutil.Process()


def growth(call: Callable[[], object], times: int) -> tuple[int, int]:
    """RSS (bytes) and open descriptors gained over `times` calls, after a warm-up."""
    for _ in range(max(50, times // 10)):
        call()
    rss, fds = PROC.memory_info().rss, PROC.num_fds()
    for _ in range(times):
        call()
    return PROC.memory_info().rss - rss, PROC.num_fds() - fds


@pytest.fixture
def bus(make_bus) -> MessageBus:
    b = make_bus(max_inbox_size=100_000)
    b.init_message_bus("alice")
    b.init_message_bus("bob")
    b.send_message("alice", "bob", "t", {"warm": True})
    MessageBus(config=b.config.replace(max_inbox_size=1)).init_message_bus("full")
    b.send_message("alice", "full", "t", 0)
    return b


def _round_trip(bus: MessageBus) -> None:
    bus.send_message("alice", "bob", "t", {"n": 1, "pad": "x" * 500})
    assert len(bus.consume_messages("bob", 5)) >= 1


def _claim_ack(bus: MessageBus) -> None:
    bus.send_message("alice", "bob", "t", {"n": 2})
    bus.ack_messages("bob", bus.claim_messages("bob", 5))


CALLS: dict[str, Callable[[MessageBus], object]] = {
    "send+consume": _round_trip,
    "claim+ack": _claim_ack,
    "consume_raw (empty)": lambda b: b.consume_raw("bob", 10),
    "receive": lambda b: b.receive_messages("bob"),
    "get_inbox_size": lambda b: b.get_inbox_size("bob"),
    "get_inbox_capacity": lambda b: b.get_inbox_capacity("bob"),
    "message_count": lambda b: b.message_count("bob"),
    "reconcile": lambda b: b.reconcile("bob", force=True),
    "clear_inbox": lambda b: b.clear_inbox("bob"),
    "slots": lambda b: b.storage.slots(reuse=True),
    "counters": lambda b: b.storage.counters(),
    "rate read/publish": lambda b: b.storage.rate_publish(b.storage.rate_read()),  # type: ignore[arg-type]
    "cooldown": lambda b: b.storage.cooldown_try(b"leak-test", 1, 1),
    "metrics_write": lambda b: b.storage.metrics_write(b'{"m":1}\n', 1),
    "an invalid payload": lambda b: pytest.raises(Exception, b.send_message, "alice", "bob", "t", "{bad"),
    "a missing inbox": lambda b: pytest.raises(Exception, b.consume_messages, "nobody"),
    "a full inbox": lambda b: pytest.raises(Exception, b.send_message, "alice", "full", "t", 1),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_an_entry_point_called_thousands_of_times_leaks_nothing(bus: MessageBus, name: str) -> None:
    rss, fds = growth(lambda: CALLS[name](bus), 2000)
    assert fds == 0
    assert rss < 512 * 1024, f"{name}: RSS grew {rss} bytes over 2,000 calls"


def test_opening_and_closing_buses_leaks_nothing(base: Path) -> None:
    MessageBus(base).init_message_bus("bob")

    def cycle() -> None:
        b = MessageBus(base)
        b.get_inbox_size("bob")
        b.send_message("alice", "bob", "t", 1)
        b.close()

    rss, fds = growth(cycle, 500)
    assert fds == 0
    assert rss < 1024 * 1024, f"RSS grew {rss} bytes over 500 buses"
    assert storage  # the module under test
    assert os.path.isdir(base)
