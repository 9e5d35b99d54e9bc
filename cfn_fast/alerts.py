"""Alerts in the original's JSONL format, with a cooldown shared by every
process on the base folder (the original kept it in one shell's memory:
defect 7), written to ALERT_LOG_FILE under the telemetry files' trust rule,
and logged (``cfn_fast.alerts``, at the alert's severity) in the original's
line, which the command line prints on stderr (logs.py)."""
from __future__ import annotations

import errno
import os
import time
from typing import Any, Mapping, Optional, Union

from cfn_fast import fields, logs
from cfn_fast.errors import CfnError, CfnOSError, InvalidArgument
from cfn_fast.storage import COUNTERS, Storage

SEVERITIES: tuple[str, ...] = ("info", "warning", "error", "critical")

_local_cooldowns: dict[bytes, int] = {}  # when there is no room left in the shared table


def _subject(metadata: Mapping[str, Any]) -> str:
    for key in ("agent", "to"):
        v = metadata.get(key)
        if v is not None:
            return str(v)
    return ""


def _cooldown_ok(store: Storage, key: bytes, cooldown_s: float) -> bool:
    now = time.time_ns()
    cd = int(cooldown_s * 1e9)
    shared = store.cooldown_try(key, now, cd)
    if shared is not None:
        if not shared:
            return False
        if cd <= 0:
            return True
        # Probe that the shared table recorded the key: with all 1,024 entries
        # inside their cooldowns it lets a new key through rather than silence it.
        if not store.cooldown_try(key, now, cd):
            store.counter_add("alerts_suppressed", -1)  # the probe counted as a suppression
            return True
        # no room in the shared table: at least this process keeps the cooldown
    last = _local_cooldowns.get(key)
    if last is not None and now - last < cd:
        store.counter_add("alerts_suppressed", 1)
        return False
    if len(_local_cooldowns) > 4096:
        _local_cooldowns.clear()
    _local_cooldowns[key] = now
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def emit(store: Storage, alert_type: str, message: str, severity: str = "info",
         metadata: Union[Mapping[str, Any], str, None] = None) -> bool:
    """Appends one alert line and prints its stderr line, unless the same alert
    type for the same subject (metadata's "agent", else "to") went out within
    ALERT_COOLDOWN_SECONDS from any process on the base folder. True when
    emitted, False when suppressed."""
    import json

    atype = fields.text(alert_type, "alert type", 200).decode()
    if not atype:
        raise InvalidArgument("alert type must not be empty")
    msg = fields.text(message, "alert message", 64 * 1024).decode()
    if severity not in SEVERITIES:
        raise InvalidArgument(f"severity must be one of {', '.join(SEVERITIES)}, not {severity!r}")
    meta_bytes = fields.json_object(metadata, "alert metadata")
    meta = json.loads(meta_bytes) if not isinstance(metadata, Mapping) else dict(metadata)
    key = f"{atype}\0{_subject(meta)}".encode("utf-8", "surrogateescape")
    store.create()  # the base folder holds the shared cooldown (and, by default, the alert file)
    if not _cooldown_ok(store, key, store.config.alert_cooldown_seconds):
        return False
    stamp = fields.now_iso()
    line = (
        '{"timestamp":%s,"alert":%s,"message":%s,"severity":%s,"metadata":%s}\n'
        % (json.dumps(stamp), json.dumps(atype, ensure_ascii=False), json.dumps(msg, ensure_ascii=False),
           json.dumps(severity), meta_bytes.decode())
    ).encode("utf-8", "surrogateescape")
    logs.get("alerts").log(logs.LEVELS[severity], "[ALERT %s] [%s] %s: %s", stamp, severity, atype, msg,
                           extra={"severity": severity, "alert": atype, "metadata": meta})
    path = store.config.alert_log_file
    try:
        fd = store.open_log(path)
        try:
            _write_all(fd, line)
        except OSError as e:
            raise CfnOSError(e.errno or errno.EIO, f"write ALERT_LOG_FILE {path}: {e.strerror}") from None
        finally:
            os.close(fd)
    except CfnError:
        store.counter_add("alert_write_errors", 1)
        raise
    store.counter_add("alerts", 1)
    if f"alerts_{atype}" in COUNTERS:
        store.counter_add(f"alerts_{atype}", 1)
    return True


