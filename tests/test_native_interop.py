"""The interop, stalled-lock, telemetry-file and bash-writer tests that run
the command line, run again with the native program.

Those tests start `python -m cfn_fast ...` in child processes. Collected here,
each child that would be `python -m cfn_fast` is the native cfn-fast instead
(with the same arguments and environment), so a bash agent's files, a stalled
bash sender's lock, a FIFO planted at METRICS_FILE and Ctrl-C meet the native
path as they met the Python one. Calls the program hands over reach Python
through it, which tests that road too.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import native_entry as ne
from cfn_fast import MessageBus
from test_bash_writers import test_bash_messages_are_seen_by_the_next_send_and_by_get_size  # noqa: F401
from test_claims_liveness import test_get_size_returns_a_killed_consumers_claims  # noqa: F401
from test_interop import (  # noqa: F401
    bash_written,
    test_a_bash_agent_reads_what_cfn_fast_sent_in_order,
    test_a_bash_consumers_rm_is_seen_by_cfn_fast,
    test_a_payload_with_its_own_timestamp_key_keeps_the_bash_order,
    test_cfn_fast_carries_on_the_originals_sequence,
    test_cfn_fast_counts_the_originals_messages_and_not_the_leftovers,
)
from test_stalled_locks import bob, test_ctrl_c_interrupts_a_send_waiting_for_a_lock  # noqa: F401
from test_telemetry_files import fifo, test_a_fifo_at_metrics_file_hangs_no_command  # noqa: F401

PYTHON_CLI = [sys.executable, "-m", "cfn_fast"]


class NativePopen(subprocess.Popen):  # type: ignore[type-arg]
    """Popen that starts the native program where `python -m cfn_fast` was asked for."""

    def __init__(self, args, *rest, **kw):  # type: ignore[no-untyped-def]
        if isinstance(args, (list, tuple)) and list(args[:3]) == PYTHON_CLI:
            args = [ne.native_program(), *args[3:]]
        super().__init__(args, *rest, **kw)


@pytest.fixture(autouse=True)
def native_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    ne.native_program()  # fails here, with the reason, when there is none
    monkeypatch.setattr(subprocess, "Popen", NativePopen)  # subprocess.run starts its children through it


def test_the_children_really_are_the_native_program(bus):
    r = subprocess.run([*PYTHON_CLI, "shell"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "\n_CFN_FAST_BIN='/" in r.stdout  # only the program writes its path in


def held_by_another(lock: Path) -> bool:
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")
@pytest.mark.parametrize("argv", [["get-size", "bob"], ["check-capacity", "bob"], ["bus", "send", "a", "bob", "t", "1"],
                                  ["bus", "consume", "bob"], ["send-backpressure", "a", "bob", "t", "1"]], ids=" ".join)
def test_the_cli_fails_with_one_line_when_flock_holds_the_inbox(bob, base: Path, argv: list[str]) -> None:
    """test_stalled_locks.py's test, waiting for this lock to be held (it waits for
    any write lock on the machine, which a program this fast can outrun)."""
    lock = base / "bob" / "inbox" / ".lock"
    lock.touch()
    holder = subprocess.Popen(["flock", "-x", str(lock), "sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not held_by_another(lock):
            assert time.monotonic() < deadline, "flock never took the lock"
            time.sleep(0.01)
        out = subprocess.run([*PYTHON_CLI, *argv], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "LOCK_TIMEOUT_MS": "300", "BACKPRESSURE_WAIT_MS": "50",
                                  "BACKPRESSURE_MAX_RETRIES": "4"})
        assert out.returncode == 1, out
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and ".lock is held by" in lines[0] and "Traceback" not in out.stderr
        assert out.stdout == ""
    finally:
        holder.kill()
        holder.wait()


# -- system calls failed on demand (tests/faults): the same line, nothing written ------------

def dynamically_linked(path: str) -> bool:
    """Whether the ELF program has an interpreter (PT_INTERP): only then can an
    LD_PRELOAD library reach its libc calls (.ci/sanitize's build is; an install's is static)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


@pytest.mark.parametrize("argv, faults", [
    (["bus", "send", "alice", "bob", "task", "{}"], "linkat:1:ENOSPC:/bob/inbox/"),
    (["send-backpressure", "alice", "bob", "task", "{}"], "linkat:1:EIO:/bob/inbox/"),
    (["get-size", "bob"], "getdents64:1:EIO:/bob/inbox"),
    (["bus", "count", "bob"], "getdents64:1:EIO:/bob/inbox"),
    (["check-capacity", "bob"], "openat:1:EACCES:/bob/inbox"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_a_failed_system_call_is_the_same_line_and_exit_1(faultshim, base: Path, argv, faults):
    program = ne.native_program()
    if not dynamically_linked(program):
        pytest.skip("a static program is out of an LD_PRELOAD library's reach (.ci/sanitize's build is dynamic)")
    env = faultshim.env(faults)
    got = {}
    for cmd in ([program], PYTHON_CLI):
        if base.exists():
            shutil.rmtree(base)
        with MessageBus() as b:
            b.init_message_bus("bob")
        before = ne.tree(base)
        r = subprocess.run([*cmd, *argv], capture_output=True, env=env, timeout=60)
        after = ne.tree(base)
        # nothing delivered, nothing left half-done (the locks a send takes stay, as always)
        assert not [p for p in set(after) - set(before) if p.endswith(".json") or "/.cfn-" in p], after
        got[cmd[0]] = (r.returncode, r.stdout, r.stderr, after)
    native, python = got[program], got[sys.executable]
    assert native == python
    assert native[0] == 1 and native[1] == b"" and native[2].count(b"\n") == 1 and b"[Errno " in native[2]
