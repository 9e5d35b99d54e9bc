"""Metrics and alerts in the bash original's JSONL formats, with totals and
the alert cooldown kept in the shared-memory state, so they hold for every
process on the base folder (the original kept its cooldown in one shell's
memory, and its tags had a stray ``}``: defects 5 and 7).

Metric lines are formatted by the C code the send loop uses
(``_core.metric_format``) and written by the same C writer
(``_core.metrics_write``): whole lines per ``write(2)`` on an O_APPEND
descriptor, so concurrent writers never interleave or tear a line, and the
file is rotated past METRICS_MAX_BYTES by one rule for every process. Both
files are opened under the trust rule of csrc/logfile.c (no FIFO, symlink,
another user's or everyone-writable file): they may sit in /dev/shm.
Every function takes an optional ``bus=`` (default ``cfn_fast.default_bus()``).
``json`` is imported only where a dict has to be encoded or a file parsed.
"""
from __future__ import annotations

import errno
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from cfn_fast import _core
from cfn_fast.errors import CfnError, CfnOSError, InvalidArgument

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus

Number = Union[int, float]
Tags = Union[Mapping[str, Any], str, bytes, None]

# --- shared counters ----------------------------------------------------------
# The C core owns indexes 0..12 (``_core.COUNTERS``); 13..63 are this table's.
_FIRST_FREE = max(_core.COUNTERS.values()) + 1
_OWN = (
    "coordination_message_sent",      # sum of coordination.message_sent values
    "coordination_message_received",  # sum of coordination.message_received values
    "coordination_latency_samples",   # coordination.latency lines
    "coordination_latency_ms_total",  # sum of their values, ms
    "alerts_inbox_overflow",          # inbox_overflow alerts written
    "alerts_inbox_high_utilization",  # inbox_high_utilization alerts written
    "monitor_passes",                 # overflow-monitor counter passes
    "monitor_reconciles",             # inboxes reconciled by a monitor
    "inbox_drift",                    # reconciles that found the counter off
    "rate_limit_adjustments",         # apply_dynamic_rate_limit publications
    "metric_write_errors",            # metric lines that could not be written
    "alert_write_errors",             # alert lines that could not be written
    "monitors_stopped",               # monitors stopped by cleanup_rate_limiting
)
COUNTERS: dict[str, int] = {**_core.COUNTERS, **{n: _FIRST_FREE + i for i, n in enumerate(_OWN)}}
assert max(COUNTERS.values()) < 64, "shared counter table overflows CFN_COUNTERS"

# A counter metric's value is also added to a shared counter (lock-free), so
# totals are readable without parsing the file. The backpressure ones are the
# C core's counters: the send loop bumps them itself for the lines it writes.
_METRIC_COUNTERS: dict[str, tuple[str, ...]] = {
    "backpressure.wait": ("backpressure_wait",),
    "backpressure.send.success": ("backpressure_success",),
    "backpressure.send.failure": ("backpressure_failure",),
    "coordination.message_sent": ("coordination_message_sent",),
    "coordination.message_received": ("coordination_message_received",),
    "coordination.latency": ("coordination_latency_samples", "coordination_latency_ms_total"),
}

SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")
_COLOURS = {"info": "\033[0;36m", "warning": "\033[1;33m", "error": "\033[0;31m", "critical": "\033[1;31m"}
_RESET = "\033[0m"


def _resolve(bus: Optional["MessageBus"]) -> "MessageBus":
    if bus is not None:
        return bus
    import cfn_fast

    return cfn_fast.default_bus()


def _handle(bus: "MessageBus", create: bool = False) -> Optional[_core.Handle]:
    """The bus's mapped state; None when its base folder does not exist (and create is off)."""
    return bus._bus(create=create)


def count(bus: "MessageBus", name: str, delta: int = 1) -> None:
    """Adds to one of the shared counters (no-op when the base folder does not exist)."""
    h = _handle(bus)
    if h is not None:
        _core.counter_add(h, COUNTERS[name], delta)


def counters(bus: Optional["MessageBus"] = None) -> dict[str, int]:
    """Every shared counter by name (zeros when the base folder does not exist)."""
    b = _resolve(bus)
    h = _handle(b)
    if h is None:
        return {name: 0 for name in COUNTERS}
    return {name: _core.counter_get(h, idx) for name, idx in COUNTERS.items()}


def now_iso(ns: Optional[int] = None) -> str:
    """UTC time as the original writes it: 2026-11-28T10:01:55.123Z."""
    t = time.time_ns() if ns is None else ns
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t // 1_000_000_000)) + \
        f".{t // 1_000_000 % 1000:03d}Z"


