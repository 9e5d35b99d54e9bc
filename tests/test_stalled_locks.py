"""A lock another process holds never outlasts a call's budget: a bash sender
stopped inside its locked write, or `flock -x` on the inbox's .lock, makes
cfn-fast calls fail with an error that says which file and who holds it,
within LOCK_TIMEOUT_MS (or a backpressure send's own budget), and a Python
caller can still interrupt the wait."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bash_original as orig
from cfn_fast import BackpressureTimeout, InboxLocked, MessageBus


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.fixture
def bob(make_bus) -> MessageBus:
    bus = make_bus(lock_timeout_ms=300)
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "t", {"n": 0})
    return bus


def test_a_stalled_bash_sender_makes_calls_fail_in_time_naming_the_lock_and_its_holder(
        bob: MessageBus, base: Path) -> None:
    with orig.stalled_sender(base, "carol", "bob") as stalled:
        for call in (lambda: bob.send_message("alice", "bob", "t", {"n": 1}),
                     lambda: bob.consume_messages("bob"),
                     lambda: bob.clear_inbox("bob"),
                     lambda: bob.reconcile("bob")):
            t0 = time.monotonic()
            with pytest.raises(InboxLocked) as info:
                call()
            assert time.monotonic() - t0 < 5
            text = str(info.value)
            assert f"{base}/bob/inbox/.lock" in text and f"pid {stalled.pid}" in text and "bash" in text
        assert bob.get_inbox_size("bob") == 1  # the shared counter needs no lock
        msg_id = stalled.resume()              # the bash sender finishes its write
    assert msg_id and bob.message_count("bob") == 2
    bob.send_message("alice", "bob", "t", {"n": 2})
    assert bob.get_inbox_size("bob") == 3


def test_a_backpressure_send_gives_up_within_its_own_budget(make_bus, base: Path) -> None:
    """Its budget ran out: a BackpressureTimeout that says which lock held it
    up and who holds it; a locked inbox is not a full one, so no overflow alert."""
    bus = make_bus(lock_timeout_ms=60_000, backpressure_wait_ms=50, backpressure_max_retries=4)
    bus.init_message_bus("bob")
    with orig.stalled_sender(base, "carol", "bob"):
        t0 = time.monotonic()
        with pytest.raises(BackpressureTimeout, match=r"wait budget \(200 ms\) ran out waiting for a lock: "
                                                      r".*inbox/\.lock is held by pid \d+ \(bash\)") as info:
            bus.send_with_backpressure("alice", "bob", "t", {"n": 1})
        assert info.value.locked
        assert time.monotonic() - t0 < 5  # 200 ms of budget, not the 60 s lock timeout
    assert not Path(bus.config.alert_log_file).exists()


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
@pytest.mark.parametrize("argv", [["get-size", "bob"], ["check-capacity", "bob"], ["bus", "send", "a", "bob", "t", "1"],
                                  ["bus", "consume", "bob"], ["send-backpressure", "a", "bob", "t", "1"]])
def test_the_cli_fails_with_one_line_when_flock_holds_the_inbox(bob: MessageBus, base: Path, argv: list[str]) -> None:
    lock = base / "bob" / "inbox" / ".lock"
    holder = subprocess.Popen(["flock", "-x", str(lock), "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while "WRITE" not in Path("/proc/locks").read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        out = cli(*argv, LOCK_TIMEOUT_MS="300", BACKPRESSURE_WAIT_MS="50", BACKPRESSURE_MAX_RETRIES="4")
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and ".lock is held by" in lines[0] and "Traceback" not in out.stderr
        assert out.stdout == ""
    finally:
        holder.kill()
        holder.wait()


def _holds_open(pid: int, suffix: str) -> bool:
    """Whether process pid has a file whose path ends with suffix open."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").endswith(suffix):
                return True
        except OSError:
            continue
    return False


