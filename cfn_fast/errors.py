"""Every exception cfn-fast raises derives from CfnError.

Each class also derives from the builtin a caller would naturally catch, so
``except ValueError`` or ``except TimeoutError`` work as well as ``except CfnError``.
"""
from __future__ import annotations


class CfnError(Exception):
    """Base of every cfn-fast error."""

    # A failed send that opened its recipient's circuit breaker says so here (1).
    circuit: int = 0


class _RetryAfter:
    retry_after: float = 0.0
    args: tuple[object, ...]

    def set_retry_after(self, seconds: float) -> None:
        """Sets retry_after and says it at the end of the message (the one
        line the command line prints)."""
        if seconds > 0:
            self.retry_after = seconds
            self.args = (f"{self.args[0] if self.args else ''}; retry after {seconds:.3g} s",)


class ConfigError(CfnError, ValueError):
    """A configuration value (usually an environment variable) is invalid."""


class InvalidArgument(CfnError, ValueError):
    """An argument to a call is out of range."""


class InvalidAgentId(CfnError, ValueError):
    """An agent id is empty, too long, starts with '.', or has a character outside [A-Za-z0-9._-]."""


class InvalidPayload(CfnError, ValueError):
    """A payload is not one strict RFC 8259 JSON value."""


class PayloadTooLarge(InvalidPayload):
    """A payload is over MAX_MESSAGE_BYTES."""


class InvalidMessageType(CfnError, ValueError):
    """A message type is empty, too long, or not UTF-8 text."""


class InboxNotFound(CfnError, FileNotFoundError):
    """The agent has no inbox (init_message_bus was never run for it)."""


class InboxFull(_RetryAfter, CfnError, BlockingIOError):
    """The inbox holds MAX_INBOX_SIZE messages; a plain send never evicts.
    ``retry_after`` is when a place is expected, in seconds: from the inbox's
    drain over the last second, or the base retry wait when nothing drained
    in it."""


class BackpressureTimeout(InboxFull, TimeoutError):
    """send_with_backpressure gave up: the inbox stayed full through every retry,
    or it could not have room before the call's deadline (``timeout=``).
    ``retries`` and ``waited_ns`` say how long it tried; ``locked`` is True when
    its budget ran out waiting for the inbox's lock rather than for room (then
    ``retry_after`` is 0: nothing is known of when the lock goes); ``deadline``
    is True when the call's ``timeout`` ended it rather than its retries."""

    retries: int = 0
    waited_ns: int = 0
    locked: bool = False
    deadline: bool = False  # the call's own timeout ended it, not its retries or budget


class InboxLocked(CfnError, TimeoutError):
    """Another process held the inbox's .lock (or a sequence lock) past
    LOCK_TIMEOUT_MS: a stalled bash sender, say. The message names the file
    and, where the kernel tells, the holder."""


class CircuitOpen(BackpressureTimeout):
    """The recipient's circuit breaker is open: its last sends failed (see
    CFN_BREAKER_*), so every process's sends to it fail at once, without
    touching the inbox, until ``retry_after`` seconds from now, when a probe
    send goes. It derives from BackpressureTimeout (and so InboxFull): code
    written for an inbox that stays full handles it as one."""


class BusClosed(CfnError):
    """The MessageBus was closed while this call was starting."""


class StateFileError(CfnError):
    """The shared-memory state file is foreign, truncated, or of another layout version."""


class TooManyAgents(CfnError):
    """The state file has no free inbox slot."""


class UnsafePath(CfnError, PermissionError):
    """A path is a symlink, of the wrong kind, or owned by another user; cfn-fast refuses it."""


class BackendUnavailable(CfnError, ConnectionError):
    """The bus's server (MESSAGE_BUS_URL) did not answer within REDIS_TIMEOUT_MS:
    unreachable, restarted or paused. The next call connects again. A send that
    fails this way may or may not have been delivered (its answer was lost)."""


class CfnOSError(CfnError, OSError):
    """A system call failed; errno and the operation are in the message."""


__all__ = [
    "BackendUnavailable",
    "BackpressureTimeout",
    "BusClosed",
    "CfnError",
    "CfnOSError",
    "CircuitOpen",
    "ConfigError",
    "InboxFull",
    "InboxLocked",
    "InboxNotFound",
    "InvalidAgentId",
    "InvalidArgument",
    "InvalidMessageType",
    "InvalidPayload",
    "PayloadTooLarge",
    "StateFileError",
    "TooManyAgents",
    "UnsafePath",
]
