"""CFN_FSYNC=1: a delivery is durable before the send returns (fsync of the
file, then of its folder, as Maildir does), instead of the original's two
whole-system sync calls; without it, no fsync at all (tmpfs lives in memory)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")

SEND = """
import cfn_fast, os, sys
b = cfn_fast.MessageBus(sys.argv[1])
b.init_message_bus("a"); b.init_message_bus("b")
b.send_message("a", "b", "t", "{}")            # warm up: open folders and sequence files
os.write(2, b"--mark--")
b.send_message("a", "b", "t", '{"n": 1}')
os.write(2, b"--end--")
"""


def syscalls_of_one_send(base: str, fsync: str) -> list[str]:
    trace = Path(tempfile.mkdtemp()) / "trace"
    env = dict(os.environ, CFN_FSYNC=fsync, CFN_METRICS="0")
    subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=fsync,fdatasync,sync,syncfs,write",
                    sys.executable, "-c", SEND, base], env=env, check=True, capture_output=True, timeout=60)
    text = trace.read_text()
    shutil.rmtree(trace.parent)
    window = text[text.index("--mark--"):text.index("--end--")]
    return re.findall(r"\b(fsync|fdatasync|sync|syncfs)\(", window)


def test_fsync_makes_each_delivery_durable(tmp_path: Path) -> None:
    # the file (its inbox and outbox names share it), the inbox folder, the outbox folder;
    # never a whole-system sync
    assert syscalls_of_one_send(str(tmp_path / "disk-base"), "1") == ["fsync"] * 3


def test_no_fsync_by_default(tmp_path: Path) -> None:
    assert syscalls_of_one_send(str(tmp_path / "disk-base"), "0") == []
