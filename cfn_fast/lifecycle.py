"""The monitors' lifecycle: how a monitor loop starts, sleeps and stops
(SIGTERM and SIGINT end it cleanly; a sleep is cut short), the pid files the
CLI's monitors write under <base>/.monitors/, and ``cleanup_rate_limiting``,
which stops the monitors of one base folder by those pid files, never by a
name pattern (the original's pkill -f: defect 9), and signals a pid only when
its start time and command line prove it is the monitor that wrote the file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

from cfn_fast import logs
from cfn_fast.defaults import resolve
from cfn_fast.errors import CfnOSError, InvalidArgument, UnsafePath
from cfn_fast.storage import proc_start

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus

PID_DIR = ".monitors"  # under the base folder; a dotfile, so never an agent


def check_interval(value: object, what: str = "interval") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0) \
            or value == float("inf"):
        raise InvalidArgument(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def check_iterations(value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"iterations must be a whole number >= 0 or None, not {value!r}")
    return value


class _Stop(BaseException):
    """Raised by the signal handler, only while a monitor sleeps."""


def _proc_cmdline(pid: int) -> Optional[str]:
    """sha256 (hex) of the process's command line as /proc shows it, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _pid_dir(bus: "MessageBus") -> str:
    return os.path.join(bus.base_dir, PID_DIR)


def _open_pid_dir(bus: "MessageBus", create: bool) -> Optional[int]:
    """A descriptor of <base>/.monitors, a folder of this user's (made 0700
    with ``create``; None when it does not exist and ``create`` is false).

    The base folder may be open to a CFN_GROUP; this folder never is, so no
    one else can put a pid file where ``cleanup`` would read it."""
    d = _pid_dir(bus)
    if create:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        if create:
            raise CfnOSError(errno.ENOENT, f"{d} vanished as it was made") from None
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{d} is a symlink or not a folder; refusing it") from None
        raise CfnOSError(e.errno or 0, f"open {d}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UnsafePath(f"{d} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}); "
                             "refusing it")
        if create and stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # setgid inherited from a CFN_GROUP base folder, or an older cfn-fast's 02770
    except BaseException:
        os.close(fd)
        raise
    return fd


class _PidRecord(NamedTuple):
    """What a pid file holds: ``<pid> <start-ticks> <kind> <cmdline-sha256>``."""
    pid: int
    start: int
    kind: str
    cmdline: str

    def line(self) -> bytes:
        return f"{self.pid} {self.start} {self.kind} {self.cmdline}\n".encode()


def _own_record(kind: str) -> _PidRecord:
    pid = os.getpid()
    start, cmdline = proc_start(pid), _proc_cmdline(pid)
    if start is None or cmdline is None:
        raise CfnOSError(0, f"cannot read /proc/{pid}: a pid file needs /proc to name this process")
    return _PidRecord(pid, start, kind, cmdline)


