"""The bash-named API on one base folder: layout, formats and return values."""
from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

import cfn_fast
from cfn_fast import InboxFull, InboxNotFound, InvalidArgument, MessageBus

FIELDS = ["version", "msg_id", "from", "to", "timestamp", "sequence", "type", "payload", "requires_ack"]


def inbox_files(base: Path, agent: str) -> list[str]:
    return sorted(n for n in os.listdir(base / agent / "inbox") if n.endswith(".json"))


def test_init_creates_private_inbox_and_outbox(bus: MessageBus, base: Path) -> None:
    for sub in ("inbox", "outbox"):
        mode = stat.S_IMODE(os.stat(base / "alice" / sub).st_mode)
        assert mode == 0o700
    assert stat.S_IMODE(os.stat(base / ".cfn-fast.shm").st_mode) == 0o600
    bus.init_message_bus("alice")  # idempotent


def test_send_writes_one_file_in_the_original_format(bus: MessageBus, base: Path) -> None:
    before = int(time.time())
    msg_id = bus.send_message("alice", "bob", "task", '{"action": "process", "data": "test"}')
    assert msg_id.startswith(f"msg-{before}-") or msg_id.startswith(f"msg-{before + 1}-")
    assert inbox_files(base, "bob") == [f"{msg_id}.json"]
    raw = (base / "bob" / "inbox" / f"{msg_id}.json").read_text()
    msg = json.loads(raw)
    assert list(msg) == FIELDS
    # the original's heredoc layout, one envelope field per line, so bash readers that grep lines work
    assert raw.startswith('{\n  "version": "1.1",\n  "msg_id": "') and raw.endswith('  "requires_ack": false\n}\n')
    assert msg["version"] == "1.1" and msg["msg_id"] == msg_id
    assert (msg["from"], msg["to"], msg["type"], msg["sequence"]) == ("alice", "bob", "task", 1)
    assert msg["payload"] == {"action": "process", "data": "test"}
    assert msg["requires_ack"] is False
    assert isinstance(msg["timestamp"], int) and msg["timestamp"] >= before
    assert stat.S_IMODE(os.stat(base / "bob" / "inbox" / f"{msg_id}.json").st_mode) == 0o600


def test_sequence_is_a_plain_integer_file_per_pair(bus: MessageBus, base: Path) -> None:
    for _ in range(3):
        bus.send_message("alice", "bob", "t", "1")
    bus.send_message("bob", "alice", "t", "1")
    assert (base / "alice" / ".sequences" / "bob").read_text().strip() == "3"
    assert (base / "bob" / ".sequences" / "alice").read_text().strip() == "1"
    # a bash sender that wrote the file continues the same sequence
    (base / "alice" / ".sequences" / "bob").write_text("41\n")
    bus.send_message("alice", "bob", "t", "1")
    assert max(m["sequence"] for m in bus.receive_messages("bob")) == 42


def test_outbox_copy_only_when_the_sender_has_an_outbox(bus: MessageBus, base: Path) -> None:
    msg_id = bus.send_message("alice", "bob", "t", "{}")
    assert os.listdir(base / "alice" / "outbox") == [f"{msg_id}.json"]
    bus.send_message("carol", "bob", "t", "{}")  # a sender needs no inbox of its own
    assert not (base / "carol" / "outbox").exists()
    assert bus.message_count("bob") == 2


def test_message_ids_are_unique_and_sort_in_send_order(bus: MessageBus) -> None:
    ids = [bus.send_message("alice", "bob", "t", str(i)) for i in range(200)]
    assert len(set(ids)) == 200
    assert sorted(ids) == ids


def test_receive_is_sorted_and_leaves_messages(bus: MessageBus) -> None:
    for i in range(5):
        bus.send_message("alice", "bob", "t", {"i": i})
    got = bus.receive_messages("bob")
    assert [m["payload"]["i"] for m in got] == list(range(5))
    assert bus.message_count("bob") == 5
    assert bus.receive_messages("alice") == []


def test_consume_takes_oldest_first_and_removes_exactly_those(bus: MessageBus) -> None:
    for i in range(5):
        bus.send_message("alice", "bob", "t", i)
    first = bus.consume_messages("bob", 2)
    assert [m["payload"] for m in first] == [0, 1]
    assert bus.get_inbox_size("bob") == 3 and bus.message_count("bob") == 3
    assert [m["payload"] for m in bus.consume_messages("bob")] == [2, 3, 4]
    assert bus.consume_messages("bob") == []
    assert bus.consume_messages("bob", 0) == []
    with pytest.raises(InvalidArgument):
        bus.consume_messages("bob", -1)


