"""The shared-memory state file: a full /dev/shm is an error, never SIGBUS; a
file removed or replaced under running processes is noticed, so they all
enforce one capacity; a file open to others or emptied is refused; and one
inbox has one capacity however each process was configured."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cfn_fast import InboxFull, MessageBus, UnsafePath

STATE = ".cfn-fast.shm"


@contextlib.contextmanager
def small_tmpfs(options: str) -> Iterator[Path]:
    """A tmpfs of our own (root only), so 'full' can be made on demand."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = Path(tempfile.mkdtemp(prefix="cfn-tmpfs-"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        os.rmdir(d)


def run(code: str, base: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MESSAGE_BASE_DIR": str(base)})


def test_a_full_tmpfs_is_an_error_at_open_not_a_sigbus_later() -> None:
    """The state file is 4 MiB; on a 3 MiB tmpfs a sparse file would open fine
    and kill the process when a slot page is first touched."""
    with small_tmpfs("size=3m") as d:
        out = run("""
import errno
from cfn_fast import MessageBus, CfnOSError
bus = MessageBus()
try:
    for i in range(300):
        bus.init_message_bus(f"agent-{i}")
        bus.send_message("a", f"agent-{i}", "t", {"i": i})
except CfnOSError as e:
    print("refused", errno.errorcode[e.errno], e)
""", d / "messages")
        assert out.returncode == 0, (out.returncode, out.stderr)  # -7 would be SIGBUS
        assert out.stdout.startswith("refused ENOSPC") and "state file" in out.stdout
        assert not (d / "messages" / STATE).exists()  # nothing half-made left behind


def test_with_inodes_exhausted_a_consumer_still_drains() -> None:
    with small_tmpfs("size=64m,nr_inodes=64") as d:
        out = run("""
from cfn_fast import MessageBus, CfnError
bus = MessageBus()
bus.init_message_bus("bob")
sent = 0
try:
    while True:
        bus.send_message("alice", "bob", "t", {"i": sent})
        sent += 1
except CfnError as e:
    print("full", sent, type(e).__name__, e)
got = bus.consume_messages("bob")
print("drained", len(got), bus.get_inbox_size("bob"), bus.message_count("bob"))
bus.send_message("alice", "bob", "t", {"i": -1})
print("sent again")
""", d / "messages")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("full ") and "No space left" in lines[0]
        sent = int(lines[0].split()[1])
        assert sent > 10 and lines[1] == f"drained {sent} 0 0" and lines[2] == "sent again"


def test_a_state_file_removed_under_running_processes_is_noticed(make_bus, base: Path) -> None:
    first = make_bus(max_inbox_size=20)
    first.init_message_bus("bob")
    for i in range(10):
        first.send_message("alice", "bob", "t", {"i": i})
    (base / STATE).unlink()            # an operator "cleans up" /dev/shm
    second = make_bus(max_inbox_size=20)  # a process started after: it makes a new state file
    sent = 0
    for i in range(40):                # both send, in turn, until the inbox is full
        try:
            (first if i % 2 else second).send_message("alice", "bob", "t", {"i": i})
            sent += 1
        except InboxFull:
            pass
    assert sent == 10 and first.message_count("bob") == 20  # not 30: one state, one capacity
    assert first.get_inbox_size("bob") == 20 == second.get_inbox_size("bob")


def test_a_state_file_replaced_under_running_processes_is_noticed(make_bus, base: Path) -> None:
    first = make_bus(max_inbox_size=5)
    first.init_message_bus("bob")
    for i in range(5):
        first.send_message("alice", "bob", "t", {"i": i})
    other = base.parent / "elsewhere"
    MessageBus(other).init_message_bus_system()
    os.rename(other / STATE, base / STATE)  # a fresh, valid state file renamed over ours
    with pytest.raises(InboxFull):
        first.send_message("alice", "bob", "t", {"i": 9})  # the new file knows nothing: it scans, finds 5
    assert first.message_count("bob") == 5 and first.reconcile("bob").count == 5


@pytest.mark.parametrize(("mode", "refused"), [(0o644, True), (0o604, True), (0o620, True), (0o600, False)])
def test_a_state_file_open_to_others_is_refused(make_bus, base: Path, mode: int, refused: bool) -> None:
    make_bus().init_message_bus("bob")
    os.chmod(base / STATE, mode)
    bus = make_bus()
    if refused:
        with pytest.raises(UnsafePath, match=f"mode {mode:04o}"):
            bus.send_message("alice", "bob", "t", 1)
    else:
        bus.send_message("alice", "bob", "t", 1)


def test_one_inbox_has_one_capacity_whatever_each_process_was_told(make_bus) -> None:
    big, small = make_bus(max_inbox_size=20), make_bus(max_inbox_size=10)
    big.init_message_bus("bob")
    for i in range(10):
        big.send_message("alice", "bob", "t", {"i": i})
    assert small.get_inbox_capacity("bob") == 10  # the smaller, once anyone used it...
    with pytest.raises(InboxFull):
        big.send_message("alice", "bob", "t", {"i": 10})  # ...holds for everyone
    assert big.get_inbox_capacity("bob") == 10 and big.get_inbox_utilization("bob") == 100
    big.init_message_bus("bob")  # init sets it again, to the initialiser's
    assert big.get_inbox_capacity("bob") == 20
    big.send_message("alice", "bob", "t", {"i": 10})
    assert big.message_count("bob") == 11
