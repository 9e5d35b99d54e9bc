"""What the command line prints: results on stdout, log lines on stderr in
the original's shape, and every failure as one line on stderr with its exit
code (0 success, 1 the original's "no" or a system error, 2 bad input)."""
from __future__ import annotations

import sys
import time
from typing import Sequence

from cfn_fast.errors import ConfigError, InvalidAgentId, InvalidArgument, InvalidMessageType, InvalidPayload

PROG = "cfn-fast"
EXIT_OK = 0     # success
EXIT_NO = 1     # the original's "no": full, failed after retries, not found
EXIT_USAGE = 2  # bad usage or bad input (click's convention)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it

_BAD_INPUT = (InvalidAgentId, InvalidPayload, InvalidMessageType, InvalidArgument, ConfigError)


def exit_code_for(exc: BaseException) -> int:
    """2 for bad input, 1 for the original's "no" (full, timed out, not found)
    and for a failure of the system underneath (the message says which)."""
    return EXIT_USAGE if isinstance(exc, _BAD_INPUT) else EXIT_NO


def fail(path: Sequence[str], exc: BaseException) -> int:
    """Writes the one line that explains ``exc`` for the command at ``path``; returns its exit code."""
    where = " ".join((PROG, *path))
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    sys.stderr.write(f"{where}: {text}\n")
    return exit_code_for(exc)


def log(tag: str, message: str) -> None:
    """A log line on stderr in the original's shape: [HH:MM:SS] [TAG] message."""
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] [{tag}] {message}\n")


def out(text: str) -> None:
    sys.stdout.write(text + "\n")


__all__ = ["EXIT_INTERRUPTED", "EXIT_NO", "EXIT_OK", "EXIT_USAGE", "PROG", "exit_code_for", "fail", "log", "out"]
