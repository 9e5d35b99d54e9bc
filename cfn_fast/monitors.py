"""The overflow monitor, dynamic rate limiting and the monitors' lifecycle.

Everything a monitor decides lives in the base folder's shared-memory state:
the rate-limit settings every sender reads on its next retry, the alert
cooldowns, the counters. So an adjustment made by one process holds for every
process on the machine (the original ``export``ed it inside the monitor's own
shell: defect 8), and ``cleanup`` stops the monitors of one base folder by the
pid files they wrote, never by a name pattern (defect 9).

Every function takes an optional ``bus=`` (default ``cfn_fast.default_bus()``).
"""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

from cfn_fast import _core, telemetry
from cfn_fast.errors import CfnError, CfnOSError, InboxNotFound, InvalidArgument, UnsafePath

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus
    from cfn_fast.config import Config

PID_DIR = ".monitors"  # under the base folder; a dotfile, so never an agent
HIGH_UTILIZATION = 80  # percent: above it, inbox_high_utilization (warning)


def _resolve(bus: Optional["MessageBus"]) -> "MessageBus":
    return telemetry._resolve(bus)


def _check_interval(value: object, what: str = "interval") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0) \
            or value == float("inf"):
        raise InvalidArgument(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return float(value)


def _check_iterations(value: object) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"iterations must be a whole number >= 0 or None, not {value!r}")
    return value


# --- system load and tiers -----------------------------------------------------
def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1  # what nproc prints
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def get_system_load() -> float:
    """The 1-minute load average per CPU, two decimals (may exceed 1)."""
    try:
        one = os.getloadavg()[0]
    except (AttributeError, OSError):
        try:
            import psutil  # only where the OS call is missing

            one = psutil.getloadavg()[0]
        except Exception as e:  # ImportError, or psutil's own failure
            raise CfnOSError(0, f"cannot read the system load average: {e}") from None
    return round(one / _cpu_count(), 2)


class Tier(NamedTuple):
    name: str
    batch_size: int
    wait_ms: int


TIERS: dict[str, Tier] = {
    "high": Tier("high", 5, 200),
    "medium": Tier("medium", 10, 100),
    "low": Tier("low", 20, 50),
}


def choose_tier(load_per_cpu: float, config: "Config") -> Tier:
    """The seed's tiers: above the high threshold, above the medium one, else low."""
    if load_per_cpu > config.rate_limit_high_load_threshold:
        return TIERS["high"]
    if load_per_cpu > config.rate_limit_medium_load_threshold:
        return TIERS["medium"]
    return TIERS["low"]


def _stale_after_ns(config: "Config") -> int:
    # the same rule as the C send loop: MessageBus sets stale_after_ms = 3 x the interval
    return int(config.rate_limit_check_interval * 3000) * 1_000_000


def _fresh(rs: _core.RateSettings, config: "Config", now_ns: Optional[int] = None) -> bool:
    now = time.time_ns() if now_ns is None else now_ns
    return rs.updated_ns > 0 and now - rs.updated_ns <= _stale_after_ns(config)


def apply_dynamic_rate_limit(*, bus: Optional["MessageBus"] = None, load_per_cpu: Optional[float] = None,
                             interval: Optional[float] = None) -> dict[str, Any]:
    """One load check: picks the tier, publishes its batch size and wait in the
    shared state (every sender's next retry uses the wait; ``get_batch_size``
    returns the batch size) and emits system.load_per_cpu,
    rate_limit.batch_size and rate_limit.backpressure_wait_ms.
    ``load_per_cpu`` overrides the measured load (for tests and what-ifs)."""
    b = _resolve(bus)
    cfg = b.config
    if load_per_cpu is None:
        load = get_system_load()
    else:
        if isinstance(load_per_cpu, bool) or not isinstance(load_per_cpu, (int, float)) or \
                not (0 <= load_per_cpu < float("inf")):
            raise InvalidArgument(f"load_per_cpu must be a finite number >= 0, not {load_per_cpu!r}")
        load = float(load_per_cpu)
    every = cfg.rate_limit_check_interval if interval is None else _check_interval(interval)
    tier = choose_tier(load, cfg)
    now = time.time_ns()
    h = b._bus(create=True)
    assert h is not None
    _core.rate_publish(h, _core.RateSettings(tier.batch_size, tier.wait_ms, int(round(load * 1000)),
                                             now, int(every * 1000)))
    _core.counter_add(h, telemetry.COUNTERS["rate_limit_adjustments"], 1)
    lines = b"".join((
        telemetry.format_metric("system.load_per_cpu", int(round(load * 100)), "percent"),
        telemetry.format_metric("rate_limit.batch_size", tier.batch_size, "count"),
        telemetry.format_metric("rate_limit.backpressure_wait_ms", tier.wait_ms, "milliseconds"),
    ))
    telemetry.write_metric_lines(b, lines, 3)
    return {"load_per_cpu": load, "batch_size": tier.batch_size, "wait_ms": tier.wait_ms,
            "tier": tier.name, "updated_ns": now}


