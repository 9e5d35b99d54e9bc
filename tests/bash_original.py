"""The bash original's writers, driven from Python: tests/shell/original.sh in a bash process.

    import bash_original as orig                 # tests/ is on sys.path under pytest
    orig.init(base, "bob")                       # inbox and outbox, 0755, as the original made them
    msg_id = orig.send(base, "alice", "bob", "task", '{"n": 1}')
    ids = orig.send_many(base, "alice", "bob", 100)      # payloads {"n":0} .. {"n":99}, one bash process
    orig.clear(base, "bob")                      # rm of the *.json files, no lock
    orig.count(base, "bob")                      # message_count
    with orig.stalled_sender(base, "alice", "bob") as p:  # holds bob's inbox/.lock, stopped
        ...                                      # p.resume() finishes the send and returns its msg_id
                                                 # leaving the block kills it (the lock is dropped)

Every call runs bash with MESSAGE_BASE_DIR=base and ``set -euo pipefail``,
as scripts sourcing the original ran. A failing call (a missing inbox, say)
raises subprocess.CalledProcessError with bash's stderr.
"""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Optional, Union

SCRIPT = Path(__file__).resolve().parent / "shell" / "original.sh"
PathLike = Union[str, "os.PathLike[str]"]


def _argv(body: str, *args: str) -> list[str]:
    # "$0" is the script, "$@" the arguments: nothing from a test is ever parsed as shell code
    return ["bash", "-c", f'set -euo pipefail; source "$0"; {body}', str(SCRIPT), *args]


def _env(base: PathLike) -> dict[str, str]:
    return dict(os.environ, MESSAGE_BASE_DIR=os.fspath(base))


def _run(base: PathLike, body: str, *args: str, timeout: float = 120) -> str:
    r = subprocess.run(_argv(body, *args), env=_env(base), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise subprocess.CalledProcessError(r.returncode, ["original.sh", body, *args], r.stdout, r.stderr)
    return r.stdout


def init(base: PathLike, agent: str) -> None:
    """init_message_bus: <base>/<agent>/inbox and outbox, 0755."""
    _run(base, 'init_message_bus "$1"', agent)


def send(base: PathLike, frm: str, to: str, type: str, payload: str) -> str:
    """send_message: one message as the original writes it; returns its msg_id."""
    return _run(base, 'send_message "$@"', frm, to, type, payload).strip()


def send_many(base: PathLike, frm: str, to: str, n: int, type: str = "task") -> list[str]:
    """n send_message calls in one bash process, payloads {"n":0} .. {"n":n-1};
    returns the msg_ids in sending order (so sequence order)."""
    out = _run(base, 'for ((i = 0; i < $3; i++)); do send_message "$1" "$2" "$4" "{\\"n\\":$i}"; done',
               frm, to, str(n), type, timeout=120 + n * 0.1)
    return out.split()


def clear(base: PathLike, agent: str) -> None:
    """clear_inbox: rm of the inbox's *.json files, without any lock."""
    _run(base, 'clear_inbox "$1"', agent)


def count(base: PathLike, agent: str, box: str = "inbox") -> int:
    """message_count: the *.json files in the agent's inbox (or outbox); 0 when it is missing."""
    return int(_run(base, 'message_count "$1" "$2"', agent, box))


class StalledSender(subprocess.Popen[str]):
    """A bash send_message stopped (SIGSTOP) while it holds the recipient's
    <inbox>/.lock exclusively, its sequence number taken, nothing written yet."""

    def resume(self, timeout: float = 60) -> str:
        """Lets it finish its send (SIGCONT); returns the msg_id."""
        self.send_signal(signal.SIGCONT)
        out, err = self.communicate(timeout=timeout)
        if self.returncode != 0:
            raise subprocess.CalledProcessError(self.returncode, self.args, out, err)
        return out.strip()

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if self.poll() is None:
            self.kill()  # a stopped process dies of SIGKILL too, and the kernel drops its lock
        super().__exit__(exc_type, exc, tb)


def stalled_sender(base: PathLike, frm: str, to: str, type: str = "task",
                   payload: str = '{"stalled":true}', timeout: float = 60) -> StalledSender:
    """Starts stalled_send and returns once it holds <base>/<to>/inbox/.lock
    (it prints a marker line, then stops itself). Resume it with ``.resume()``
    or kill it; used as a context manager, it is killed on leaving if still there."""
    p = StalledSender(_argv('stalled_send "$@"', frm, to, type, payload), env=_env(base),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = _read_line(p, timeout)
    if line != "locked\n":
        p.kill()
        out, err = p.communicate()
        raise RuntimeError(f"stalled_send did not take the lock: {line!r}{out!r} {err.strip()}")
    return p


def _read_line(p: subprocess.Popen[str], timeout: float) -> Optional[str]:
    assert p.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return None
    return p.stdout.readline()
