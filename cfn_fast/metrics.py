"""Metric lines in the original's JSONL format, written to METRICS_FILE.

Lines are formatted by the C code the send loop uses and written by the same
C writer (whole lines per write(2) on an O_APPEND descriptor, rotation past
METRICS_MAX_BYTES), through the storage: concurrent writers never tear or
interleave a line. A counter metric's value also goes into a shared counter,
so totals are readable without parsing the file.
"""
from __future__ import annotations

import errno
import os
from typing import Any, Optional

from cfn_fast import fields, storage
from cfn_fast.errors import CfnError, CfnOSError, InvalidArgument
from cfn_fast.fields import Number, Tags
from cfn_fast.storage import Storage

# Shared counters fed by metric values. The backpressure ones are the C
# core's: the send loop bumps them itself for the lines it writes.
_METRIC_COUNTERS: dict[str, tuple[str, ...]] = {
    "backpressure.wait": ("backpressure_wait",),
    "backpressure.send.success": ("backpressure_success",),
    "backpressure.send.failure": ("backpressure_failure",),
    "coordination.message_sent": ("coordination_message_sent",),
    "coordination.message_received": ("coordination_message_received",),
    "coordination.latency": ("coordination_latency_samples", "coordination_latency_ms_total"),
}


def format_metric(name: str, value: object, unit: str = "count", tags: Tags = None) -> bytes:
    """One metric line (newline included), in the original's format."""
    n = fields.text(name, "metric name", 200)
    u = fields.text(unit, "metric unit", 64)
    if not n:
        raise InvalidArgument("metric name must not be empty")
    try:
        return storage.metric_line(n, fields.number(value), u, fields.json_object(tags, "metric tags"))
    except InvalidArgument:
        raise
    except CfnError as e:
        raise InvalidArgument(str(e)) from None


def write_lines(store: Storage, data: bytes, nlines: int) -> bool:
    """Appends already formatted lines, creating the base folder if need be;
    False when metrics are off (CFN_METRICS=0). Raises UnsafePath when
    METRICS_FILE is refused, CfnOSError when it cannot be written."""
    try:
        return store.metrics_write(data, nlines)  # counts the lines in the shared "metrics" counter
    except CfnError:
        if store.metrics_error is None:
            store.counter_add("metric_write_errors", nlines)
        raise


def emit(store: Storage, name: str, value: Number, unit: str = "count", tags: Tags = None) -> bool:
    """Appends one metric line; False when metrics are off."""
    line = format_metric(name, value, unit, tags)
    if not write_lines(store, line, 1):
        return False
    names = _METRIC_COUNTERS.get(name)
    v = round(fields.number(value))
    if names and abs(v) < 1 << 62:  # a shared counter is an int64
        if name == "coordination.latency":
            store.counter_add(names[0], 1)
            store.counter_add(names[1], v)
        else:
            store.counter_add(names[0], v)
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


def stats(store: Storage) -> dict[str, Any]:
    """METRICS_FILE's size and line count, and the shared totals."""
    cfg = store.config
    path = cfg.metrics_file
    size = lines = 0
    fd = store.open_log_read(path)
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
    return {"file": path, "enabled": cfg.metrics_enabled, "exists": exists, "size_bytes": size,
            "lines": lines, "counters": store.counters()}


def clear(store: Storage) -> None:
    """Empties METRICS_FILE in place (writers holding it open carry on at the
    new end). The shared totals are cumulative and stay."""
    path = store.config.metrics_file
    if not os.path.lexists(path):
        return
    fd = store.open_log(path)
    try:
        os.ftruncate(fd, 0)
    except OSError as e:
        raise CfnOSError(e.errno or errno.EIO, f"truncate METRICS_FILE {path}: {e.strerror}") from None
    finally:
        os.close(fd)


__all__ = ["LineTemplate", "clear", "emit", "format_metric", "stats", "write_lines"]
