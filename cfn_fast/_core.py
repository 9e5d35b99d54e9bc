"""Typed wrappers over the compiled module, one per function of csrc/cfn_fast.h.

This is the only module that touches cffi. C returns 0 (or a count) or a
negative code; ``raise_for`` turns a code and the C error text into the
matching CfnError. Nothing here knows about configuration or the environment.
"""
from __future__ import annotations

import errno as _errno
import os
import struct
import threading
import time
from typing import Any, NamedTuple, Optional

from cfn_fast import errors as E
from cfn_fast._native import ffi, lib

Handle = Any  # an ffi "cfn_bus *" owned by a Python object (closed by ffi.gc)

AGENT_MAX: int = lib.CFN_AGENT_MAX
TYPE_MAX: int = lib.CFN_TYPE_MAX

_CODES: dict[int, type[E.CfnError]] = {
    lib.CFN_E_FULL: E.InboxFull,
    lib.CFN_E_TIMEOUT: E.BackpressureTimeout,
    lib.CFN_E_NOINBOX: E.InboxNotFound,
    lib.CFN_E_BADID: E.InvalidAgentId,
    lib.CFN_E_BADJSON: E.InvalidPayload,
    lib.CFN_E_TOOBIG: E.PayloadTooLarge,
    lib.CFN_E_BADTYPE: E.InvalidMessageType,
    lib.CFN_E_BADSTATE: E.StateFileError,
    lib.CFN_E_NOSLOT: E.TooManyAgents,
    lib.CFN_E_BADARG: E.InvalidArgument,
    lib.CFN_E_UNSAFE: E.UnsafePath,
    lib.CFN_E_LOCKED: E.InboxLocked,
    lib.CFN_E_CLOSED: E.BusClosed,
    lib.CFN_E_CIRCUIT: E.CircuitOpen,
}

_EINTR = -_errno.EINTR

# A call waiting in C (for a lock, for room) asks this every 50 ms. Entering
# it runs Python's pending signal handlers (the interpreter does at a
# function's start); one that raises, as Ctrl-C's does, is kept here and the
# wait ends with -EINTR, so the caller raises it: a signal that came between
# two system calls is not waited out.
_interrupted = threading.local()


def _probe_raised(exc_type: Any, exc: BaseException, tb: Any) -> int:
    _interrupted.exc = exc
    return 1


def cfn_py_probe() -> int:
    return 0


ffi.def_extern(onerror=_probe_raised)(cfn_py_probe)


def _reraise_interruption() -> None:
    exc = getattr(_interrupted, "exc", None)
    if exc is not None:
        _interrupted.exc = None
        raise exc

PRIORITY_HIGH: int = lib.CFN_PRIORITY_HIGH

BACKOFF_CODES = {
    "fixed": lib.CFN_BACKOFF_FIXED,
    "exponential": lib.CFN_BACKOFF_EXPONENTIAL,
    "decorrelated": lib.CFN_BACKOFF_DECORRELATED,
}


def new_err() -> Any:
    return ffi.new("cfn_err *")


def error_for(rc: int, err: Any) -> E.CfnError:
    return error_from(rc, ffi.string(err.what).decode("utf-8", "replace") if err is not None else "")


def error_from(rc: int, text: str) -> E.CfnError:
    """The exception of a C error code and its message."""
    cls = _CODES.get(rc)
    if cls is not None:
        return cls(text or cls.__doc__ or "cfn-fast error")
    if -1000 < rc < 0:
        code = -rc
        msg = text or os.strerror(code)
        if code == _errno.EINTR:
            return E.CfnOSError(code, msg)
        return E.CfnOSError(code, f"{msg}: {os.strerror(code)}" if text else msg)
    return E.CfnError(text or f"cfn-fast error code {rc}")


def raise_for(rc: int, err: Any) -> None:
    raise error_for(rc, err)