# --- metrics -------------------------------------------------------------------
def _text(value: object, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or "\0" in value:
        raise InvalidArgument(f"{what} must be a str without NUL, not {value!r}")
    try:
        data = value.encode("utf-8", "strict")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid Unicode text") from None
    if len(data) > limit:
        raise InvalidArgument(f"{what} is over {limit} bytes")
    return data


def _number(value: object) -> Number:
    if isinstance(value, bool):
        raise InvalidArgument(f"metric value must be a number, not {value!r}")
    if isinstance(value, (int, float)):
        v: Number = value
    elif isinstance(value, str):
        try:
            v = int(value.strip(), 10)
        except ValueError:
            try:
                v = float(value)
            except ValueError:
                raise InvalidArgument(f"metric value {value!r} is not a number") from None
    else:
        raise InvalidArgument(f"metric value must be a number, not {type(value).__name__}")
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        raise InvalidArgument(f"metric value must be finite, not {value!r}")
    return v


def _json_object(obj: Tags, what: str) -> bytes:
    """A dict (or JSON object text, as the CLI passes it) as compact JSON bytes."""
    if obj is None:
        return b"{}"
    if isinstance(obj, (str, bytes)):
        data = _text(obj, what, 1 << 20) if isinstance(obj, str) else obj
        try:
            _core.check_json(data)
        except CfnError:
            raise InvalidArgument(f"{what} is not valid JSON: {data[:80]!r}") from None
        if not data.strip().startswith(b"{"):
            raise InvalidArgument(f"{what} must be a JSON object")
        return data.strip()
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"{what} must be a dict, not {type(obj).__name__}")
    import json

    try:
        return json.dumps(dict(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what} cannot be written as JSON: {e}") from None


def format_metric(name: str, value: object, unit: str = "count", tags: Tags = None) -> bytes:
    """One metric line (newline included), in the original's format."""
    n = _text(name, "metric name", 200)
    u = _text(unit, "metric unit", 64)
    if not n:
        raise InvalidArgument("metric name must not be empty")
    try:
        return _core.metric_format(n, _number(value), u, _json_object(tags, "metric tags"))
    except InvalidArgument:
        raise
    except CfnError as e:
        raise InvalidArgument(str(e)) from None


def _write_all(fd: int, data: bytes) -> None:
    """Writes whole lines; a line never straddles two writes, so none tears."""
    view = memoryview(data)
    while view:
        if len(view) <= 65536:
            chunk = view
        else:  # cut at the last newline of the first 64 KiB
            cut = bytes(view[:65536]).rfind(b"\n") + 1 or len(view)
            chunk = view[:cut]
        w = os.write(fd, chunk)
        if w < len(chunk):  # a signal or a full disk; finish the line in a second write
            rest = chunk[w:]
            while rest:
                rest = rest[os.write(fd, rest):]
        view = view[len(chunk):]


def write_metric_lines(bus: "MessageBus", data: bytes, nlines: int) -> bool:
    """Appends already formatted lines (one write when under 64 KiB), creating
    the base folder if need be; False when metrics are off (CFN_METRICS=0).
    Raises UnsafePath when METRICS_FILE is refused, CfnOSError when it cannot
    be written."""
    h = bus.metrics_handle()
    if h is None:
        return False
    try:
        _core.metrics_write(h, data, nlines)  # counts the lines in the shared "metrics" counter
    except CfnError:
        _core.counter_add(h, COUNTERS["metric_write_errors"], nlines)
        raise
    return True


def emit_metric(name: str, value: Number, unit: str = "count", tags: Tags = None, *,
                bus: Optional["MessageBus"] = None) -> bool:
    """Appends one metric line to METRICS_FILE; returns False when metrics are
    off (CFN_METRICS=0). Raises InvalidArgument for a bad name, value or tags,
    CfnOSError when the file cannot be written."""
    b = _resolve(bus)
    line = format_metric(name, value, unit, tags)
    if not write_metric_lines(b, line, 1):
        return False
    names = _METRIC_COUNTERS.get(name)
    h = _handle(b) if names else None
    v = round(_number(value))
    if h is not None and names and abs(v) < 1 << 62:  # a shared counter is an int64
        if name == "coordination.latency":
            _core.counter_add(h, COUNTERS[names[0]], 1)
            _core.counter_add(h, COUNTERS[names[1]], v)
        else:
            _core.counter_add(h, COUNTERS[names[0]], v)
    return True


class LineTemplate:
    """Fast metric lines for the monitor: one C-formatted line per pass gives the
    timestamp and layout; each inbox then fills in an integer value and an agent
    id (validated ids need no JSON escaping). Falls back to a C call per line if
    the C line does not have the expected shape."""

    _V = 918273645
    _T = "@cfn@"

    def __init__(self, name: str, unit: str, tag: str) -> None:
        self.name, self.unit, self.tag = name, unit, tag
        self._parts: Optional[tuple[bytes, bytes, bytes]] = None

    def refresh(self) -> None:
        line = format_metric(self.name, self._V, self.unit, {self.tag: self._T})
        head, sep, rest = line.partition(str(self._V).encode())
        mid, sep2, tail = rest.partition(f'"{self._T}"'.encode())
        ok = sep and sep2 and head.endswith(b'"value":') and self._T.encode() not in tail
        self._parts = (head, mid + b'"', b'"' + tail) if ok else None

    def line(self, value: int, tag_value: str) -> bytes:
        p = self._parts
        if p is not None and tag_value.isascii() and tag_value.isprintable() and \
                '"' not in tag_value and "\\" not in tag_value:
            return b"%s%d%s%s%s" % (p[0], value, p[1], tag_value.encode("ascii"), p[2])
        return format_metric(self.name, value, self.unit, {self.tag: tag_value})


# --- alerts ----------------------------------------------------------------------
_local_cooldowns: dict[bytes, int] = {}  # when there is no shared state, or no room left in it


def _subject(metadata: Mapping[str, Any]) -> str:
    for key in ("agent", "to"):
        v = metadata.get(key)
        if v is not None:
            return str(v)
    return ""


def _cooldown_ok(bus: "MessageBus", key: bytes, cooldown_s: float) -> bool:
    now = time.time_ns()
    cd = int(cooldown_s * 1e9)
    h = _handle(bus)
    if h is not None:
        if not _core.cooldown_try(h, key, now, cd):
            return False
        if cd <= 0:
            return True
        # Probe that the shared table recorded the key: with all 1,024 entries
        # inside their cooldowns it lets a new key through rather than silence it.
        if not _core.cooldown_try(h, key, now, cd):
            _core.counter_add(h, COUNTERS["alerts_suppressed"], -1)  # the probe counted as a suppression
            return True
        # no room in the shared table: at least this process keeps the cooldown
    last = _local_cooldowns.get(key)
    if last is not None and now - last < cd:
        if h is not None:
            _core.counter_add(h, COUNTERS["alerts_suppressed"], 1)
        return False
    if len(_local_cooldowns) > 4096:
        _local_cooldowns.clear()
    _local_cooldowns[key] = now
    return True


def _colour() -> bool:
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def emit_alert(alert_type: str, message: str, severity: str = "info",
               metadata: Union[Mapping[str, Any], str, None] = None, *,
               bus: Optional["MessageBus"] = None) -> bool:
    """Appends one alert line to ALERT_LOG_FILE and prints a (coloured) line on
    stderr, unless the same alert type for the same subject (metadata's
    "agent", else "to") was emitted within ALERT_COOLDOWN_SECONDS by any
    process on the base folder. Returns True when emitted, False when suppressed."""
    import json

    b = _resolve(bus)
    atype = _text(alert_type, "alert type", 200).decode()
    if not atype:
        raise InvalidArgument("alert type must not be empty")
    msg = _text(message, "alert message", 64 * 1024).decode()
    if severity not in SEVERITIES:
        raise InvalidArgument(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    meta_bytes = _json_object(metadata, "alert metadata")
    meta = json.loads(meta_bytes) if not isinstance(metadata, Mapping) else dict(metadata)
    key = f"{atype}\0{_subject(meta)}".encode("utf-8", "surrogateescape")
    # the base folder holds the shared cooldown (and, by default, the alert file): make it
    h = _handle(b, create=True)
    if not _cooldown_ok(b, key, b.config.alert_cooldown_seconds):
        return False
    stamp = now_iso()
    line = (
        '{"timestamp":%s,"alert":%s,"message":%s,"severity":%s,"metadata":%s}\n'
        % (json.dumps(stamp), json.dumps(atype, ensure_ascii=False), json.dumps(msg, ensure_ascii=False),
           json.dumps(severity), meta_bytes.decode())
    ).encode("utf-8", "surrogateescape")
    text = f"[{stamp}] ALERT {severity.upper()} {atype}: {msg}"
    if _colour():
        text = f"{_COLOURS[severity]}{text}{_RESET}"
    try:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    path = b.config.alert_log_file
    try:
        fd = _core.log_open(path, b.config.file_mode, b.config.group)
        try:
            _write_all(fd, line)
        except OSError as e:
            raise CfnOSError(e.errno or errno.EIO, f"write ALERT_LOG_FILE {path}: {e.strerror}") from None
        finally:
            os.close(fd)
    except CfnError:
        if h is not None:
            _core.counter_add(h, COUNTERS["alert_write_errors"], 1)
        raise
    if h is not None:
        _core.counter_add(h, COUNTERS["alerts"], 1)
        per_type = f"alerts_{atype}"
        if per_type in COUNTERS:
            _core.counter_add(h, COUNTERS[per_type], 1)
    return True


def alert_backpressure_failure(bus: Optional["MessageBus"], from_agent: str, to_agent: str,
                               retries: Optional[int] = None) -> bool:
    """The inbox_overflow alert of a failed backpressure send (critical; at most
    one per cooldown per recipient, whichever process fails). Never raises: it
    runs while BackpressureTimeout is on its way to the caller."""
    try:
        b = _resolve(bus)
        cfg = b.config
        tried = cfg.backpressure_max_retries if retries is None else retries
        return emit_alert(
            "inbox_overflow",
            f"Send from {from_agent} to {to_agent} failed after {tried} retries: "
            f"inbox full ({cfg.max_inbox_size} messages)",
            "critical",
            {"from": from_agent, "to": to_agent, "retries": tried, "max_size": cfg.max_inbox_size},
            bus=b,
        )
    except (CfnError, OSError, ValueError):
        return False


def alerts_summary(minutes: Optional[float] = None, *, bus: Optional["MessageBus"] = None) -> dict[str, Any]:
    """Alerts in ALERT_LOG_FILE (those of the last ``minutes`` when given),
    counted by severity, by type, and by severity then type."""
    import json
    from datetime import datetime, timezone

    if minutes is not None:
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
            raise InvalidArgument(f"minutes must be a number >= 0, not {minutes!r}")
    b = _resolve(bus)
    since: Optional[float] = None if minutes is None else time.time() - minutes * 60
    by_sev: dict[str, int] = {}
    by_type: dict[str, int] = {}
    nested: dict[str, dict[str, int]] = {}
    total = invalid = 0
    path = b.config.alert_log_file
    fd = _core.log_open_read(path, b.config.group)  # a FIFO there must not hang the reader
    f = None if fd is None else os.fdopen(fd, "rb")
    if f is not None:
        with f:
            for raw in f:
                try:
                    rec = json.loads(raw)
                    sev, atype = str(rec["severity"]), str(rec["alert"])
                    if since is not None:
                        ts = str(rec["timestamp"]).replace("Z", "+00:00")
                        dt = datetime.fromisoformat(ts)
                        if dt.tzinfo is None:
                            dt = dt.replace(tzinfo=timezone.utc)
                        if dt.timestamp() < since:
                            continue
                except (ValueError, KeyError, TypeError):
                    if raw.strip():
                        invalid += 1
                    continue
                total += 1
                by_sev[sev] = by_sev.get(sev, 0) + 1
                by_type[atype] = by_type.get(atype, 0) + 1
                inner = nested.setdefault(sev, {})
                inner[atype] = inner.get(atype, 0) + 1
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    order = sorted(nested, key=lambda s: (rank.get(s, len(rank)), s))
    h = _handle(b)
    return {
        "file": path,
        "minutes": minutes,
        "since": None if since is None else now_iso(int(since * 1e9)),
        "total": total,
        "by_severity": {s: by_sev[s] for s in order},
        "by_type": dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_severity_and_type": {s: dict(sorted(nested[s].items(), key=lambda kv: (-kv[1], kv[0])))
                                 for s in order},
        "suppressed": 0 if h is None else _core.counter_get(h, COUNTERS["alerts_suppressed"]),
        "invalid_lines": invalid,
    }


# --- the metrics file ------------------------------------------------------------
def metrics_stats(*, bus: Optional["MessageBus"] = None) -> dict[str, Any]:
    """METRICS_FILE's size and line count, and the shared totals."""
    b = _resolve(bus)
    path = b.config.metrics_file
    size = lines = 0
    fd = _core.log_open_read(path, b.config.group)
    exists = fd is not None
    if fd is not None:
        try:
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                lines += chunk.count(b"\n")
        finally:
            os.close(fd)
    return {
        "file": path,
        "enabled": b.config.metrics_enabled,
        "exists": exists,
        "size_bytes": size,
        "lines": lines,
        "counters": counters(b),
    }


def clear_metrics(*, bus: Optional["MessageBus"] = None) -> None:
    """Empties METRICS_FILE in place (writers holding it open carry on at the
    new end). The shared totals are cumulative and stay."""
    b = _resolve(bus)
    path = b.config.metrics_file
    if not os.path.lexists(path):
        return
    fd = _core.log_open(path, b.config.file_mode, b.config.group)
    try:
        os.ftruncate(fd, 0)
    except OSError as e:
        raise CfnOSError(e.errno or errno.EIO, f"truncate METRICS_FILE {path}: {e.strerror}") from None
    finally:
        os.close(fd)


__all__ = [
    "COUNTERS",
    "SEVERITIES",
    "LineTemplate",
    "alert_backpressure_failure",
    "alerts_summary",
    "clear_metrics",
    "counters",
    "emit_alert",
    "emit_metric",
    "format_metric",
    "metrics_stats",
    "now_iso",
    "write_metric_lines",
]