def test_claim_then_ack(bus: MessageBus) -> None:
    for i in range(3):
        bus.send_message("alice", "bob", "t", i)
    claimed = bus.claim_messages("bob", 2)
    assert [m["payload"] for m in claimed] == [0, 1]
    assert bus.message_count("bob") == 1
    assert bus.get_inbox_size("bob") == 3  # claimed messages hold their place until acked
    assert bus.ack_messages("bob", claimed) == 2
    assert bus.get_inbox_size("bob") == 1
    assert bus.ack_messages("bob", [m["msg_id"] for m in claimed]) == 0  # acking twice is harmless


def test_clear_returns_how_many(bus: MessageBus, base: Path) -> None:
    for i in range(4):
        bus.send_message("alice", "bob", "t", i)
    (base / "bob" / "inbox" / "leftover.tmp").write_text("x")
    assert bus.clear_inbox("bob") == 4
    assert bus.get_inbox_size("bob") == 0
    assert (base / "bob" / "inbox" / "leftover.tmp").exists()  # only *.json are messages
    assert bus.clear_inbox("nobody") == 0


def test_counts_and_utilization(make_bus) -> None:
    bus = make_bus(max_inbox_size=8)
    bus.init_message_bus("bob")
    assert bus.check_inbox_capacity("bob") and bus.get_inbox_size("bob") == 0
    for i in range(7):
        bus.send_message("alice", "bob", "t", i)
    assert bus.get_inbox_utilization("bob") == 87  # floor of 7 * 100 / 8
    assert bus.check_inbox_capacity("bob")
    bus.send_message("alice", "bob", "t", 7)
    assert bus.get_inbox_utilization("bob") == 100
    assert not bus.check_inbox_capacity("bob")
    assert bus.message_count("alice", "outbox") == 0  # alice has no folder of her own
    assert bus.message_count("ghost") == 0


def test_missing_inbox(bus: MessageBus, make_bus) -> None:
    with pytest.raises(InboxNotFound):
        bus.send_message("alice", "nobody", "t", "{}")
    with pytest.raises(InboxNotFound):
        bus.send_with_backpressure("alice", "nobody", "t", "{}")
    with pytest.raises(InboxNotFound):
        bus.receive_messages("nobody")
    with pytest.raises(InboxNotFound):
        bus.consume_messages("nobody")
    assert bus.get_inbox_size("nobody") == 0
    assert bus.check_inbox_capacity("nobody")
    fresh = MessageBus(str(Path(bus.base_dir) / "not-there"))
    assert fresh.get_inbox_size("x") == 0
    with pytest.raises(InboxNotFound):
        fresh.send_message("a", "x", "t", "{}")
    assert not Path(fresh.base_dir).exists()  # reads never create anything


def test_full_inbox_refuses_plain_send_and_never_evicts(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=3)
    bus.init_message_bus("bob")
    ids = [bus.send_message("alice", "bob", "t", i) for i in range(3)]
    with pytest.raises(InboxFull):
        bus.send_message("alice", "bob", "t", 3)
    assert inbox_files(base, "bob") == sorted(f"{i}.json" for i in ids)
    assert (base / "alice" / ".sequences" / "bob").read_text().strip() == "3"  # no number spent


def test_cleanup_agent_and_system(bus: MessageBus, base: Path) -> None:
    bus.send_message("alice", "bob", "t", 1)
    bus.cleanup_message_bus("bob")
    assert not (base / "bob").exists()
    assert bus.get_inbox_size("bob") == 0
    bus.init_message_bus("bob")  # a re-created inbox is counted afresh
    assert bus.get_inbox_size("bob") == 0
    bus.send_message("alice", "bob", "t", 1)
    assert bus.get_inbox_size("bob") == 1
    bus.cleanup_message_bus_system()
    assert not base.exists()
    bus.init_message_bus_system()
    assert (base / ".cfn-fast.shm").exists()


def test_module_functions_follow_the_environment(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfn_fast.init_message_bus("a")
    cfn_fast.init_message_bus("b")
    msg_id = cfn_fast.send_with_backpressure("a", "b", "t", '{"x":1}')
    assert cfn_fast.get_inbox_size("b") == 1
    assert cfn_fast.receive_messages("b")[0]["msg_id"] == msg_id
    assert (base / "b" / "inbox" / f"{msg_id}.json").exists()
    monkeypatch.setenv("MAX_INBOX_SIZE", "1")
    assert not cfn_fast.check_inbox_capacity("b")
    with pytest.raises(InboxFull):
        cfn_fast.send_message("a", "b", "t", "{}")
    assert [m["msg_id"] for m in cfn_fast.consume_messages("b")] == [msg_id]


def test_python_values_are_serialised(bus: MessageBus) -> None:
    bus.send_message("alice", "bob", "t", {"list": [1, 2.5, None, True], "s": "é"})
    bus.send_message("alice", "bob", "t", b'"bytes are JSON text"')
    got = [m["payload"] for m in bus.receive_messages("bob")]
    assert got == [{"list": [1, 2.5, None, True], "s": "é"}, "bytes are JSON text"]
