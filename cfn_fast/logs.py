"""Where the library's alerts and warnings go: the ``cfn_fast`` logger
(``cfn_fast.alerts`` for alerts, ``cfn_fast.monitor`` for what a monitor
could not do), never a bare print. A library that prints owns a terminal it
was not given; an application decides with ``logging`` where these go (the
package adds a NullHandler, so without its say they go nowhere but the alert
file). The command line decides for itself: it sends them to stderr in the
original's line, ``[ALERT <iso>] [<severity>] <type>: <message>``, coloured
by severity on a terminal.

``logging`` is imported on first use, not here: the hot commands pay nothing.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

NAME = "cfn_fast"
# the original's colours: critical red, warning yellow, anything else blue
_COLOURS = {"critical": "\033[0;31m", "error": "\033[0;31m", "warning": "\033[1;33m"}
_BLUE = "\033[0;34m"
_RESET = "\033[0m"

_state = {"ready": False, "stderr": False, "wanted": False}


def to_stderr() -> None:
    """The command line's choice: this process's alerts and warnings go to
    stderr, as the original printed them."""
    _state["wanted"] = True


def colour_wanted(stream: Any) -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def stderr_handler() -> "logging.Handler":
    """A handler writing each record's message as a line on stderr, an alert's
    in its severity's colour when stderr is a terminal (or FORCE_COLOR is set)."""
    import logging

    class Line(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = record.getMessage()
            severity = getattr(record, "severity", None)
            if severity is not None and colour_wanted(sys.stderr):
                return f"{_COLOURS.get(str(severity), _BLUE)}{text}{_RESET}"
            return text

    class Stderr(logging.StreamHandler):  # type: ignore[type-arg]
        """sys.stderr as it is when each record comes (a test's capture, a
        redirected stream), not as it was when the handler was made."""

        def emit(self, record: logging.LogRecord) -> None:
            self.stream = sys.stderr
            super().emit(record)

    handler = Stderr()
    handler.setFormatter(Line())
    return handler


def get(name: str) -> "logging.Logger":
    """The ``cfn_fast.<name>`` logger (with the command line's stderr handler
    on ``cfn_fast`` when the command line asked for it)."""
    import logging

    root = logging.getLogger(NAME)
    if not _state["ready"]:
        root.addHandler(logging.NullHandler())
        _state["ready"] = True
    if _state["wanted"] and not _state["stderr"]:
        root.addHandler(stderr_handler())
        root.setLevel(logging.INFO)
        _state["stderr"] = True
    return logging.getLogger(f"{NAME}.{name}")


LEVELS = {"info": 20, "warning": 30, "error": 40, "critical": 50}

__all__ = ["LEVELS", "NAME", "get", "stderr_handler", "to_stderr"]