class Lifecycle:
    """Stops a monitor cleanly on SIGTERM and SIGINT (the pass in progress
    completes; a sleep is cut short) and keeps its pid file for the duration."""

    def __init__(self, bus: "MessageBus", kind: str, pidfile: bool,
                 stop: Optional[threading.Event] = None) -> None:
        self.bus, self.kind, self.want_pidfile, self.stop = bus, kind, pidfile, stop
        self.stopping = False
        self._sleeping = False
        self._old: dict[int, Any] = {}
        self.pidfile: Optional[str] = None

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self._sleeping:
            raise _Stop()

    def __enter__(self) -> "Lifecycle":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._on_signal)
        try:
            if self.want_pidfile:
                self.pidfile = self._write_pidfile()
        except BaseException:
            self._restore()
            raise
        return self

    def _write_pidfile(self) -> str:
        """<base>/.monitors/<kind>-<pid>.pid, 0600 whatever the umask or CFN_GROUP,
        complete from the moment it has its name (written aside, then renamed)."""
        b = self.bus
        b.init_message_bus_system()
        rec = _own_record(self.kind)
        name = f"{self.kind}-{rec.pid}.pid"
        tmp = f".{name}.tmp"
        dfd = _open_pid_dir(b, create=True)
        assert dfd is not None
        try:
            _unlink(tmp, dfd)  # left by a killed process that had this pid
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=dfd)
            try:
                os.fchmod(fd, 0o600)  # the mode asked for, whatever a default ACL made of it
                os.write(fd, rec.line())
            except BaseException:
                os.close(fd)
                _unlink(tmp, dfd)
                raise
            os.close(fd)
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        finally:
            os.close(dfd)
        return os.path.join(_pid_dir(b), name)

    def orphaned(self) -> bool:
        """True once the pid file is gone (the base folder was removed, say):
        no cleanup could find this monitor any more, so it stops by itself."""
        if (self.pidfile is not None and not os.path.exists(self.pidfile)) or \
                (self.stop is not None and self.stop.is_set()):
            self.stopping = True
        return self.stopping

    def sleep(self, seconds: float) -> None:
        if self.stopping or seconds <= 0:
            return
        self._sleeping = True
        try:
            if not self.stopping:
                if self.stop is not None:
                    self.stop.wait(seconds)
                else:
                    time.sleep(seconds)
        finally:
            self._sleeping = False

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> bool:
        self._sleeping = False
        try:
            if self.pidfile is not None:
                try:
                    os.unlink(self.pidfile)
                except FileNotFoundError:
                    pass
        finally:
            self._restore()
        return isinstance(exc, _Stop)


def report(what: str, e: BaseException, seen: set[str]) -> None:
    """A telemetry failure must not stop a monitor: say so once per kind (a
    warning of the cfn_fast.monitor logger; the command line prints it on stderr)."""
    text = f"{what}: {e}"
    if text not in seen and len(seen) < 100:
        seen.add(text)
        logs.get("monitor").warning("cfn-fast monitor: %s", text)



def _read_pidfile(dfd: int, name: str) -> Union[_PidRecord, str, None]:
    """The record in .monitors/<name>; or why the file is refused as not
    written by a monitor of this user (a str); or None when it is gone."""
    try:
        # O_NONBLOCK: a FIFO planted here must not hang cleanup
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        return "is a symlink" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_uid != os.geteuid():
            return f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"is writable by others than its owner (mode {stat.S_IMODE(st.st_mode):04o})"
        data = os.read(fd, 256)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    finally:
        os.close(fd)
    fields = data.split()
    try:
        pid, start, kind, cmdline = int(fields[0]), int(fields[1]), fields[2].decode("ascii"), \
            fields[3].decode("ascii")
        if len(fields) != 4 or pid <= 0 or start <= 0 or len(cmdline) != 64 or \
                cmdline.strip("0123456789abcdef"):
            raise ValueError
    except (IndexError, ValueError):  # UnicodeDecodeError is a ValueError
        return "does not hold '<pid> <start-ticks> <kind> <cmdline-sha256>'"
    return _PidRecord(pid, start, kind, cmdline)


def _names_its_writer(rec: _PidRecord) -> Union[bool, str]:
    """True when the pid still names the process that wrote the record (same
    start time, same command line); False when that process is gone (the
    file is stale); a str saying why when the pid names a live process that
    is not the writer: the file was rewritten, or its process exec'd another program."""
    if proc_start(rec.pid) != rec.start:
        return False
    if _proc_cmdline(rec.pid) != rec.cmdline:
        # read after the start time: a process that died and whose pid was reused in between
        # shows another command line too, so it is refused, never signalled
        return f"names pid {rec.pid}, a live process whose command line is not the one its monitor recorded"
    return True


def _refused(path: str, why: str, action: str) -> None:
    logs.get("monitor").warning("cfn-fast: refused pid file %s: it %s; %s", path, why, action)


