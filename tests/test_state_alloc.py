"""Opening the state file allocates whatever it lacks, and only that: a file
built whole is opened without allocating its 4 MiB again (which cost every
cold CLI call a quarter of a millisecond), while one with holes (a sparse
copy, a planted file) is still filled before it is mapped, so a full /dev/shm
stays an error at open, never a SIGBUS later (tests/test_state_file.py)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STATE = ".cfn-fast.shm"
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(path: Path, offset: int, length: int) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    fd = os.open(path, os.O_RDWR)
    try:
        rc = libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, ctypes.c_long(offset),
                            ctypes.c_long(length))
        if rc != 0:
            pytest.skip(f"cannot punch a hole here: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def test_a_state_file_with_holes_is_filled_when_it_is_opened(make_bus, base: Path):
    make_bus().init_message_bus_system()
    state = base / STATE
    whole = os.stat(state).st_blocks
    punch_hole(state, 1 << 20, 1 << 20)  # a MiB of slots, past the header
    assert os.stat(state).st_blocks < whole
    make_bus().get_inbox_size("anyone")  # a fresh handle maps the file
    assert os.stat(state).st_blocks >= whole


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to see the system calls")
def test_a_state_file_built_whole_is_not_allocated_again(make_bus, base: Path, tmp_path: Path):
    make_bus().init_message_bus_system()
    trace = tmp_path / "trace"
    code = "from cfn_fast import MessageBus; MessageBus().get_inbox_size('anyone')"
    r = subprocess.run(["strace", "-f", "-e", "trace=fallocate", "-o", str(trace), sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ))
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip("strace cannot trace here")
    assert r.returncode == 0, r.stderr
    assert "fallocate" not in trace.read_text()