def test_ctrl_c_interrupts_a_send_waiting_for_a_lock(bob: MessageBus, base: Path) -> None:
    with orig.stalled_sender(base, "carol", "bob"):
        p = subprocess.Popen([sys.executable, "-m", "cfn_fast", "bus", "send", "alice", "bob", "t", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "LOCK_TIMEOUT_MS": "60000"})
        deadline = time.monotonic() + 30
        while not _holds_open(p.pid, "/bob/inbox/.lock"):  # started, and inside its wait for the lock
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        time.sleep(0.05)
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=10)
        assert time.monotonic() - t0 < 3
        assert p.returncode == 130 and err.strip() == "cfn-fast: interrupted", err
    assert bob.message_count("bob") == 1  # nothing was half-sent


def test_a_library_caller_can_interrupt_the_wait(bob: MessageBus, base: Path) -> None:
    code = """
import signal, threading, os, time
from cfn_fast import MessageBus, Config
bus = MessageBus(config=Config.from_env().replace(lock_timeout_ms=60000))
threading.Timer(0.4, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    bus.consume_messages("bob")
except KeyboardInterrupt:
    print(round(time.monotonic() - t0, 1))
"""
    with orig.stalled_sender(base, "carol", "bob"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 3
    assert bob.message_count("bob") == 1


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.02, 0.15])
def test_ctrl_c_ends_a_wait_whenever_it_comes(bob: MessageBus, base: Path, delay: float) -> None:
    """Early (before the wait's first nap), between two system calls, or deep
    in it: a signal that came while C was not asleep is still seen, within
    the probe's 50 ms, not when the 60 s lock timeout runs out."""
    code = f"""
import os, signal, threading, time
from cfn_fast import MessageBus, Config
bus = MessageBus(config=Config.from_env().replace(lock_timeout_ms=60000))
bus.get_inbox_size("bob")                       # opened before the clock starts
t0 = time.monotonic()
try:
    threading.Timer({delay}, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
    for _ in range(3):
        bus.send_message("alice", "bob", "t", 1)
except KeyboardInterrupt:
    print(round(time.monotonic() - t0, 2))
"""
    with orig.stalled_sender(base, "carol", "bob"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    assert float(out.stdout) < delay + 2


def test_a_stalled_sequence_lock_is_bounded_too(bob: MessageBus, base: Path) -> None:
    """The original's sequence lock, held by a stalled bash sender of the same pair."""
    import fcntl

    fd = os.open(base / "alice" / ".sequences" / "bob.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(InboxLocked, match=r"\.sequences/bob\.lock is held by pid"):
            bob.send_message("alice", "bob", "t", {"n": 1})
    finally:
        os.close(fd)
    assert bob.get_inbox_size("bob") == 1 == bob.message_count("bob")  # its place was given back


def test_a_waiting_call_asks_its_probe_every_50_ms_and_stops_when_told(bob: MessageBus, base: Path) -> None:
    """The mechanism under Ctrl-C, with a probe of the test's own: a lock wait
    and a backpressure wait each end with -EINTR soon after it says stop."""
    import errno

    from cfn_fast._native import ffi, lib

    calls: list[float] = []

    @ffi.callback("int(void)")
    def probe() -> int:
        calls.append(time.monotonic())
        return 1 if len(calls) % 3 == 0 else 0

    waiting = MessageBus(config=bob.config.replace(lock_timeout_ms=5000))  # the probe, not the timeout, ends it
    h = waiting.storage.handle()
    lib.cfn_bus_set_probe(h, probe)
    try:
        with orig.stalled_sender(base, "carol", "bob"):  # a lock wait
            t0 = time.monotonic()
            assert lib.cfn_clear_inbox(h, b"bob", ffi.NULL) == -errno.EINTR
            assert 0.1 < time.monotonic() - t0 < 1.0 and len(calls) == 3  # the third ask, ~150 ms in
        full = MessageBus(config=bob.config.replace(max_inbox_size=1, backpressure_wait_ms=3_600_000))
        h2 = full.storage.handle()
        lib.cfn_bus_set_probe(h2, probe)
        opts = full.storage._backpressure
        res = ffi.new("cfn_send_result *")
        t0 = time.monotonic()
        assert lib.cfn_send(h2, b"alice", b"bob", b"t", 1, b"1", 1, opts, res, ffi.NULL) == -errno.EINTR
        assert 0.1 < time.monotonic() - t0 < 1.0 and len(calls) == 6   # not the hour's wait
    finally:
        lib.cfn_bus_set_probe(h, lib.cfn_py_probe)
        waiting.close()
