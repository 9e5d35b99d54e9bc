"""Child side of tests/faults: arm the preloaded faultshim from Python.

Importable only in an interpreter started with the shim in LD_PRELOAD (use
``faults.run_with_faults`` or the ``faultshim`` fixture's ``run``); imports
nothing but the standard library, so it does not disturb what it measures.

    from faults_child import fault, arm, disarm, calls, failed, watch

    with fault("unlinkat", nth=3, err="EIO", path=".json") as f:
        bus.consume_messages("bob", 10)
    assert f.failed == 1            # counts are frozen when the block ends

A rule is per call family ("openat" also covers openat64 and __openat_2, and
so on; see faultshim.c); arming a family again replaces its rule.
"""
from __future__ import annotations

import ctypes
import errno as _errno
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Optional, Union

Err = Union[int, str]

_lib = ctypes.CDLL(None, use_errno=True)  # the global scope: the preloaded shim is in it
try:
    _arm = _lib.faultshim_arm
except AttributeError:
    raise ImportError("faultshim is not preloaded (LD_PRELOAD); start this interpreter "
                      "with faults.run_with_faults or the faultshim fixture") from None
_arm.argtypes = [ctypes.c_char_p, ctypes.c_long, ctypes.c_int, ctypes.c_char_p]
_arm.restype = ctypes.c_int
_disarm = _lib.faultshim_disarm
_disarm.argtypes = [ctypes.c_char_p]
_disarm.restype = ctypes.c_int
_disarm_all = _lib.faultshim_disarm_all
_disarm_all.argtypes = []
_disarm_all.restype = None
_calls = _lib.faultshim_calls
_calls.argtypes = [ctypes.c_char_p]
_calls.restype = ctypes.c_long
_failed = _lib.faultshim_failed
_failed.argtypes = [ctypes.c_char_p]
_failed.restype = ctypes.c_long
_names = _lib.faultshim_names
_names.argtypes = []
_names.restype = ctypes.c_char_p

NAMES: tuple[str, ...] = tuple(_names().decode().split(","))


def errno_code(err: Err) -> int:
    """An errno value from a name ("EIO") or a number (0 means: only count)."""
    if isinstance(err, int):
        return err
    code = getattr(_errno, err, None)
    if not isinstance(code, int) or not err.startswith("E"):
        raise ValueError(f"unknown errno name {err!r}")
    return code


def arm(name: str, nth: int = 1, err: Err = "EIO", path: Optional[str] = None) -> None:
    """From now on count calls of ``name`` (only those whose path contains
    ``path``) and fail the ``nth`` with ``err``: nth > 0 that call only,
    nth == 0 every call, nth < 0 the -nth-th and every one after; err 0 only counts."""
    code = errno_code(err)
    if _arm(name.encode(), nth, code, path.encode() if path else None) != 0:
        e = ctypes.get_errno()
        why = "path filter too long" if e == _errno.ENAMETOOLONG else f"choose one of {', '.join(NAMES)}"
        raise ValueError(f"faultshim cannot arm {name!r} (err={err!r}): {why}")


def disarm(name: Optional[str] = None) -> None:
    """Stop failing and counting ``name`` (every family when None); counts stay readable."""
    if name is None:
        _disarm_all()
    elif _disarm(name.encode()) != 0:
        raise ValueError(f"faultshim knows no call {name!r}")


def calls(name: str) -> int:
    """Calls of ``name`` matching its filter since it was last armed."""
    n = _calls(name.encode())
    if n < 0:
        raise ValueError(f"faultshim knows no call {name!r}")
    return int(n)


def failed(name: str) -> int:
    """Calls of ``name`` the shim made fail since it was last armed."""
    n = _failed(name.encode())
    if n < 0:
        raise ValueError(f"faultshim knows no call {name!r}")
    return int(n)


class Fault:
    """One armed rule; ``calls``/``failed`` are live inside the block, frozen after it."""

    def __init__(self, name: str, nth: int, err: Err, path: Optional[str]) -> None:
        self.name, self.nth, self.err, self.path = name, nth, err, path
        self._final: Optional[tuple[int, int]] = None

    @property
    def calls(self) -> int:
        return self._final[0] if self._final else calls(self.name)

    @property
    def failed(self) -> int:
        return self._final[1] if self._final else failed(self.name)

    def __repr__(self) -> str:
        return (f"Fault({self.name!r}, nth={self.nth}, err={self.err!r}, path={self.path!r}, "
                f"calls={self.calls}, failed={self.failed})")


@contextmanager
def fault(name: str, nth: int = 1, err: Err = "EIO", path: Optional[str] = None) -> Iterator[Fault]:
    """Arms one rule around the block and disarms it after, even on an exception."""
    arm(name, nth, err, path)
    f = Fault(name, nth, err, path)
    try:
        yield f
    finally:
        _disarm(name.encode())
        f._final = (calls(name), failed(name))


def watch(name: str, path: Optional[str] = None) -> AbstractContextManager[Fault]:
    """Counts calls of ``name`` around a block without failing any."""
    return fault(name, nth=0, err=0, path=path)


__all__ = ["NAMES", "Fault", "arm", "calls", "disarm", "errno_code", "failed", "fault", "watch"]
