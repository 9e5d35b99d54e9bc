"""Messages written by the bash original count before the counter says full,
and files a bash agent removes are seen by every capacity check, not only
by a send that happens to find the inbox full."""
from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import bash_original as orig
import cfn_fast
from cfn_fast import Config, InboxFull, MessageBus


def test_bash_messages_written_since_the_last_scan_count_before_any_place_is_given(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=15)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", {"n": 0})  # the counter says 1, and it is trusted
    orig.send_many(base, "carol", "bob", 13)       # the original writes 13 more behind its back
    sent = 0
    with pytest.raises(InboxFull):
        for i in range(20):
            bus.send_message("alice", "bob", "t", {"n": i})
            sent += 1
    assert sent == 1                                # 14 + 1 = 15: not 10 more (24 files)
    assert bus.message_count("bob") == 15 == bus.get_inbox_size("bob")


def test_bash_and_cfn_fast_senders_together_never_pass_capacity(make_bus, base: Path) -> None:
    """Capacity is strict among cfn-fast senders; bash senders (which do not
    look at capacity at all) are counted at the next cfn-fast send, so the
    inbox ends at capacity plus at most what bash wrote after the last one."""
    bus = make_bus(max_inbox_size=40)
    bus.init_message_bus("bob")
    bash = threading.Thread(target=orig.send_many, args=(base, "carol", "bob", 20))
    bash.start()
    full = 0
    for i in range(200):
        try:
            bus.send_message("alice", "bob", "t", {"n": i})
        except InboxFull:
            full += 1
    bash.join()
    assert full > 0
    files = bus.message_count("bob")
    assert 40 <= files <= 60
    assert bus.reconcile("bob").count == files


def test_a_bash_rm_is_seen_by_check_inbox_capacity(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=5)
    bus.init_message_bus("bob")
    for i in range(5):
        bus.send_message("alice", "bob", "t", {"n": i})
    assert not cfn_fast.check_inbox_capacity("bob")
    for name in sorted((base / "bob" / "inbox").glob("*.json"))[:3]:  # rm, as a bash agent would
        name.unlink()
    assert cfn_fast.check_inbox_capacity("bob")      # the full counter is healed, not believed
    assert cfn_fast.get_inbox_size("bob") == 2
    assert cfn_fast.get_inbox_utilization("bob") == 40


def test_bash_messages_are_seen_by_the_next_send_and_by_get_size(make_bus, base: Path) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    assert bus.get_inbox_size("bob") == 0
    orig.send_many(base, "carol", "bob", 7)
    out = subprocess.run([sys.executable, "-m", "cfn_fast", "get-size", "bob"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout == "7\n"                        # the CLI counts the folder
    bus.send_message("alice", "bob", "t", 7)         # a send counts them before it reserves
    assert bus.get_inbox_size("bob") == 8


def test_a_bash_clear_of_a_full_inbox_lets_a_plain_send_through(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=3)
    bus.init_message_bus("bob")
    for i in range(3):
        bus.send_message("alice", "bob", "t", {"n": i})
    orig.clear(base, "bob")
    MessageBus(config=bus.config).send_message("alice", "bob", "t", {"n": 9})  # another process's view
    assert bus.message_count("bob") == 1 == bus.get_inbox_size("bob")


def test_bash_and_cfn_fast_senders_on_one_pair_never_repeat_a_sequence(make_bus, base: Path) -> None:
    """cfn-fast reserves sequence numbers in the pair's file under the
    original's lock, a block at a time; the bash original reads and advances
    the same file under the same lock: no number is used twice, and each
    sender's own numbers rise with its sends."""
    bus = make_bus(max_inbox_size=10_000)
    bus.init_message_bus("bob")
    bash = threading.Thread(target=orig.send_many, args=(base, "alice", "bob", 150))
    bash.start()
    ours = [bus.send_message("alice", "bob", "t", {"n": i}) for i in range(600)]
    bash.join()
    messages = bus.receive_messages("bob")
    keys = [(m["timestamp"], m["sequence"]) for m in messages]
    assert len(messages) == 750 and len(set(keys)) == 750
    assert len({m["sequence"] for m in messages}) == 750
    mine = [int(mid.split("-")[2]) for mid in ours]
    assert mine == sorted(mine)
    theirs = [m["sequence"] for m in messages if m["msg_id"] not in set(ours)]
    assert len(theirs) == 150 and theirs == sorted(theirs)


def _cfn_sends(base: str, n: int, go: "mp.synchronize.Event") -> None:
    bus = MessageBus(config=Config.from_env(base_dir=base, max_inbox_size=100_000))
    go.wait(30)
    for i in range(n):
        bus.send_message("alice", "bob", "task", {"cfn": i})
        time.sleep(0.005)  # spread over the bash sender's run


def test_bash_and_cfn_fast_senders_of_one_pair_never_share_a_sequence(make_bus, base: Path) -> None:
    """Issue 15's promise about the sequence kept in blocks: a bash sender and
    two cfn-fast processes sending alice -> bob at the same time never produce
    the same (timestamp, sequence), nor the same sequence at all, and each
    sender's own messages keep their order."""
    bus = make_bus(max_inbox_size=100_000)
    bus.init_message_bus("alice")
    bus.init_message_bus("bob")
    ctx = mp.get_context("fork")
    go = ctx.Event()
    cfn = [ctx.Process(target=_cfn_sends, args=(str(base), 300, go)) for _ in range(2)]
    for p in cfn:
        p.start()
    go.set()
    bash_ids = orig.send_many(base, "alice", "bob", 150)  # meanwhile, in one bash process
    for p in cfn:
        p.join(120)
        assert p.exitcode == 0
    msgs = bus.receive_messages("bob")
    assert len(msgs) == 600 + 150 and len(bash_ids) == 150
    keys = [(m["timestamp"], m["sequence"]) for m in msgs]
    assert len(set(keys)) == len(keys)
    assert len({m["sequence"] for m in msgs}) == len(msgs)
    bash = sorted((m["payload"]["n"], m["sequence"]) for m in msgs if "n" in m["payload"])
    bash_seqs = [seq for _, seq in bash]  # in sending order
    assert len(bash_seqs) == 150 and bash_seqs == sorted(bash_seqs)
    cfn_seqs = [m["sequence"] for m in msgs if isinstance(m["payload"], dict) and "cfn" in m["payload"]]
    assert len(cfn_seqs) == 600
    assert min(bash_seqs) < max(cfn_seqs) and min(cfn_seqs) < max(bash_seqs)  # they did run together
