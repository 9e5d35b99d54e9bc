"""tests/shell/original.sh writes what the bash original writes, and holds its locks as it did.

Other tests use it (through tests/bash_original.py) as the bash agent beside
cfn-fast, so it has to be right: the files, their fields and order, the
per-pair sequence file, the inbox's .lock held exclusively while a message is
written (and all the while a stalled sender is stopped), and messages that
cfn-fast reads back in (timestamp, sequence) order.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import bash_original as orig
from cfn_fast import MessageBus

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("flock") is None,
                                reason="needs bash and flock(1)")

FIELDS = ["version", "msg_id", "from", "to", "timestamp", "sequence", "type", "payload", "requires_ack"]


def the_originals_file(msg_id: str, frm: str, to: str, ts: int, seq: int, type: str, payload: str) -> str:
    """The original's heredoc, one field per line, payload as given."""
    return (
        "{\n"
        '  "version": "1.1",\n'
        f'  "msg_id": "{msg_id}",\n'
        f'  "from": "{frm}",\n'
        f'  "to": "{to}",\n'
        f'  "timestamp": {ts},\n'
        f'  "sequence": {seq},\n'
        f'  "type": "{type}",\n'
        f'  "payload": {payload},\n'
        '  "requires_ack": false\n'
        "}\n"
    )


def message(base: Path, agent: str, msg_id: str, box: str = "inbox") -> dict:
    return json.loads((base / agent / box / f"{msg_id}.json").read_text())