def agent_bytes(agent: object, role: str = "agent id") -> bytes:
    """Encodes an agent id for C; C checks the characters, but cannot see past a NUL."""
    if not isinstance(agent, str):
        raise E.InvalidAgentId(f"{role} must be a str, not {type(agent).__name__}")
    if "\0" in agent:
        raise E.InvalidAgentId(f"{role} {agent!r} contains a NUL byte")
    try:
        return agent.encode("ascii")
    except UnicodeEncodeError:
        raise E.InvalidAgentId(
            f"{role} {agent!r} has a non-ASCII character; use letters, digits, '.', '_' and '-'"
        ) from None


def open_bus(base_dir: str, create: bool, dir_mode: int, gid: Optional[int] = None,
             lock_timeout_ms: int = 10000, flow: Optional[dict[str, int]] = None) -> Handle:
    """A handle on the base folder; ``flow`` sets its consumers' cfn_flow_opts fields."""
    err = new_err()
    opts = ffi.new("cfn_bus_opts *", {"dir_mode": dir_mode, "gid": -1 if gid is None else gid,
                                      "lock_timeout_ms": lock_timeout_ms})
    h = lib.cfn_bus_open(os.fsencode(base_dir), lib.CFN_OPEN_CREATE if create else 0, opts, err)
    if h == ffi.NULL:
        raise_for(err.code, err)
    lib.cfn_bus_set_probe(h, lib.cfn_py_probe)
    rc = lib.cfn_bus_set_flow(h, ffi.new("cfn_flow_opts *", flow or {}), err)
    if rc:
        lib.cfn_bus_free(h)
        raise_for(rc, err)
    # The finaliser frees the handle once no Python object refers to it, so a
    # thread still holding it after close() gets BusClosed, never freed memory.
    return ffi.gc(h, lib.cfn_bus_free)


def close_bus(h: Handle) -> None:
    """Releases folders and mapping once the calls in flight have returned."""
    lib.cfn_bus_close(h)


def check_agent(agent: bytes) -> None:
    err = new_err()
    rc = lib.cfn_check_agent(agent, err)
    if rc:
        raise_for(rc, err)


def check_json(payload: bytes) -> None:
    err = new_err()
    rc = lib.cfn_check_json(payload, len(payload), err)
    if rc:
        raise_for(rc, err)


def json_flags(data: bytes) -> int:
    """A stored message's CFN_JSON_* flags as the file reader gives them; -1: not one JSON value."""
    return int(lib.cfn_json_flags(data, len(data)))


def json_escape(text: bytes) -> bytes:
    """text (valid UTF-8) as the inside of a JSON string, escaped as the envelope's type is."""
    out = ffi.new("char[]", 6 * len(text) + 1)
    return bytes(ffi.buffer(out, lib.cfn_json_escape(out, text, len(text))))


def init_agent(h: Handle, agent: bytes, capacity: int) -> None:
    """Creates the agent's folders and records capacity as its inbox's (0: leave it)."""
    err = new_err()
    rc = lib.cfn_init_agent(h, agent, capacity, err)
    if rc:
        raise_for(rc, err)


def forget_agent(h: Handle, agent: bytes) -> None:
    err = new_err()
    rc = lib.cfn_forget_agent(h, agent, err)
    if rc:
        raise_for(rc, err)


class SendResult(NamedTuple):
    msg_id: str
    sequence: int
    timestamp: int
    retries: int
    wakeups: int
    waited_ns: int
    outbox_copied: bool
    circuit: int = 0  # 2: this send closed the recipient's half-open circuit


def new_send_opts(base: Any = None, **fields: int) -> Any:
    """Send options: a copy of base (when given) with fields changed."""
    opts = ffi.new("cfn_send_opts *", base[0]) if base is not None else ffi.new("cfn_send_opts *")
    for name, value in fields.items():
        setattr(opts, name, value)
    return opts


def send_error(exc: E.CfnError, retries: int, waited_ns: int, locked: bool, deadline: bool, circuit: int,
               retry_after_ns: int) -> E.CfnError:
    """A failed send's exception with what its cfn_send_result says."""
    exc.circuit = circuit
    if isinstance(exc, E.InboxFull):
        exc.set_retry_after(retry_after_ns / 1e9)
    if isinstance(exc, E.BackpressureTimeout):
        exc.retries, exc.waited_ns, exc.locked, exc.deadline = retries, waited_ns, locked, deadline
    return exc


