"""Progress bars: drawn on stderr when it is a terminal (a pty here), never
when it is a pipe or a file."""
from __future__ import annotations

import errno
import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO, Optional, Union

CMD = [sys.executable, "-m", "cfn_fast"]


def on_pty(args: list[str], stdin: Optional[Path] = None, stdout: Optional[Path] = None,
           input_pipe: Optional[bytes] = None) -> tuple[int, str]:
    """Runs the command with stderr on a pseudo-terminal; returns its exit code and what the terminal got."""
    master, slave = pty.openpty()
    opened: list[BinaryIO] = []
    out_f: Union[int, BinaryIO] = subprocess.DEVNULL
    in_f: Union[int, BinaryIO] = subprocess.PIPE if input_pipe is not None else subprocess.DEVNULL
    if stdout:
        out_f = open(stdout, "wb")
        opened.append(out_f)
    if stdin:
        in_f = open(stdin, "rb")
        opened.append(in_f)
    try:
        p = subprocess.Popen(args, stdin=in_f, stdout=out_f, stderr=slave, close_fds=True)
        os.close(slave)
        if input_pipe is not None and p.stdin:
            p.stdin.write(input_pipe)
            p.stdin.close()
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError as e:  # EIO: the child closed the terminal
                if e.errno != errno.EIO:
                    raise
                break
            if not data:
                break
            chunks.append(data)
        code = p.wait(timeout=120)
    finally:
        os.close(master)
        for f in opened:
            f.close()
    return code, b"".join(chunks).decode(errors="replace")


def payloads(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(n)))
    return path


def test_send_batch_from_a_file_draws_a_bar_on_a_terminal(bus, tmp_path):
    src = payloads(tmp_path / "in.jsonl", 400)
    code, screen = on_pty(CMD + ["bus", "send-batch", "alice", "bob", "task"], stdin=src,
                          stdout=tmp_path / "ids.txt")
    assert code == 0, screen
    assert "sending" in screen and "100%" in screen
    assert len((tmp_path / "ids.txt").read_text().split()) == 400 == bus.get_inbox_size("bob")


def test_send_batch_stays_quiet_when_piped_or_when_its_length_is_unknown(bus, tmp_path):
    src = payloads(tmp_path / "in.jsonl", 50)
    with open(src, "rb") as f:
        r = subprocess.run(CMD + ["bus", "send-batch", "alice", "bob", "task"], stdin=f, capture_output=True,
                           timeout=120)
    assert r.returncode == 0
    err = r.stderr.decode()
    assert "%" not in err and "\r" not in err and len(err.splitlines()) == 1  # only the log line
    # from a pipe, the length is not known: no bar, even on a terminal
    code, screen = on_pty(CMD + ["bus", "send-batch", "alice", "bob", "task"], input_pipe=src.read_bytes())
    assert code == 0 and "sending" not in screen and "%" not in screen
    assert bus.get_inbox_size("bob") == 100


def test_recover_over_every_inbox_draws_a_bar_on_a_terminal(make_bus):
    bus = make_bus()
    for i in range(40):
        bus.init_message_bus(f"agent-{i}")
    code, screen = on_pty(CMD + ["bus", "recover"])
    assert code == 0, screen
    assert "recovering" in screen and "100%" in screen
    r = subprocess.run(CMD + ["bus", "recover"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "0\n" and r.stderr == ""


def test_the_demo_draws_its_bar_only_on_a_terminal():
    args = CMD + ["demo", "--senders", "1", "--messages", "30", "--capacity", "5"]
    code, screen = on_pty(args)
    assert code == 0 and "delivered" in screen and "%" in screen
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == ""