def current_rate_limit(*, bus: Optional["MessageBus"] = None) -> dict[str, Any]:
    """The settings in force now: published ones while fresh, else the configured ones."""
    b = _resolve(bus)
    cfg = b.config
    h = b._bus()
    rs = _core.rate_read(h) if h is not None else _core.RateSettings(0, 0, 0, 0, 0)
    fresh = _fresh(rs, cfg)
    return {
        "published": fresh,
        "batch_size": rs.batch_size if fresh and rs.batch_size > 0 else cfg.batch_size,
        "wait_ms": rs.wait_ms if fresh and rs.wait_ms > 0 else cfg.backpressure_wait_ms,
        "load_per_cpu": rs.load_milli / 1000 if rs.updated_ns else None,
        "age_ms": (time.time_ns() - rs.updated_ns) // 1_000_000 if rs.updated_ns else None,
        "stale_after_ms": _stale_after_ns(cfg) // 1_000_000,
    }


def get_batch_size(*, bus: Optional["MessageBus"] = None) -> int:
    """The published batch size while fresh (updated within three check
    intervals), else the configured CFN_BATCH_SIZE."""
    b = _resolve(bus)
    h = b._bus()
    if h is not None:
        rs = _core.rate_read(h)
        if rs.batch_size > 0 and _fresh(rs, b.config):
            return int(rs.batch_size)
    return b.config.batch_size


