"""The shared counter heals: drift from outside cfn-fast and reservations of
killed senders are reconciled by a directory scan, at the latest when it says full."""
from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from cfn_fast import Config, MessageBus, _core

CTX = mp.get_context("fork")


def counter(bus: MessageBus, agent: str) -> int:
    """The shared counter as it stands, without the healing a size read does."""
    return next(s.count for s in bus.storage.slots() if s.agent == agent)


def test_rm_behind_its_back_is_healed_when_the_counter_says_full(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=3)
    bus.init_message_bus("bob")
    for i in range(3):
        bus.send_message("alice", "bob", "t", i)
    for name in os.listdir(base / "bob" / "inbox"):  # a bash agent's clear_inbox
        if name.endswith(".json"):
            os.unlink(base / "bob" / "inbox" / name)
    assert counter(bus, "bob") == 3  # nobody told the counter...
    for i in range(3):
        bus.send_message("alice", "bob", "t", i)  # ...the first send sees "full", scans, and goes through
    assert bus.message_count("bob") == 3 == bus.get_inbox_size("bob")


def test_rm_behind_its_back_is_seen_by_the_next_size_read(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=3)
    bus.init_message_bus("bob")
    for i in range(3):
        bus.send_message("alice", "bob", "t", i)
    for name in os.listdir(base / "bob" / "inbox"):
        if name.endswith(".json"):
            os.unlink(base / "bob" / "inbox" / name)
    assert bus.get_inbox_size("bob") == 0  # a full counter over fewer files is healed, not believed


def test_files_written_by_bash_are_counted_at_the_next_scan(bus: MessageBus, base: Path) -> None:
    bus.send_message("alice", "bob", "t", 0)
    for i in range(4):
        (base / "bob" / "inbox" / f"msg-{int(time.time())}-{100 + i}.json").write_text('{"sequence": 1}')
    assert counter(bus, "bob") == 1
    res = bus.reconcile("bob")
    assert (res.before, res.count, res.files) == (1, 5, 5)
    assert bus.get_inbox_size("bob") == 5


def _send_one(base: str) -> None:
    MessageBus(base, Config.from_env().replace(max_inbox_size=3)).send_message("alice", "bob", "t", "{}")


def test_a_sender_killed_mid_send_leaks_no_capacity(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=3)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", "{}")  # creates alice's sequence files
    # Hold alice->bob's sequence lock: a second sender reserves its place,
    # then blocks inside the delivery, where we kill it.
    lock = os.open(base / "alice" / ".sequences" / "bob.lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)
    child = CTX.Process(target=_send_one, args=(str(base),))
    child.start()
    deadline = time.monotonic() + 10
    while bus.get_inbox_size("bob") < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert bus.get_inbox_size("bob") == 2  # one file + the child's reservation
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    fcntl.flock(lock, fcntl.LOCK_UN)
    os.close(lock)
    bus.send_message("alice", "bob", "t", "{}")  # counter 3 of 3 now, but only 2 files
    bus.send_message("alice", "bob", "t", "{}")  # "full" -> scan -> the leaked place is back
    assert bus.message_count("bob") == 3 == bus.get_inbox_size("bob")


def test_stale_temporary_files_of_dead_senders_are_removed(bus: MessageBus, base: Path) -> None:
    inbox = base / "bob" / "inbox"
    dead = CTX.Process(target=lambda: None)
    dead.start()
    dead.join()
    (inbox / f".cfn-{dead.pid}-0-00000000deadbeef.tmp").write_text("{half")
    (inbox / f".cfn-{os.getpid()}-0-00000000cafebabe.tmp").write_text("{in flight")
    old = inbox / "msg-1-001.json.tmp"
    old.write_text("{")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    res = bus.reconcile("bob")
    assert res.stale_tmp_removed == 2
    assert sorted(os.listdir(inbox)) == [".cfn-%d-0-00000000cafebabe.tmp" % os.getpid(), ".lock"]


def test_counters_are_shared_by_processes(make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    child = CTX.Process(target=lambda: [MessageBus(bus.base_dir).send_message("x", "bob", "t", i)
                                        for i in range(5)])
    child.start()
    child.join()
    assert child.exitcode == 0
    assert bus.get_inbox_size("bob") == 5
    assert _core.counter_get(bus.storage.handle(), _core.COUNTERS["sent"]) == 5


def test_an_unchanged_folder_is_trusted_and_any_change_is_seen(bus: MessageBus, base: Path) -> None:
    """A reconcile may skip reading a folder whose mtime has not moved since its
    last scan; every kind of change behind its back must still be counted."""
    inbox = base / "bob" / "inbox"
    for i in range(5):
        bus.send_message("alice", "bob", "t", i)
    time.sleep(0.06)  # the folder's clock is coarse: a scan is trusted only well after the last change
    assert bus.reconcile("bob").count == 5
    assert bus.reconcile("bob").count == 5  # nothing moved: the same answer, without reading the names
    victim = sorted(n for n in os.listdir(inbox) if n.endswith(".json"))[0]
    os.unlink(inbox / victim)  # a bash agent's rm
    assert bus.reconcile("bob").count == 4
    (inbox / "msg-1-001.json").write_text("{}")  # a bash agent's send, straight after
    assert bus.reconcile("bob").count == 5
    time.sleep(0.06)
    assert bus.reconcile("bob").count == 5
    os.rename(inbox / "msg-1-001.json", base / "stolen.json")
    assert bus.reconcile("bob").count == 4 == bus.message_count("bob")


def test_an_inbox_removed_and_made_again_behind_its_back(bus: MessageBus, base: Path) -> None:
    import shutil

    from cfn_fast import InboxNotFound

    bus.send_message("alice", "bob", "t", 1)  # bob's folders are now cached
    shutil.rmtree(base / "bob")  # a bash agent's cleanup
    with pytest.raises(InboxNotFound):
        bus.send_message("alice", "bob", "t", 2)
    MessageBus(bus.base_dir).init_message_bus("bob")  # another process makes it again
    msg_id = bus.send_message("alice", "bob", "t", 3)
    assert [m["msg_id"] for m in bus.receive_messages("bob")] == [msg_id]
