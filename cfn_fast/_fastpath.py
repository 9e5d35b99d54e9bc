"""The hot commands, run before click is imported.

Agent scripts call ``get-size``, ``check-capacity``, ``get-utilization``,
``send-backpressure``, ``bus send`` and ``bus count`` in loops, so a cold call
must cost little more than starting Python. ``run(argv)`` handles a plain call
of one of them (as ``commands.plain_values`` defines it) with nothing but the
C core: no click, no psutil, no json (payloads are checked in C). Anything
else, including ``--help`` and every mistake, returns None and goes to click,
which is built from the same table and calls the same handlers here.
"""
from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from cfn_fast import commands
from cfn_fast.commands import EXIT_NO, EXIT_OK, EXIT_USAGE, Command
from cfn_fast.errors import (
    CfnError,
    ConfigError,
    InboxNotFound,
    InvalidAgentId,
    InvalidArgument,
    InvalidMessageType,
    InvalidPayload,
)

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus

_BAD_INPUT = (InvalidAgentId, InvalidPayload, InvalidMessageType, InvalidArgument, ConfigError)


def exit_code_for(exc: BaseException) -> int:
    """2 for bad input, 1 for the original's "no" (full, timed out, not found)
    and for a failure of the system underneath (the message says which)."""
    if isinstance(exc, _BAD_INPUT):
        return EXIT_USAGE
    return EXIT_NO


def fail(cmd: Optional[Command], exc: BaseException) -> int:
    """Writes the one line that explains ``exc`` and returns its exit code."""
    where = " ".join((commands.PROG, *cmd.path)) if cmd is not None else commands.PROG
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    sys.stderr.write(f"{where}: {text}\n")
    return exit_code_for(exc)


def log(tag: str, message: str) -> None:
    """A log line on stderr in the original's shape: [HH:MM:SS] [TAG] message."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] [{tag}] {message}\n")


def out(text: str) -> None:
    sys.stdout.write(text + "\n")


def new_bus() -> "MessageBus":
    from cfn_fast.bus import MessageBus

    return MessageBus()


def check_params(cmd: Command, values: Sequence[object]) -> None:
    """Checks every agent id up front, so a bad id is bad input (exit 2) even
    where the command would otherwise just find nothing."""
    from cfn_fast import _core

    for p, v in zip(cmd.params, values):
        if p.kind == "agent" and isinstance(v, str):
            _core.check_agent(_core.agent_bytes(v, p.name))


# -- the hot commands --------------------------------------------------------

def inbox_size(bus: "MessageBus", agent: str) -> int:
    """The inbox's size from a scan of its folder (not the shared counter
    alone): a cold process costs ~30 ms anyway, a scan of 1,000 names ~0.1 ms,
    and this way a message a bash agent removed with rm is not counted. The
    scan also corrects the shared counter for everyone else."""
    try:
        return bus.reconcile(agent, force=False).count
    except InboxNotFound:
        return 0


def _get_size(bus: "MessageBus", agent: str) -> int:
    out(str(inbox_size(bus, agent)))
    return EXIT_OK


def _check_capacity(bus: "MessageBus", agent: str) -> int:
    size, cap = inbox_size(bus, agent), bus.config.max_inbox_size
    if size >= cap:
        log("RATE-LIMIT", f"Inbox {agent} at capacity: {size}/{cap} messages")
        return EXIT_NO
    return EXIT_OK


def _get_utilization(bus: "MessageBus", agent: str) -> int:
    out(str(inbox_size(bus, agent) * 100 // bus.config.max_inbox_size))
    return EXIT_OK


def _send_backpressure(bus: "MessageBus", sender: str, to: str, mtype: str, payload: str) -> int:
    out(bus.send_with_backpressure(sender, to, mtype, payload))
    return EXIT_OK


def _send(bus: "MessageBus", sender: str, to: str, mtype: str, payload: str) -> int:
    msg_id = bus.send_message(sender, to, mtype, payload)
    out(msg_id)
    log("MESSAGE-BUS", f"Sent message: {sender} -> {to} [{mtype}] ({msg_id})")
    return EXIT_OK


def _count(bus: "MessageBus", agent: str, box: str) -> int:
    out(str(bus.message_count(agent, box)))
    return EXIT_OK


HOT: dict[str, Callable[..., int]] = {
    "get_inbox_size": _get_size,
    "check_inbox_capacity": _check_capacity,
    "get_inbox_utilization": _get_utilization,
    "send_with_backpressure": _send_backpressure,
    "send_message": _send,
    "message_count": _count,
}


def invoke(cmd: Command, values: Sequence[str]) -> int:
    """Runs a hot command on parsed values; both front ends call this."""
    handler = HOT[cmd.function]
    bus = None
    try:
        check_params(cmd, values)
        bus = new_bus()
        return handler(bus, *values)
    except (CfnError, OSError) as e:  # InboxFull and BackpressureTimeout are the original's "no"
        return fail(cmd, e)
    finally:
        if bus is not None:
            bus.close()


def run(argv: Sequence[str]) -> Optional[int]:
    """The exit code of a plain hot command, or None to hand argv to click."""
    cmd, args = commands.split(argv)
    if cmd is None:
        return None
    values = commands.plain_values(cmd, args)
    if values is None:
        return None
    return invoke(cmd, values)


__all__ = ["HOT", "exit_code_for", "fail", "invoke", "inbox_size", "log", "new_bus", "run"]