def list_monitors(*, bus: Optional["MessageBus"] = None) -> list[dict[str, Any]]:
    """The monitors of this base folder whose pid files are sound (regular,
    this user's, writable by no one else) and name the live process that
    wrote them. A pid file refused as tampered is named on stderr, and left:
    listing changes nothing (``cleanup_rate_limiting`` removes it)."""
    b = resolve(bus)
    dfd = _open_pid_dir(b, create=False)
    if dfd is None:
        return []
    d = _pid_dir(b)
    out = []
    try:
        for name in sorted(os.listdir(dfd)):
            if name.startswith(".") or not name.endswith(".pid"):
                continue
            rec = _read_pidfile(dfd, name)
            verdict = _names_its_writer(rec) if isinstance(rec, _PidRecord) else rec
            if isinstance(verdict, str):
                _refused(os.path.join(d, name), verdict, "not listed")
            elif verdict is True and isinstance(rec, _PidRecord):
                out.append({"pid": rec.pid, "kind": rec.kind, "pidfile": os.path.join(d, name)})
    finally:
        os.close(dfd)
    return out


class _Target(NamedTuple):
    record: _PidRecord
    name: str
    pidfd: Optional[int]


def _pin(pid: int) -> Optional[int]:
    """A pidfd for the process holding ``pid`` now, taken before its identity
    is checked, so the signals reach the process that was checked even if it
    dies and its pid is reused in between. None without pidfds (kernel < 5.3),
    or when the process is already gone (the check then finds it stale)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _send_signal(t: _Target, sig: int) -> None:
    if t.pidfd is not None:
        signal.pidfd_send_signal(t.pidfd, sig)
    else:
        os.kill(t.record.pid, sig)


def _close_pidfd(t: _Target) -> None:
    if t.pidfd is not None:
        os.close(t.pidfd)


def cleanup_rate_limiting(*, bus: Optional["MessageBus"] = None, timeout: float = 5.0) -> int:
    """Stops this base folder's monitors: SIGTERM to each process a pid file
    names, then SIGKILL to any still running after ``timeout`` seconds.

    A pid is signalled only when its file is a regular file of this user's
    that no one else may write, and the pid still names the process that
    wrote it: the start time and the command line it recorded. Every other
    pid file is removed and nothing is signalled; one that names a live
    process it does not belong to, or that fails the file checks, is refused
    as tampered with one line on stderr. Raises UnsafePath when .monitors is
    a symlink, not a folder, or another user's. Returns how many it stopped."""
    b = resolve(bus)
    dfd = _open_pid_dir(b, create=False)
    if dfd is None:
        return 0
    d = _pid_dir(b)
    me = os.getpid()
    targets: list[_Target] = []
    try:
        for name in sorted(os.listdir(dfd)):
            if name.startswith(".") or not name.endswith(".pid"):
                continue
            rec = _read_pidfile(dfd, name)
            if rec is None or (isinstance(rec, _PidRecord) and rec.pid == me):
                continue  # removed meanwhile; or a monitor running in this very process
            if isinstance(rec, str):
                _refused(os.path.join(d, name), rec, "removed it, signalled nothing")
                _unlink(name, dfd)
                continue
            t = _Target(rec, name, _pin(rec.pid))
            verdict = _names_its_writer(rec)
            if verdict is True:
                try:
                    _send_signal(t, signal.SIGTERM)
                    targets.append(t)
                    continue
                except ProcessLookupError:  # it exited since the check: stale
                    verdict = False
                except PermissionError:  # not ours to signal after all: leave its file
                    _close_pidfd(t)
                    continue
            _close_pidfd(t)
            if isinstance(verdict, str):
                _refused(os.path.join(d, name), verdict, "removed it, signalled nothing")
            _unlink(name, dfd)
        deadline = time.monotonic() + timeout
        left = targets
        while left and time.monotonic() < deadline:
            time.sleep(0.01)
            left = [t for t in left if proc_start(t.record.pid) == t.record.start]
        for t in left:
            try:
                _send_signal(t, signal.SIGKILL)
            except OSError:
                pass
        for t in targets:
            _unlink(t.name, dfd)
    finally:
        for t in targets:
            _close_pidfd(t)
        os.close(dfd)
    if targets:
        b.storage.counter_add("monitors_stopped", len(targets))
    return len(targets)


def _unlink(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except (FileNotFoundError, IsADirectoryError):  # gone already; a folder is left (and was refused)
        pass


__all__ = ["Lifecycle", "PID_DIR", "check_interval", "check_iterations", "cleanup_rate_limiting",
           "list_monitors", "report"]