def top_senders(store: Storage, agent: str, n: int = 3) -> tuple[str, list[dict[str, Any]]]:
    """Who filled the inbox: "; top senders: a 62%, b 30%" for an alert's
    message, and the same as metadata. Empty when nothing is known."""
    try:
        top = store.top_senders(agent)[:n]
    except (CfnError, OSError):
        return "", []
    if not top:
        return "", []
    return ("; top senders: " + ", ".join(f"{t.sender} {t.share:.0%}" for t in top),
            [{"sender": t.sender, "share": t.share, "count": t.count} for t in top])


def backpressure_failure(store: Storage, from_agent: str, to_agent: str, retries: Optional[int] = None) -> bool:
    """The inbox_overflow alert of a failed backpressure send (critical; at most
    one per cooldown per recipient, whichever process fails), naming the
    inbox's heaviest senders. Never raises: it runs while BackpressureTimeout
    is on its way to the caller."""
    try:
        cfg = store.config
        tried = cfg.backpressure_max_retries if retries is None else retries
        who, top = top_senders(store, to_agent)
        return emit(store, "inbox_overflow",
                    f"Send from {from_agent} to {to_agent} failed after {tried} retries: "
                    f"inbox full ({cfg.max_inbox_size} messages){who}",
                    "critical",
                    {"from": from_agent, "to": to_agent, "retries": tried, "max_size": cfg.max_inbox_size,
                     "top_senders": top})
    except (CfnError, OSError, ValueError):
        return False


def circuit_opened(store: Storage, from_agent: str, to_agent: str, why: str) -> bool:
    """The circuit_open alert (critical): sends to the inbox now fail at once. Never raises."""
    cfg = store.config
    return quietly(store, "circuit_open",
                   f"Circuit of {to_agent} opened ({why}, last by {from_agent}): sends to it fail at once for "
                   f"{cfg.breaker_cooldown_ms} ms, then {cfg.breaker_probes} probe(s) go",
                   "critical", {"agent": to_agent, "from": from_agent, "why": why,
                                "cooldown_ms": cfg.breaker_cooldown_ms, "probes": cfg.breaker_probes})


def circuit_closed(store: Storage, agent: str, why: str) -> bool:
    """The circuit_closed alert (info): the inbox takes sends again. Never raises."""
    return quietly(store, "circuit_closed", f"Circuit of {agent} closed ({why}): it takes sends again",
                   "info", {"agent": agent, "why": why})


def quietly(store: Storage, alert_type: str, message: str, severity: str, metadata: Mapping[str, Any]) -> bool:
    """emit, for a caller that is already reporting something else: a failure
    to alert is dropped, never raised over it."""
    try:
        return emit(store, alert_type, message, severity, metadata)
    except (CfnError, OSError):
        return False


def summary(store: Storage, minutes: Optional[float] = None) -> dict[str, Any]:
    """Alerts in ALERT_LOG_FILE (those of the last ``minutes`` when given),
    counted by severity, by type, and by severity then type."""
    import json
    from datetime import datetime, timezone

    if minutes is not None:
        if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
            raise InvalidArgument(f"minutes must be a number >= 0, not {minutes!r}")
    since: Optional[float] = None if minutes is None else time.time() - minutes * 60
    by_sev: dict[str, int] = {}
    by_type: dict[str, int] = {}
    nested: dict[str, dict[str, int]] = {}
    total = invalid = 0
    path = store.config.alert_log_file
    fd = store.open_log_read(path)  # a FIFO there must not hang the reader
    if fd is not None:
        with os.fdopen(fd, "rb") as f:
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
    return {
        "file": path,
        "minutes": minutes,
        "since": None if since is None else fields.now_iso(int(since * 1e9)),
        "total": total,
        "by_severity": {s: by_sev[s] for s in order},
        "by_type": dict(sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_severity_and_type": {s: dict(sorted(nested[s].items(), key=lambda kv: (-kv[1], kv[0])))
                                 for s in order},
        "suppressed": store.counters()["alerts_suppressed"] if store.exists() else 0,
        "invalid_lines": invalid,
    }


__all__ = ["SEVERITIES", "backpressure_failure", "circuit_closed", "circuit_opened", "emit", "quietly", "summary",
           "top_senders"]