# --- inbox statistics ----------------------------------------------------------
def get_all_inbox_stats(*, bus: Optional["MessageBus"] = None) -> list[dict[str, Any]]:
    """``{"agent","size","utilization","max_size"}`` for every agent folder with
    an inbox, sorted by agent, from the shared counters (no directory scans
    once an inbox is tracked)."""
    b = _resolve(bus)
    agents = b.list_agents()
    cap = b.config.max_inbox_size
    h = b._bus()
    known: dict[str, int] = {}
    if h is not None and len(agents) > 32:  # one C call beats one per agent
        known = {s.agent: s.count for s in _core.slots(h)}
    out = []
    for agent in agents:
        size = known.get(agent, -1)
        if size < 0:
            try:
                size = b.get_inbox_size(agent)
            except InboxNotFound:  # removed since the listing
                continue
        out.append({"agent": agent, "size": size, "utilization": size * 100 // cap, "max_size": cap})
    return out


# --- lifecycle -----------------------------------------------------------------
class _Stop(BaseException):
    """Raised by the signal handler, only while a monitor sleeps."""


def _proc_start(pid: int) -> Optional[int]:
    """The process's start time (clock ticks since boot), or None when it is
    gone or a zombie. With the pid, it names one process: a reused pid has another."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


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
    start, cmdline = _proc_start(pid), _proc_cmdline(pid)
    if start is None or cmdline is None:
        raise CfnOSError(0, f"cannot read /proc/{pid}: a pid file needs /proc to name this process")
    return _PidRecord(pid, start, kind, cmdline)


class _Lifecycle:
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

    def __enter__(self) -> "_Lifecycle":
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


def _report(what: str, e: BaseException, seen: set[str]) -> None:
    """A telemetry failure must not stop a monitor: say so once per kind on stderr."""
    import sys

    text = f"{what}: {e}"
    if text not in seen and len(seen) < 100:
        seen.add(text)
        print(f"cfn-fast monitor: {text}", file=sys.stderr, flush=True)


class PassResult(NamedTuple):
    inboxes: int
    lines: int
    alerts: int
    reconciled: int


class OverflowMonitor:
    """One overflow check per ``run_pass``: every tracked inbox's counter gives
    inbox.size and inbox.utilization (two lines each, one write for all) and
    the alerts (inbox_overflow at 100 %, inbox_high_utilization above 80 %).

    Reconciling runs on a slower cadence: the first pass reconciles every
    inbox of the base folder against a directory scan (and finds inboxes the
    state does not track yet, made by bash agents); after that each pass
    reconciles the next 1/``reconcile_every`` of them, so every inbox is
    scanned once per ``reconcile_every`` passes and no pass pays for a full
    sweep. An inbox another process reconciled within the last half round is
    left alone."""

    def __init__(self, bus: "MessageBus", interval: float = 5.0, reconcile_every: int = 12) -> None:
        if isinstance(reconcile_every, bool) or not isinstance(reconcile_every, int) or reconcile_every < 1:
            raise InvalidArgument(f"reconcile_every must be a whole number >= 1, not {reconcile_every!r}")
        self.bus = bus
        self.interval = interval
        self.reconcile_every = reconcile_every
        self.passes = 0
        self._gone: set[str] = set()  # tracked agents whose inbox was missing in the last round
        self._round: list[str] = []  # agent folders still to reconcile in this round, last first
        self._round_step = 1
        self._round_tracked: set[str] = set()
        self._round_seen: set[str] = set()
        self._round_fresh: set[str] = set()
        self._size = telemetry.LineTemplate("inbox.size", "count", "agent")
        self._util = telemetry.LineTemplate("inbox.utilization", "percent", "agent")
        self.errors: set[str] = set()
        self._slots = _core.new_slot_buffer()  # reused every pass: no 2.7 MB allocation per pass

    def _folders(self) -> list[str]:
        try:
            with os.scandir(self.bus.base_dir) as it:
                return [e.name for e in it if e.name[0] != "." and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def _reconcile(self, h: _core.Handle, names: list[str], fresh: set[str], seen: set[str]) -> int:
        """Reconciles each named inbox (skipping those in ``fresh``); adds the
        ones that exist to ``seen``; returns how many were scanned."""
        done = drift = 0
        reconcile = _core.reconcile
        for name in names:
            if name in fresh:
                seen.add(name)
                continue
            try:
                r = reconcile(h, name.encode("ascii"), True)
            except InboxNotFound:  # an agent folder without an inbox (a sender's)
                continue
            except (CfnError, UnicodeEncodeError) as e:  # not an agent id, an unsafe folder, ...
                if not isinstance(e, ValueError):
                    _report("reconcile", e, self.errors)
                continue
            seen.add(name)
            if r.scanned:
                done += 1
                if r.before >= 0 and r.before != r.count:
                    drift += 1
        if done:
            _core.counter_add(h, telemetry.COUNTERS["monitor_reconciles"], done)
        if drift:
            _core.counter_add(h, telemetry.COUNTERS["inbox_drift"], drift)
        return done

    def _recent(self, tracked: list[_core.SlotInfo]) -> set[str]:
        since = time.time_ns() - int(self.interval * self.reconcile_every * 1e9) // 2
        return {s.agent for s in tracked if s.reconcile_ns > since}

    def reconcile_all(self, h: _core.Handle, everyone: bool = False) -> int:
        """Scans every inbox of the base folder now and sets its counter (also
        returning dead consumers' claims and removing stale temp files);
        returns how many were scanned. Without ``everyone``, an inbox another
        process reconciled within the last half round is left alone."""
        names = self._folders()
        tracked = _core.slots(h, self._slots)
        seen: set[str] = set()
        done = self._reconcile(h, names, set() if everyone else self._recent(tracked), seen)
        self._gone = {s.agent for s in tracked if s.count >= 0} - seen
        self._round = []
        return done

    def reconcile_slice(self, h: _core.Handle) -> int:
        """Reconciles the next slice of the current round (starting a new round when one ends)."""
        if not self._round:
            self._round = sorted(self._folders(), reverse=True)
            tracked = _core.slots(h, self._slots)
            self._round_tracked = {s.agent for s in tracked if s.count >= 0}
            self._round_fresh = self._recent(tracked)
            self._round_seen = set()
            self._round_step = -(-len(self._round) // self.reconcile_every)
        take = self._round[-self._round_step:] if self._round_step else []
        del self._round[len(self._round) - len(take):]
        done = self._reconcile(h, take, self._round_fresh, self._round_seen)
        if not self._round:  # the round is complete: now we know which tracked inboxes are gone
            self._gone = self._round_tracked - self._round_seen
        return done

    def run_pass(self, reconcile: Optional[bool] = None) -> PassResult:
        """One pass; ``reconcile`` None follows the schedule, True reconciles
        every inbox first, False none."""
        b = self.bus
        h = b._bus()
        if h is None:  # no base folder yet: nothing to watch
            self.passes += 1
            return PassResult(0, 0, 0, 0)
        if reconcile is None:
            reconciled = self.reconcile_all(h) if self.passes == 0 else self.reconcile_slice(h)
        else:
            reconciled = self.reconcile_all(h) if reconcile else 0
        cap = b.config.max_inbox_size
        metrics_on = b.config.metrics_enabled
        if metrics_on:
            try:
                self._size.refresh()
                self._util.refresh()
            except CfnError as e:
                _report("metrics", e, self.errors)
                metrics_on = False
        size_line, util_line = self._size.line, self._util.line
        gone = self._gone
        out: list[bytes] = []
        hot: list[tuple[str, int, int]] = []
        n = 0
        for s in _core.slots(h, self._slots):
            size = s.count
            if size < 0 or (gone and s.agent in gone):
                continue
            n += 1
            util = size * 100 // cap
            if metrics_on:
                out.append(size_line(size, s.agent))
                out.append(util_line(util, s.agent))
            if util > HIGH_UTILIZATION:
                hot.append((s.agent, size, util))
        if out:
            try:
                telemetry.write_metric_lines(b, b"".join(out), len(out))
            except CfnError as e:
                _report("metrics", e, self.errors)
        alerts = 0
        for agent, size, util in hot:
            meta = {"agent": agent, "size": size, "max_size": cap, "utilization": util}
            try:
                if util >= 100:
                    sent = telemetry.emit_alert(
                        "inbox_overflow", f"Inbox of {agent} is full: {size}/{cap} messages ({util}%)",
                        "critical", meta, bus=b)
                else:
                    sent = telemetry.emit_alert(
                        "inbox_high_utilization",
                        f"Inbox of {agent} is at {util}% of capacity ({size}/{cap} messages)",
                        "warning", meta, bus=b)
                alerts += sent
            except CfnError as e:
                _report("alerts", e, self.errors)
        _core.counter_add(h, telemetry.COUNTERS["monitor_passes"], 1)
        self.passes += 1
        return PassResult(n, len(out), alerts, reconciled)


def monitor_inbox_overflow(interval: float = 5, iterations: Optional[int] = None, *, pidfile: bool = False,
                           bus: Optional["MessageBus"] = None, reconcile_every: int = 12,
                           stop: Optional[threading.Event] = None) -> int:
    """Checks every inbox each ``interval`` seconds (see OverflowMonitor) until
    ``iterations`` passes are done (forever when None), SIGTERM/SIGINT
    arrives (when run in the main thread) or ``stop`` is set. With ``pidfile``, writes <base>/.monitors/overflow-<pid>.pid for
    ``cleanup_rate_limiting``. Returns the number of passes."""
    every = _check_interval(interval)
    count = _check_iterations(iterations)
    b = _resolve(bus)
    mon = OverflowMonitor(b, every, reconcile_every)
    with _Lifecycle(b, "overflow", pidfile, stop) as life:
        while not life.orphaned() and (count is None or mon.passes < count):
            t0 = time.monotonic()
            try:
                mon.run_pass()
            except (CfnError, OSError) as e:  # e.g. the base folder removed under us
                _report("pass", e, mon.errors)
                mon.passes += 1
            if count is None or mon.passes < count:
                life.sleep(every - (time.monotonic() - t0))
    return mon.passes


def monitor_dynamic_rate_limit(interval: Optional[float] = None, iterations: Optional[int] = None, *,
                               pidfile: bool = False, bus: Optional["MessageBus"] = None,
                               stop: Optional[threading.Event] = None) -> int:
    """Runs ``apply_dynamic_rate_limit`` every ``interval`` seconds (default
    RATE_LIMIT_CHECK_INTERVAL) until ``iterations`` are done, SIGTERM/SIGINT
    arrives (in the main thread) or ``stop`` is set. With ``pidfile``, writes <base>/.monitors/rate-<pid>.pid. Returns
    the number of checks.

    Readers treat the settings as stale three RATE_LIMIT_CHECK_INTERVALs after
    their last update; when ``interval`` is longer than that interval, the
    monitor re-stamps its last settings in between, so they hold as long as it
    runs and lapse only when it stops."""
    b = _resolve(bus)
    every = b.config.rate_limit_check_interval if interval is None else _check_interval(interval)
    count = _check_iterations(iterations)
    beat = min(every, b.config.rate_limit_check_interval)
    done = 0
    errors: set[str] = set()
    with _Lifecycle(b, "rate", pidfile, stop) as life:
        while not life.orphaned() and (count is None or done < count):
            t0 = time.monotonic()
            try:
                apply_dynamic_rate_limit(bus=b, interval=every)
            except (CfnError, OSError) as e:
                _report("rate limit", e, errors)
            done += 1
            if count is not None and done >= count:
                break
            while not life.orphaned():
                left = every - (time.monotonic() - t0)
                if left <= beat:
                    life.sleep(left)
                    break
                life.sleep(beat)
                _restamp(b)
    return done


def _restamp(bus: "MessageBus") -> None:
    """Refreshes the published settings' time stamp, keeping them as they are."""
    h = bus._bus()
    if h is not None:
        rs = _core.rate_read(h)
        if rs.updated_ns:
            _core.rate_publish(h, rs._replace(updated_ns=time.time_ns()))


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
    if _proc_start(rec.pid) != rec.start:
        return False
    if _proc_cmdline(rec.pid) != rec.cmdline:
        # read after the start time: a process that died and whose pid was reused in between
        # shows another command line too, so it is refused, never signalled
        return f"names pid {rec.pid}, a live process whose command line is not the one its monitor recorded"
    return True


def _refused(path: str, why: str, action: str) -> None:
    print(f"cfn-fast: refused pid file {path}: it {why}; {action}", file=sys.stderr, flush=True)


def list_monitors(*, bus: Optional["MessageBus"] = None) -> list[dict[str, Any]]:
    """The monitors of this base folder whose pid files are sound (regular,
    this user's, writable by no one else) and name the live process that
    wrote them. A pid file refused as tampered is named on stderr, and left:
    listing changes nothing (``cleanup_rate_limiting`` removes it)."""
    b = _resolve(bus)
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
    b = _resolve(bus)
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
            left = [t for t in left if _proc_start(t.record.pid) == t.record.start]
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
        telemetry.count(b, "monitors_stopped", len(targets))
    return len(targets)


def _unlink(name: str, dfd: int) -> None:
    try:
        os.unlink(name, dir_fd=dfd)
    except (FileNotFoundError, IsADirectoryError):  # gone already; a folder is left (and was refused)
        pass


__all__ = [
    "OverflowMonitor",
    "TIERS",
    "Tier",
    "apply_dynamic_rate_limit",
    "choose_tier",
    "cleanup_rate_limiting",
    "current_rate_limit",
    "get_all_inbox_stats",
    "get_batch_size",
    "get_system_load",
    "list_monitors",
    "monitor_dynamic_rate_limit",
    "monitor_inbox_overflow",
]