def try_lock(path: Path, how: int) -> bool:
    """Whether this process can take ``how`` (LOCK_EX or LOCK_SH) on ``path`` at once."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def agents(base: Path) -> Path:
    for agent in ("alice", "bob", "carol"):
        orig.init(base, agent)
    return base


# --- the files --------------------------------------------------------------------------------------
def test_a_send_writes_the_originals_file_field_by_field(agents):
    base = agents
    payload = '{"a": [1, 2],   "s": "x y"}'  # odd spacing: embedded raw, not re-serialised
    msg_id = orig.send(base, "alice", "bob", "task", payload)
    m = re.fullmatch(r"msg-(\d+)-\d{3}", msg_id)
    assert m, msg_id
    text = (base / "bob" / "inbox" / f"{msg_id}.json").read_text()
    assert text == the_originals_file(msg_id, "alice", "bob", int(m[1]), 1, "task", payload)
    assert list(json.loads(text)) == FIELDS
    assert (base / "alice" / "outbox" / f"{msg_id}.json").read_text() == text
    assert sorted(os.listdir(base / "bob" / "inbox")) == [".lock", f"{msg_id}.json"]  # no temp file left
    for folder in ("bob", "bob/inbox", "bob/outbox"):
        assert stat.S_IMODE(os.stat(base / folder).st_mode) == 0o755  # as the original's chmod 755


def test_each_pairs_sequence_file_advances_under_its_own_lock(agents):
    base = agents
    seqs = base / "alice" / ".sequences"
    ids = orig.send_many(base, "alice", "bob", 3)
    assert [message(base, "bob", i)["sequence"] for i in ids] == [1, 2, 3]
    assert (seqs / "bob").read_text() == "3\n"
    assert (seqs / "bob.lock").exists()
    assert message(base, "carol", orig.send(base, "alice", "carol", "t", "1"))["sequence"] == 1
    assert (seqs / "bob").read_text() == "3\n"  # another pair, another file
    (seqs / "carol").write_text("41")  # as another writer may leave it: no newline
    assert message(base, "carol", orig.send(base, "alice", "carol", "t", "2"))["sequence"] == 42


def test_a_send_waits_for_the_pairs_sequence_lock(agents):
    base = agents
    orig.send(base, "alice", "bob", "task", "1")
    fd = os.open(base / "alice" / ".sequences" / "bob.lock", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another sender reading and advancing the sequence
        sent: list[str] = []
        t = threading.Thread(target=lambda: sent.append(orig.send(base, "alice", "bob", "task", "2")))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and orig.count(base, "bob") == 1
        assert (base / "alice" / ".sequences" / "bob").read_text() == "1\n"
    finally:
        os.close(fd)  # drops the lock
    t.join(timeout=60)
    assert message(base, "bob", sent[0])["sequence"] == 2


def test_bash_and_cfn_fast_senders_share_one_sequence_per_pair(agents):
    base = agents
    first = orig.send_many(base, "alice", "bob", 2)
    with MessageBus(base) as bus:
        middle = bus.send_message("alice", "bob", "task", {"from": "cfn-fast"})
    last = orig.send(base, "alice", "bob", "task", '"bash again"')
    assert [message(base, "bob", i)["sequence"] for i in first + [middle, last]] == [1, 2, 3, 4]


def test_concurrent_bash_senders_land_every_message_under_a_distinct_id(agents):
    base = agents
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(orig.send_many, base, frm, "carol", 60) for frm in ("alice", "bob", "alice")]
        ids = [i for r in runs for i in r.result()]
    # 180 names from 1,000 a second: the original's unchecked draw would collide (defect 2)
    assert len(set(ids)) == len(ids) == 180
    assert orig.count(base, "carol") == 180
    got = sorted((m["from"], m["sequence"]) for m in (message(base, "carol", i) for i in ids))
    assert got == sorted([("alice", s) for s in range(1, 121)] + [("bob", s) for s in range(1, 61)])
    assert (base / "alice" / ".sequences" / "carol").read_text() == "120\n"


def test_a_send_to_a_missing_inbox_fails_as_the_originals_did(agents):
    base = agents
    with pytest.raises(subprocess.CalledProcessError) as e:
        orig.send(base, "alice", "nobody", "task", "{}")
    assert e.value.returncode == 1 and "Recipient inbox not found: nobody" in e.value.stderr
    assert not (base / "alice" / ".sequences" / "nobody").exists()  # checked before the sequence


def test_clear_removes_the_messages_and_nothing_else(agents):
    base = agents
    orig.send_many(base, "alice", "bob", 4)
    leftover = base / "bob" / "inbox" / "msg-1700000000-001.json.tmp"
    leftover.write_text("{")
    assert orig.count(base, "bob") == 4 and orig.count(base, "alice", "outbox") == 4
    orig.clear(base, "bob")
    assert orig.count(base, "bob") == 0
    assert sorted(os.listdir(base / "bob" / "inbox")) == [".lock", leftover.name]
    assert orig.count(base, "alice", "outbox") == 4
    assert orig.count(base, "nobody") == 0
    with pytest.raises(subprocess.CalledProcessError):
        orig.clear(base, "nobody")


# --- the lock ---------------------------------------------------------------------------------------
def test_a_stalled_sender_holds_the_inbox_lock_exclusively_until_it_resumes(agents):
    base = agents
    lock = base / "bob" / "inbox" / ".lock"
    with orig.stalled_sender(base, "alice", "bob") as stalled:
        assert not try_lock(lock, fcntl.LOCK_EX)
        assert not try_lock(lock, fcntl.LOCK_SH)  # what a cfn-fast delivery takes
        assert subprocess.run(["flock", "-n", "-x", str(lock), "true"]).returncode == 1
        assert list((base / "bob" / "inbox").glob("*.json*")) == []  # nothing written yet
        assert (base / "alice" / ".sequences" / "bob").read_text() == "1\n"  # its sequence is taken

        # another bash sender to the same inbox waits for the lock
        second: list[str] = []
        t = threading.Thread(target=lambda: second.append(orig.send(base, "carol", "bob", "task", "2")))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and orig.count(base, "bob") == 0

        first = stalled.resume()
        t.join(timeout=60)
        assert not t.is_alive()
    assert message(base, "bob", first)["payload"] == {"stalled": True}
    assert message(base, "bob", second[0])["payload"] == 2
    assert try_lock(lock, fcntl.LOCK_EX)


def test_a_killed_stalled_sender_leaves_the_lock_free_and_no_file(agents):
    base = agents
    lock = base / "bob" / "inbox" / ".lock"
    with orig.stalled_sender(base, "alice", "bob") as stalled:
        assert not try_lock(lock, fcntl.LOCK_EX)
        stalled.kill()
        stalled.wait(timeout=10)
        assert try_lock(lock, fcntl.LOCK_EX)
    assert sorted(os.listdir(base / "bob" / "inbox")) == [".lock"]


# --- read back by cfn-fast --------------------------------------------------------------------------
def test_cfn_fast_reads_the_emulated_messages_in_timestamp_then_sequence_order(agents):
    base = agents
    ids = orig.send_many(base, "alice", "carol", 20)
    time.sleep(1.02 - time.time() % 1)  # at least two timestamps, so the order is not all sequence
    ids += orig.send_many(base, "bob", "carol", 5) + orig.send_many(base, "alice", "carol", 5)
    msgs = {i: message(base, "carol", i) for i in ids}
    expected = sorted(ids, key=lambda i: (msgs[i]["timestamp"], msgs[i]["sequence"]))
    assert len({m["timestamp"] for m in msgs.values()}) >= 2
    assert expected != sorted(ids)  # the ids' random digits do not sort this way by name (odds 1 in 20!)
    with MessageBus(base) as bus:
        assert bus.message_count("carol") == bus.get_inbox_size("carol") == 30
        received = bus.receive_messages("carol")
        assert [m["msg_id"] for m in received] == expected
        assert [m["payload"] for m in received] == [msgs[i]["payload"] for i in expected]
        assert all(list(m) == FIELDS for m in received)
        assert [m["msg_id"] for m in bus.consume_messages("carol")] == expected
    assert orig.count(base, "carol") == 0
