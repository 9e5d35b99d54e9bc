"""The state file's 16,384 inbox slots are reclaimed: agents made and removed
in turn, bash agents' rm -rf, and any number of pure senders never exhaust
them; and sleepers killed in their sleep do not stay counted."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from cfn_fast import Config, MessageBus, _core
from cfn_fast.monitors import get_all_inbox_stats

SLOTS = _core.lib.CFN_SLOTS
CTX = mp.get_context("fork")


@pytest.mark.slow
def test_agents_made_and_cleaned_up_in_turn_never_run_out_of_slots(make_bus) -> None:
    bus = make_bus(metrics_enabled=False)
    for i in range(SLOTS + 500):
        bus.init_message_bus(f"worker-{i}")
        bus.cleanup_message_bus(f"worker-{i}")
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 1)
    assert bus.get_inbox_size("bob") == 1
    assert len(bus.storage.slots()) == 1  # only bob's is in use


@pytest.mark.slow
def test_inboxes_removed_by_rm_are_freed_when_slots_run_short(make_bus, base: Path) -> None:
    bus = make_bus(metrics_enabled=False)
    for i in range(SLOTS):
        bus.init_message_bus(f"w{i}")
    for i in range(SLOTS):
        shutil.rmtree(base / f"w{i}")  # a bash agent's cleanup: cfn-fast is not told
    bus.init_message_bus("bob")        # no free slot: the ones whose folder is gone are freed
    bus.send_message("alice", "bob", "t", 1)
    assert get_all_inbox_stats(bus=bus) == [{"agent": "bob", "size": 1, "utilization": 0, "max_size": 1000}]


def test_pure_senders_take_no_slot(make_bus) -> None:
    bus = make_bus(metrics_enabled=False)
    bus.init_message_bus("bob")
    for i in range(300):
        bus.send_message(f"sender-{i}", "bob", "t", i)
    assert [s.agent for s in bus.storage.slots()] == ["bob"]


def test_a_slot_reused_by_another_agent_is_never_mistaken_for_the_old_one(make_bus, base: Path) -> None:
    """A process that cached an inbox's slot must not count into it once the
    agent is gone and the slot serves someone else."""
    a, b = make_bus(max_inbox_size=2), make_bus(max_inbox_size=2)
    a.init_message_bus("old")
    a.send_message("x", "old", "t", 1)  # a caches old's slot
    b.cleanup_message_bus("old")        # another process removes old: its slot is freed
    for i in range(50):                 # and handed to new agents
        b.init_message_bus(f"new-{i}")
    a.init_message_bus("old")
    a.send_message("x", "old", "t", 2)
    a.send_message("x", "old", "t", 3)
    assert a.get_inbox_size("old") == 2 == a.message_count("old")
    assert all(b.get_inbox_size(f"new-{i}") == 0 for i in range(50))


def _wait_forever(base: str) -> None:
    MessageBus(base, Config.from_env().replace(backpressure_wait_ms=60_000, backpressure_max_retries=10)) \
        .send_with_backpressure("alice", "bob", "t", 1)


def test_sleepers_killed_in_their_sleep_are_not_counted_for_ever(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=1)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", 0)
    sleepers = [CTX.Process(target=_wait_forever, args=(str(base),)) for _ in range(3)]
    for p in sleepers:
        p.start()

    def waiters() -> int:
        return next(s.waiters for s in bus.storage.slots() if s.agent == "bob")

    deadline = time.monotonic() + 20
    while waiters() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert waiters() == 3
    for p in sleepers:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    assert waiters() == 3       # nobody uncounted them
    bus.recover("bob")          # any full reconcile starts the count over
    assert waiters() == 0
    bus.consume_messages("bob")
    bus.send_message("alice", "bob", "t", 1)
