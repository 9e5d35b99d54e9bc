"""A claim belongs to its consumer exactly while that consumer lives, judged
by a lock the kernel drops when it dies, not by a pid: a consumer in another
PID namespace keeps its claims, and a dead consumer's claims come back at
the next reconcile anyone makes, with no monitor running."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfn_fast import InboxFull, MessageBus

CLAIMER = """
import sys, time
from cfn_fast import MessageBus
bus = MessageBus()
got = bus.claim_messages("bob", int(sys.argv[1]))
print(len(got), flush=True)
time.sleep(600)
"""


def start_claimer(n: int, *, namespace: bool = False) -> subprocess.Popen[str]:
    """A consumer that claims n of bob's messages and hangs on to them."""
    argv = [sys.executable, "-c", CLAIMER, str(n)]
    if namespace:  # its own PID namespace, as in a container sharing the folder: it is pid 1 there
        argv = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", *argv]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline() if p.stdout else ""
    if not line.strip():
        p.kill()
        err = p.stderr.read() if p.stderr else ""
        if namespace:
            pytest.skip(f"cannot start a process in a new PID namespace here: {err.strip()[:200]}")
        raise AssertionError(err)
    assert int(line) == n
    return p


def kill(p: subprocess.Popen[str]) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    if p.stdout:
        p.stdout.close()
    if p.stderr:
        p.stderr.close()


def fill(bus: MessageBus, n: int) -> None:
    for i in range(n):
        bus.send_message("alice", "bob", "t", {"i": i})


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs unshare(1) and root for a PID namespace")
def test_a_consumer_in_another_pid_namespace_keeps_its_claims(make_bus) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    fill(bus, 4)
    p = start_claimer(3, namespace=True)
    try:
        # the host sees pid 1 in the claim folder's name space... and must not care
        assert bus.recover("bob") == 0
        assert [m["payload"]["i"] for m in bus.consume_messages("bob")] == [3]
        assert bus.get_inbox_size("bob") == 3  # still claimed, still counted
    finally:
        kill(p)  # unshare; the kernel then kills the consumer in the namespace (PDEATHSIG), a moment later
    back, deadline = 0, time.monotonic() + 10
    while back < 3 and time.monotonic() < deadline:
        back += bus.recover("bob")
        time.sleep(0.01)
    assert back == 3  # once it is gone, its claims come back, once
    assert sorted(m["payload"]["i"] for m in bus.consume_messages("bob")) == [0, 1, 2]
    assert bus.recover("bob") == 0


def test_a_killed_consumers_claims_come_back_to_the_next_consumer_without_a_monitor(make_bus) -> None:
    bus = make_bus(max_inbox_size=5)
    bus.init_message_bus("bob")
    fill(bus, 3)
    kill(start_claimer(3))
    assert bus.get_inbox_size("bob") == 3
    # nobody runs recover or a monitor: an empty-handed consumer looks for dead claims itself
    time.sleep(0.15)  # it looks at most every 100 ms
    assert sorted(m["payload"]["i"] for m in MessageBus().consume_messages("bob")) == [0, 1, 2]
    assert bus.get_inbox_size("bob") == 0


def test_a_sender_that_finds_the_inbox_full_returns_a_killed_consumers_claims(make_bus, base: Path) -> None:
    bus = make_bus(max_inbox_size=3)
    bus.init_message_bus("bob")
    fill(bus, 3)
    kill(start_claimer(3))
    assert bus.message_count("bob") == 0  # all three sit in the dead consumer's claim folder
    with pytest.raises(InboxFull):  # "full" makes the sender reconcile: they go back to the inbox
        bus.send_message("alice", "bob", "t", {"i": 9})
    assert bus.message_count("bob") == 3 == bus.get_inbox_size("bob")
    assert sorted(m["payload"]["i"] for m in bus.consume_messages("bob")) == [0, 1, 2]
    fill(bus, 3)  # room again


def test_get_size_returns_a_killed_consumers_claims(make_bus, base: Path) -> None:
    bus = make_bus()
    bus.init_message_bus("bob")
    fill(bus, 2)
    kill(start_claimer(2))
    out = subprocess.run([sys.executable, "-m", "cfn_fast", "get-size", "bob"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout == "2\n"
    assert bus.message_count("bob") == 2  # they are back in the inbox, not only counted
    assert not os.listdir(base / "bob" / ".claims")


def test_a_live_consumers_claims_are_never_taken(make_bus) -> None:
    bus = make_bus(max_inbox_size=2)
    bus.init_message_bus("bob")
    fill(bus, 2)
    p = start_claimer(2)
    try:
        for _ in range(3):  # every path that reconciles, again and again
            assert bus.recover("bob") == 0
            assert bus.consume_messages("bob") == []
            with pytest.raises(InboxFull):
                bus.send_message("alice", "bob", "t", {"i": 9})
            time.sleep(0.12)
        out = subprocess.run([sys.executable, "-m", "cfn_fast", "bus", "recover", "bob"], capture_output=True,
                             text=True, timeout=60, check=True)
        assert out.stdout == "0\n"
    finally:
        kill(p)


def test_a_forked_child_does_not_pass_for_its_parent(make_bus) -> None:
    """A child shares its parent's open files, so it must not share its
    consumer lock: once the child has used the bus (which notices the fork),
    the parent's claims come back when the parent dies, even while the child
    lives on. (Before its first call, a forked child still holds the lock;
    exec drops it, the descriptor being close-on-exec.)"""
    bus = make_bus()
    bus.init_message_bus("bob")
    fill(bus, 2)
    code = """
import os, sys, time
from cfn_fast import MessageBus
bus = MessageBus()
bus.claim_messages("bob", 2)
r, w = os.pipe()
if os.fork() == 0:
    bus.consume_messages("bob")      # the child uses the bus too
    os.write(w, b"x")
    time.sleep(600)
os.read(r, 1)
print(os.getpid(), flush=True)
time.sleep(600)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert p.stdout is not None and int(p.stdout.readline())
        os.kill(p.pid, signal.SIGKILL)  # the parent only; the child lives on
        p.wait(timeout=30)
        assert bus.recover("bob") == 2
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        if p.stdout:
            p.stdout.close()


def test_claims_survive_their_own_ack_across_handles_of_one_process(make_bus) -> None:
    """Each MessageBus has its own consumer identity: the claims are its own
    until it acks them, or until it is closed (then they go back)."""
    a, b = make_bus(), make_bus()
    a.init_message_bus("bob")
    fill(a, 2)
    got = a.claim_messages("bob")
    assert b.recover("bob") == 0 and b.ack_messages("bob", got) == 0  # not b's to ack
    assert a.ack_messages("bob", got[:1]) == 1
    a.close()  # a gave up its identity: the claim it still held goes back
    assert b.recover("bob") == 1
    assert [m["payload"]["i"] for m in b.consume_messages("bob")] == [1]
    assert json.dumps(b.consume_messages("bob")) == "[]"