def send(h: Handle, sender: bytes, to: bytes, mtype: bytes, payload: bytes, opts: Any) -> SendResult:
    err = new_err()
    res = ffi.new("cfn_send_result *")
    rc = lib.cfn_send(h, sender, to, mtype, len(mtype), payload, len(payload), opts, res, err)
    if rc == _EINTR:
        _reraise_interruption()
        rc = _resume_after_signal(h, sender, to, mtype, payload, opts, res, err)
    if rc:
        raise send_error(error_for(rc, err), int(res.retries), int(res.waited_ns), bool(res.locked),
                         bool(res.deadline), int(res.circuit), int(res.retry_after_ns))
    return SendResult(
        ffi.string(res.msg_id).decode("ascii"),
        res.sequence,
        res.timestamp,
        res.retries,
        res.wakeups,
        res.waited_ns,
        bool(res.outbox_copied),
        res.circuit,
    )


def _resume_after_signal(h: Handle, sender: bytes, to: bytes, mtype: bytes, payload: bytes,
                         opts: Any, res: Any, err: Any) -> int:
    """A signal cut a backpressure wait short. Python has run its handler by
    now (a KeyboardInterrupt would have left already); carry on with what is
    left of the retries and the time budget."""
    retries, waited = 0, 0
    budget_ms = opts.max_total_ms or opts.wait_ms * max(0, opts.max_retries)
    rc = _EINTR
    while rc == _EINTR:
        retries += res.retries
        waited += res.waited_ns
        left = ffi.new("cfn_send_opts *", opts[0])
        if opts.max_retries >= 0:
            left.max_retries = max(0, opts.max_retries - retries)
            if budget_ms:
                left.max_total_ms = max(1, budget_ms - waited // 1_000_000)
        rc = lib.cfn_send(h, sender, to, mtype, len(mtype), payload, len(payload), left, res, err)
        if rc == _EINTR:
            _reraise_interruption()
    res.retries += retries
    res.waited_ns += waited
    return rc


class CircuitInfo(NamedTuple):
    state: str          # "closed", "open" or "half-open"
    failures: int       # closed: failed sends in a row
    probes: int         # half-open: probes admitted in this round
    probe_limit: int    # half-open: probes the round admits
    retry_after: float  # open: seconds until probes go; half-open: until the round ends
    rejected: int       # sends refused while open


CIRCUIT_STATES = {lib.CFN_CIRCUIT_CLOSED: "closed", lib.CFN_CIRCUIT_OPEN: "open",
                  lib.CFN_CIRCUIT_HALF_OPEN: "half-open"}


def circuit_get(h: Handle, agent: bytes) -> CircuitInfo:
    out = ffi.new("cfn_circuit_info *")
    _checked(lib.cfn_circuit_get, h, agent, out)
    return CircuitInfo(CIRCUIT_STATES.get(out.state, "closed"), out.failures, out.probes, out.probe_limit,
                       out.retry_after_ns / 1e9, out.rejected)


def circuit_reset(h: Handle, agent: bytes) -> str:
    """Closes the circuit; the state it had."""
    return CIRCUIT_STATES.get(_checked(lib.cfn_circuit_reset, h, agent), "closed")


class FlowInfo(NamedTuple):
    count: int  # type: ignore[assignment]  # messages and reservations; shadows tuple.count on purpose
    capacity: int
    limit: int          # the adaptive limit in force; 0: none
    sojourn_ms: float   # mean age of what was taken in the last interval measured
    drained: int        # places freed over the last second
    waiting: int        # senders in the line for room
    high_sent: int      # high-priority messages delivered, ever


def flow_get(h: Handle, agent: bytes) -> FlowInfo:
    out = ffi.new("cfn_flow_info *")
    _checked(lib.cfn_flow_get, h, agent, out)
    return FlowInfo(out.count, out.capacity, out.limit, out.sojourn_us / 1000, out.drained, out.waiting,
                    out.high_sent)


TOP_SENDERS: int = lib.CFN_TOP_SENDERS


def senders_get(h: Handle, agent: bytes) -> list[tuple[int, int]]:
    """The inbox's heaviest senders as (key, count), heaviest first."""
    out = ffi.new("cfn_sender_share[]", TOP_SENDERS)
    n = _checked(lib.cfn_senders_get, h, agent, out, TOP_SENDERS)
    return [(int(out[i].key), int(out[i].count)) for i in range(n)]


def sender_key(agent: bytes) -> int:
    """The key an agent id has in the top-senders tables."""
    return int(lib.cfn_sender_key(agent))


def _checked(fn: Any, *args: Any) -> int:
    """Calls fn(*args, err) and returns its count, raising the CfnError its
    negative code names. A lock wait cut short by a signal (-EINTR) is
    retried once Python has run the handler (which may raise instead)."""
    err = new_err()
    while True:
        n = fn(*args, err)
        if n != _EINTR:
            break
        _reraise_interruption()
    if n < 0:
        raise_for(n, err)
    return int(n)


def next_sequence(h: Handle, sender: bytes, to: bytes) -> int:
    """Advances sender->to's sequence as a send does; the new number."""
    return _checked(lib.cfn_next_sequence, h, sender, to)


def arrivals(h: Handle, agent: bytes) -> int:
    """The inbox's arrivals word: read it before looking in the inbox, then wait_arrival on it."""
    return _checked(lib.cfn_arrivals, h, agent)


def wait_arrival(h: Handle, agent: bytes, seen: int, timeout_ns: int) -> bool:
    """Sleeps until a message arrives in the inbox (True at once if one did
    since ``seen`` was read) or timeout_ns passes (False; < 0: no timeout)."""
    err = new_err()
    deadline = None if timeout_ns < 0 else time.monotonic_ns() + timeout_ns
    while True:
        left = -1 if deadline is None else max(0, deadline - time.monotonic_ns())
        rc = lib.cfn_wait_arrival(h, agent, seen & 0xFFFFFFFF, left, err)
        if rc != _EINTR:
            break
        _reraise_interruption()
    if rc == lib.CFN_E_TIMEOUT:
        return False
    if rc:
        raise_for(rc, err)
    return True


WORD_ROOM: int = lib.CFN_WORD_ROOM
WORD_ARRIVAL: int = lib.CFN_WORD_ARRIVAL
WAIT_WORDS_MAX: int = lib.CFN_WAIT_WORDS_MAX


def word(h: Handle, agent: bytes, kind: int) -> int:
    """An inbox's ROOM or ARRIVAL word now (read it before the attempt that may fail)."""
    return _checked(lib.cfn_word, h, agent, kind)


def wait_ctl(h: Handle) -> int:
    return int(lib.cfn_wait_ctl(h))


def wait_interrupt(h: Handle) -> None:
    """Wakes the thread in wait_words: the set of words to wait on changed."""
    lib.cfn_wait_interrupt(h)


def wait_words(h: Handle, agents: list[bytes], kinds: list[int], seen: list[int], ctl: int,
               timeout_ns: int) -> Optional[list[bool]]:
    """Sleeps until one of the words is not what ``seen`` says (or the control
    word moved): which did, or None when timeout_ns ran out. One futex_waitv."""
    err = new_err()
    n = len(agents)
    packed = _pack(agents)
    kinds_c = ffi.new("int32_t[]", kinds or [0])
    seen_c = ffi.new("uint32_t[]", [v & 0xFFFFFFFF for v in seen] or [0])
    changed = ffi.new("uint8_t[]", max(1, n))
    rc = lib.cfn_wait_words(h, packed, len(packed), kinds_c, seen_c, n, ctl & 0xFFFFFFFF, timeout_ns, changed,
                            err)
    if rc == lib.CFN_E_TIMEOUT:
        return None
    if rc == _EINTR:
        return [False] * n  # a signal this thread caught (Python runs handlers in the main thread): wait again
    if rc < 0:
        raise_for(rc, err)
    return [bool(c) for c in ffi.unpack(changed, n)] if n else []


def inbox_size(h: Handle, agent: bytes) -> int:
    n = lib.cfn_inbox_size(h, agent, ffi.NULL)  # the hot read: no error buffer unless it fails
    if n < 0:
        return _checked(lib.cfn_inbox_size, h, agent)
    return int(n)


def inbox_capacity(h: Handle, agent: bytes, fallback: int) -> int:
    """The capacity that holds for the inbox (recorded at init or by its first sender), else fallback."""
    return _checked(lib.cfn_inbox_capacity, h, agent, fallback)


def slots_sweep(h: Handle) -> int:
    """Frees the slots of inboxes whose folder is gone; returns how many."""
    return _checked(lib.cfn_slots_sweep, h)


def scan_count(h: Handle, agent: bytes, box: bytes) -> int:
    return _checked(lib.cfn_scan_count, h, agent, box)


class ReconcileResult(NamedTuple):
    count: int  # type: ignore[assignment]  # the inbox's count; shadows tuple.count on purpose
    files: int
    claimed: int
    before: int
    stale_tmp_removed: int
    recovered: int
    scanned: bool


def reconcile(h: Handle, agent: bytes, force: bool) -> ReconcileResult:
    res = ffi.new("cfn_reconcile_result *")
    _checked(lib.cfn_reconcile, h, agent, 1 if force else 0, res)
    return ReconcileResult(res.count, res.files, res.claimed, res.before, res.stale_tmp_removed,
                           res.recovered, bool(res.scanned))


READ_PEEK: int = lib.CFN_READ_PEEK
READ_NEXT: int = lib.CFN_READ_NEXT
READ_CLAIM: int = lib.CFN_READ_CLAIM
FROM_INBOX: int = lib.CFN_FROM_INBOX
FROM_CLAIMS: int = lib.CFN_FROM_CLAIMS
JSON_EXACT: int = lib.CFN_JSON_BIG_INT | lib.CFN_JSON_HUGE_NUMBER  # numbers a double cannot hold


class Record(NamedTuple):
    name: bytes   # the file's name in the inbox (or claim folder)
    flags: int    # CFN_JSON_* bits: how the bytes must be decoded
    data: bytes   # the file's bytes, checked as one JSON object by C


def read_messages(h: Handle, agent: bytes, mode: int, max_messages: int,
                  max_bytes: int) -> tuple[list[Record], int]:
    """Message files, oldest first, and how many bad files were quarantined.
    Nothing is deleted: READ_NEXT leaves them for take(), READ_CLAIM moves them
    into this handle's claim folder."""
    blob = ffi.new("cfn_blob *")
    try:
        _checked(lib.cfn_read_messages, h, agent, mode, max_messages, max_bytes, blob)
        data = ffi.unpack(blob.data, blob.len) if blob.len else b""
        count, bad = blob.count, blob.quarantined
    finally:
        lib.cfn_blob_free(blob)
    # each record: u32 name length, name, u32 flags, u32 size, bytes (little-endian);
    # struct reads in place (3.5x faster than memoryview slices and int.from_bytes)
    out: list[Record] = []
    add = out.append
    pos = 0
    for _ in range(count):
        (n,) = _U32(data, pos)
        p = pos + 4 + n
        flags, size = _U32X2(data, p)
        add(Record(data[pos + 4:p], flags, data[p + 8:p + 8 + size]))
        pos = p + 8 + size
    return out, int(bad)


_U32 = struct.Struct("<I").unpack_from
_U32X2 = struct.Struct("<II").unpack_from


def _pack(names: list[bytes]) -> bytes:
    """Each name NUL-terminated, one after another."""
    return b"\0".join(names) + b"\0" if names else b""


def take(h: Handle, agent: bytes, where: int, names: list[bytes]) -> tuple[list[bool], Optional[E.CfnError]]:
    """Deletes the named messages (from the inbox or this handle's claims):
    which were deleted by this call, and the first failure that left one in
    place (None when there was none). Raises only when nothing was deleted."""
    if not names:
        return [], None
    packed = _pack(names)
    taken = ffi.new("uint8_t[]", len(names))
    err = new_err()
    while True:
        n = lib.cfn_take(h, agent, where, packed, len(packed), taken, err)
        if n != _EINTR:
            break
        _reraise_interruption()
    if n < 0:
        raise_for(n, err)
    failure = error_for(err.code, err) if err.code < 0 else None
    return list(map(bool, ffi.unpack(taken, len(names)))), failure


def put_back(h: Handle, agent: bytes, names: list[bytes]) -> int:
    """Moves claimed messages back into the inbox."""
    packed = _pack(names)
    return _checked(lib.cfn_put_back, h, agent, packed, len(packed)) if names else 0


def quarantine(h: Handle, agent: bytes, where: int, names: list[bytes]) -> int:
    """Moves bad messages to <agent>/.quarantine."""
    packed = _pack(names)
    return _checked(lib.cfn_quarantine, h, agent, where, packed, len(packed)) if names else 0


def clear_inbox(h: Handle, agent: bytes) -> int:
    return _checked(lib.cfn_clear_inbox, h, agent)


class SlotInfo(NamedTuple):
    agent: str
    count: int  # type: ignore[assignment]  # -1 when never scanned; shadows tuple.count on purpose
    capacity: int
    waiters: int
    reconcile_ns: int


def new_slot_buffer() -> Any:
    """Room for every slot (2.7 MB): a caller that reads slots often keeps one."""
    return ffi.new("cfn_slot_info[]", lib.CFN_SLOTS)


def slots(h: Handle, buf: Any = None) -> list[SlotInfo]:
    """Every inbox the state file tracks, in one C call."""
    if buf is None:
        buf = new_slot_buffer()
    n = lib.cfn_slots_snapshot(h, buf, lib.CFN_SLOTS)
    if n < 0:
        raise_for(n, None)
    out = []
    for i in range(n):
        info = buf[i]
        out.append(SlotInfo(ffi.string(info.agent).decode("ascii", "replace"), info.count,
                            info.capacity, info.waiters, info.reconcile_ns))
    return out


def counter_add(h: Handle, index: int, delta: int) -> None:
    rc = lib.cfn_counter_add(h, index, delta)
    if rc:
        raise_for(rc, None)


def counter_get(h: Handle, index: int) -> int:
    out = ffi.new("int64_t *")
    rc = lib.cfn_counter_get(h, index, out)
    if rc:
        raise_for(rc, None)
    return int(out[0])


class RateSettings(NamedTuple):
    batch_size: int
    wait_ms: int
    load_milli: int
    updated_ns: int
    interval_ms: int


def rate_publish(h: Handle, s: RateSettings) -> None:
    rc = lib.cfn_rate_publish(h, ffi.new("cfn_rate_settings *", s._asdict()))
    if rc:
        raise_for(rc, None)


def rate_read(h: Handle) -> RateSettings:
    out = ffi.new("cfn_rate_settings *")
    rc = lib.cfn_rate_read(h, out)
    if rc:
        raise_for(rc, None)
    return RateSettings(out.batch_size, out.wait_ms, out.load_milli, out.updated_ns, out.interval_ms)


def cooldown_try(h: Handle, key: bytes, now_ns: int, cooldown_ns: int) -> bool:
    rc = lib.cfn_cooldown_try(h, key, len(key), now_ns, cooldown_ns)
    if rc < 0:
        raise_for(rc, None)
    return bool(rc)


def log_open(path: str, mode: int, gid: Optional[int]) -> int:
    """A descriptor appending to a metrics or alert file, opened under the trust
    rule of csrc/logfile.c (UnsafePath for a FIFO, a symlink, another user's or
    an everyone-writable file). The caller closes it."""
    err = new_err()
    fd = lib.cfn_log_open(os.fsencode(path), mode, -1 if gid is None else gid, err)
    if fd < 0:
        raise_for(fd, err)
    return int(fd)


def log_open_read(path: str, gid: Optional[int]) -> Optional[int]:
    """A descriptor reading a metrics or alert file under the same rule; None when there is none."""
    err = new_err()
    fd = lib.cfn_log_open_read(os.fsencode(path), -1 if gid is None else gid, err)
    if fd == -_errno.ENOENT:
        return None
    if fd < 0:
        raise_for(fd, err)
    return int(fd)


def set_metrics(h: Handle, path: Optional[str], max_bytes: int = 0, mode: int = 0o600,
                gid: Optional[int] = None) -> None:
    """Gives the handle its METRICS_FILE (None: metrics off, its file closed)."""
    err = new_err()
    rc = lib.cfn_set_metrics(h, ffi.NULL if path is None else os.fsencode(path), max_bytes, mode,
                             -1 if gid is None else gid, err)
    if rc:
        raise_for(rc, err)


def metrics_write(h: Handle, data: bytes, nlines: int) -> int:
    """Appends whole metric lines through the handle's writer; 0 when metrics are off."""
    err = new_err()
    n = lib.cfn_metrics_write(h, data, len(data), nlines, err)
    if n < 0:
        raise_for(n, err)
    return int(n)


def metric_format(name: bytes, value: float, unit: bytes, tags_json: bytes) -> bytes:
    """The metric's JSONL line (newline included), formatted by the same C code the send loop uses."""
    err = new_err()
    cap = 256 + 6 * (len(name) + len(unit)) + len(tags_json)
    buf = ffi.new("char[]", cap)
    n = lib.cfn_metric_format(buf, cap, name, value, unit, tags_json, len(tags_json), err)
    if n < 0:
        raise_for(n, err)
    return bytes(ffi.unpack(buf, n))


COUNTER_FIRST_FREE: int = lib.CFN_CTR_FIRST_FREE
COUNTER_SLOTS: int = lib.CFN_COUNTERS


def proc_start(pid: int) -> int:
    """Start time in clock ticks since boot; 0 when the process is gone or a zombie."""
    return int(lib.cfn_proc_start(pid)) if 0 < pid < 2**31 else 0


def rate_fresh(s: RateSettings, stale_after_ms: int, now_ns: int) -> bool:
    return bool(lib.cfn_rate_fresh(ffi.new("cfn_rate_settings *", s._asdict()), stale_after_ms, now_ns))


COUNTERS: dict[str, int] = {
    "sent": lib.CFN_CTR_SENT,
    "consumed": lib.CFN_CTR_CONSUMED,
    "send_full": lib.CFN_CTR_SEND_FULL,
    "backpressure_wait": lib.CFN_CTR_BP_WAIT,
    "backpressure_success": lib.CFN_CTR_BP_SUCCESS,
    "backpressure_failure": lib.CFN_CTR_BP_FAILURE,
    "reconcile": lib.CFN_CTR_RECONCILE,
    "quarantined": lib.CFN_CTR_QUARANTINED,
    "recovered": lib.CFN_CTR_RECOVERED,
    "stale_tmp_removed": lib.CFN_CTR_STALE_TMP,
    "metrics": lib.CFN_CTR_METRICS,
    "alerts": lib.CFN_CTR_ALERTS,
    "alerts_suppressed": lib.CFN_CTR_ALERTS_SUPPRESSED,
    "lock_timeouts": lib.CFN_CTR_LOCK_TIMEOUTS,
    "take_errors": lib.CFN_CTR_TAKE_ERRORS,
    "state_reattached": lib.CFN_CTR_STATE_REATTACHED,
    "slots_freed": lib.CFN_CTR_SLOTS_FREED,
    "outbox_pruned": lib.CFN_CTR_OUTBOX_PRUNED,
    "circuit_opened": lib.CFN_CTR_CIRCUIT_OPENED,
    "circuit_closed": lib.CFN_CTR_CIRCUIT_CLOSED,
    "circuit_rejected": lib.CFN_CTR_CIRCUIT_REJECTED,
    "sent_high": lib.CFN_CTR_SENT_HIGH,
}
