"""A CFN_GROUP member can write anything into the shared state file; values
no cfn-fast process writes are never trusted: a negative or inflated
counter, a negative claim count or an absurd capacity makes the next send
count the folder again instead of letting capacity be defeated."""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import pytest

from cfn_fast import InboxFull, MessageBus

SLOTS_OFF, SLOT_SIZE, AGENT_OFF = 32768, 512, 120
FIELD = {"count": 24, "claimed": 32, "capacity": 56}


def poke(base: Path, agent: str, field: str, value: int) -> None:
    """Writes one int64 field of the agent's slot, as another process could."""
    with open(base / ".cfn-fast.shm", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
        name = agent.encode() + b"\0"
        for i in range((len(m) - SLOTS_OFF) // SLOT_SIZE):
            at = SLOTS_OFF + i * SLOT_SIZE
            if m[at + AGENT_OFF:at + AGENT_OFF + len(name)] == name and struct.unpack_from("<I", m, at)[0] == 2:
                struct.pack_into("<q", m, at + FIELD[field], value)
                return
    raise AssertionError(f"no slot for {agent}")


@pytest.mark.parametrize(("field", "value"), [("count", -10**9), ("count", -1), ("claimed", -5),
                                              ("claimed", 10**6), ("capacity", 10**15), ("capacity", -3)])
def test_a_tampered_slot_cannot_defeat_capacity(make_bus, base: Path, field: str, value: int) -> None:
    bus = make_bus(max_inbox_size=5)
    bus.init_message_bus("bob")
    for i in range(3):
        bus.send_message("alice", "bob", "t", i)
    poke(base, "bob", field, value)
    sent = 0
    with pytest.raises(InboxFull):
        for i in range(20):
            bus.send_message("alice", "bob", "t", i)
            sent += 1
    assert sent == 2 and bus.message_count("bob") == 5 == bus.get_inbox_size("bob")


def test_outbox_copies_are_bounded(make_bus, base: Path) -> None:
    bus = make_bus(outbox_max=10)
    bus.init_message_bus("alice")
    bus.init_message_bus("bob")
    for i in range(100):
        bus.send_message("alice", "bob", "t", i)
    kept = sorted(n for n in os.listdir(base / "alice" / "outbox") if n.endswith(".json"))
    assert 9 <= len(kept) <= 11  # the limit, plus at most a tenth of it between two measurements
    newest = sorted(n for n in os.listdir(base / "bob" / "inbox") if n.endswith(".json"))[-len(kept):]
    assert kept == newest  # the oldest copies went


def test_outbox_max_zero_keeps_every_copy_as_the_original(make_bus, base: Path) -> None:
    bus = make_bus(outbox_max=0)
    bus.init_message_bus("alice")
    bus.init_message_bus("bob")
    for i in range(150):
        bus.send_message("alice", "bob", "t", i)
    assert bus.message_count("alice", "outbox") == 150
