"""The hot commands, run before click is imported.

Agent scripts call ``get-size``, ``check-capacity``, ``get-utilization``,
``send-backpressure``, ``bus send`` and ``bus count`` in loops (the rows of
commands.py flagged ``hot``), so through ``python -m cfn_fast`` a cold call
must cost little more than starting Python. ``run(argv)`` handles a plain
call of one of them (as ``commands.plain_values`` defines it) with nothing
but the C core: no click, no psutil, no json. Anything else, including
``--help`` and every mistake, returns None and goes to click, which is built
from the same table and runs the same handlers.
"""
from __future__ import annotations

from typing import Optional, Sequence

from cfn_fast import commands


def run(argv: Sequence[str]) -> Optional[int]:
    """The exit code of a plain hot command, or None to hand argv to click."""
    cmd, args = commands.split(argv)
    if cmd is None:
        return None
    values = commands.plain_values(cmd, args)
    if values is None:
        return None
    return commands.invoke(cmd, values)


__all__ = ["run"]
