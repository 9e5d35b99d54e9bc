"""The storage seam: what MessageBus, its monitors and its telemetry need from
the place messages live, behind one small interface.

``Storage`` is the interface; ``FileStorage`` is its first implementation,
one base folder of agent folders backed by the C core. It is the only holder
of the core's handle and the only module that imports ``_core``: everything
above it asks it. A backend for another engine is a new module
implementing ``Storage``, not a rewrite of the bus: redis_storage.py is one.

Agent ids arrive as ``str`` and are encoded here; the C core checks their
characters, once per call.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import Any, NamedTuple, Optional, Protocol, Union

from cfn_fast import _core
from cfn_fast.config import Config
from cfn_fast.errors import CfnError, CfnOSError, InboxNotFound, InvalidArgument

SendResult = _core.SendResult
ReconcileResult = _core.ReconcileResult
Record = _core.Record
SlotInfo = _core.SlotInfo
RateSettings = _core.RateSettings
CircuitInfo = _core.CircuitInfo
FlowInfo = _core.FlowInfo

READ_PEEK = _core.READ_PEEK
READ_NEXT = _core.READ_NEXT
READ_CLAIM = _core.READ_CLAIM
FROM_INBOX = _core.FROM_INBOX
FROM_CLAIMS = _core.FROM_CLAIMS
JSON_EXACT = _core.JSON_EXACT
AGENT_MAX = _core.AGENT_MAX
TYPE_MAX = _core.TYPE_MAX

# The shared counters, by name: the C core's (indexes below its CFN_CTR_FIRST_FREE),
# then the upper layers' own. Their order is the state file's layout.
_OWN_COUNTERS = (
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
COUNTERS: dict[str, int] = {**_core.COUNTERS,
                            **{n: _core.COUNTER_FIRST_FREE + i for i, n in enumerate(_OWN_COUNTERS)}}
assert max(COUNTERS.values()) < _core.COUNTER_SLOTS, "shared counter table overflows the state file's"


class SenderShare(NamedTuple):
    """One of an inbox's heaviest senders: its count over the last windows
    (halved every 10 s) and its share of the counted messages."""
    sender: str
    count: int  # type: ignore[assignment]  # shadows tuple.count on purpose, as _core's tuples do
    share: float


def shares(counts: list[tuple[str, int]]) -> list[SenderShare]:
    total = sum(c for _, c in counts) or 1
    return [SenderShare(who, c, round(c / total, 4)) for who, c in counts]


def agent_bytes(agent: object, role: str = "agent id") -> bytes:
    """An agent id for the core (type, NUL and ASCII checked here; characters by C)."""
    return _core.agent_bytes(agent, role)


def check_agent(agent: str, role: str = "agent id") -> None:
    """Raises InvalidAgentId when agent is not a valid agent id."""
    _core.check_agent(_core.agent_bytes(agent, role))


def check_json(data: bytes) -> None:
    """Raises InvalidPayload unless data is JSON every reader returns intact (the send policy)."""
    _core.check_json(data)


def send_failure(rc: int, what: str, retries: int, waited_ns: int, locked: bool, deadline: bool, circuit: int,
                 retry_after_ns: int) -> CfnError:
    """The exception a send that failed in C raises, from its result's parts
    (a send the native program made, reported by native_sent.py)."""
    return _core.send_error(_core.error_from(rc, what), retries, waited_ns, locked, deadline, circuit,
                            retry_after_ns)


def json_escape(text: bytes) -> bytes:
    """UTF-8 text as the inside of a JSON string, escaped as the C core writes the envelope's type."""
    return _core.json_escape(text)


def exact_flags(data: bytes) -> int:
    """JSON_EXACT when a stored message holds a number a double cannot (for a
    reader of another store, as cfn_read_messages flags a file); else 0."""
    flags = _core.json_flags(data) if data else 0
    return flags & JSON_EXACT if flags > 0 else 0  # not JSON (-1): the decoder refuses it anyway


def metric_line(name: bytes, value: float, unit: bytes, tags_json: bytes) -> bytes:
    """One metric JSONL line, formatted by the C code the send loop uses."""
    return _core.metric_format(name, value, unit, tags_json)


def proc_start(pid: int) -> Optional[int]:
    """A process's start time in clock ticks since boot, or None when it is
    gone or a zombie. With the pid it names one process: a reused pid has another."""
    return _core.proc_start(pid) or None


def rate_fresh(s: RateSettings, stale_after_ms: int, now_ns: int) -> bool:
    """Whether published rate-limit settings still hold (the rule the C send loop applies)."""
    return _core.rate_fresh(s, stale_after_ms, now_ns)


class Storage(Protocol):
    """What the layers above need from where messages live."""

    config: Config
    base_dir: str
    metrics_error: Optional[CfnError]

    # the place itself
    def exists(self) -> bool: ...
    def create(self) -> None: ...
    def close(self) -> None: ...
    def destroy(self) -> None: ...
    # agents
    def init_agent(self, agent: str, capacity: int) -> None: ...
    def remove_agent(self, agent: str) -> None: ...
    def list_agents(self) -> list[str]: ...
    def list_names(self) -> list[str]: ...  # what may be an inbox, unchecked: the monitor reconciles each
    def has_inbox(self, agent: str) -> bool: ...
    def has_agent(self, agent: str) -> bool: ...  # an inbox, or anything else kept for the agent
    # sending, counting
    def deliver(self, sender: str, to: str, mtype: bytes, payload: bytes, backpressure: bool,
                deadline_ns: int = 0, high: bool = False, last_try: bool = False) -> SendResult: ...
    def next_sequence(self, sender: str, to: str) -> int: ...
    def deliver_many(self, sender: str, to: str, mtype: bytes, payloads: list[bytes],
                     backpressure: bool, high: bool = False) -> list[Union[SendResult, CfnError]]: ...
    def size(self, agent: str) -> int: ...
    def capacity(self, agent: str, own: int) -> int: ...
    def count_files(self, agent: str, box: str) -> int: ...
    def reconcile(self, agent: str, force: bool) -> ReconcileResult: ...
    def slots(self, reuse: bool = False) -> list[SlotInfo]: ...
    def sweep(self) -> int: ...
    # reading
    def read(self, agent: str, mode: int, max_messages: int, max_bytes: int) -> tuple[list[Record], int]: ...
    def take(self, agent: str, where: int, names: list[bytes]) -> tuple[list[bool], Optional[CfnError]]: ...
    def put_back(self, agent: str, names: list[bytes]) -> int: ...
    def arrivals(self, agent: str) -> int: ...
    def wait_arrival(self, agent: str, seen: int, timeout_ns: int) -> bool: ...
    def quarantine(self, agent: str, where: int, names: list[bytes]) -> int: ...
    def clear(self, agent: str) -> int: ...
    # state shared by every process
    def counter_add(self, name: str, delta: int = 1) -> None: ...
    def counters(self) -> dict[str, int]: ...
    def rate_publish(self, s: RateSettings) -> None: ...
    def rate_read(self) -> Optional[RateSettings]: ...
    def cooldown_try(self, key: bytes, now_ns: int, cooldown_ns: int) -> Optional[bool]: ...
    # flow control
    def circuit(self, agent: str) -> CircuitInfo: ...
    def circuit_reset(self, agent: str) -> str: ...
    def top_senders(self, agent: str) -> list[SenderShare]: ...
    def flow(self, agent: str) -> FlowInfo: ...
    # telemetry files
    def metrics_write(self, data: bytes, nlines: int) -> bool: ...
    def open_log(self, path: str) -> int: ...
    def open_log_read(self, path: str) -> Optional[int]: ...


class FileStorage:
    """One base folder: <base>/<agent>/{inbox,outbox}, and the shared state
    file the C core maps. The handle opens on first use; a read never creates
    the base folder. Safe to use from many threads; ``close`` waits for the
    calls in flight (a call starting meanwhile raises BusClosed), and a later
    call opens it again."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.base_dir = config.base_dir
        self._handle: Optional[_core.Handle] = None
        self._lock = threading.Lock()
        self._slot_buf: Any = None
        self.metrics_error: Optional[CfnError] = None
        c = config
        common = dict(
            capacity=c.max_inbox_size, wait_ms=c.backpressure_wait_ms, max_total_ms=c.backpressure_max_total_ms,
            max_payload=c.max_message_bytes, stale_after_ms=self.stale_after_ms, outbox_max=c.outbox_max,
            backoff=_core.BACKOFF_CODES[c.backpressure_backoff], fsync=1 if c.fsync else 0,
            file_mode=c.file_mode, dir_mode=c.dir_mode, breaker_failures=c.breaker_failures,
            breaker_rate_pct=c.breaker_failure_rate, breaker_min_calls=c.breaker_min_calls,
            breaker_probes=c.breaker_probes, breaker_window_ms=c.breaker_window_ms,
            breaker_cooldown_ms=c.breaker_cooldown_ms, headroom_pct=c.priority_headroom_pct)
        self._plain = _core.new_send_opts(max_retries=-1, **common)
        self._backpressure = _core.new_send_opts(max_retries=c.backpressure_max_retries, **common)
        self._plain_high = _core.new_send_opts(self._plain, priority=_core.PRIORITY_HIGH)
        self._backpressure_high = _core.new_send_opts(self._backpressure, priority=_core.PRIORITY_HIGH)

    @property
    def stale_after_ms(self) -> int:
        """Published rate-limit settings go stale after three check intervals."""
        return int(self.config.rate_limit_check_interval * 3000)

    # -- the handle -------------------------------------------------------------
    def _h(self, create: bool = False) -> Optional[_core.Handle]:
        """The handle, opened on first use; None when the base folder does not
        exist and ``create`` is off (nothing is made by a read)."""
        h = self._handle
        if h is not None:
            return h
        with self._lock:
            if self._handle is None:
                cfg = self.config
                try:
                    h = _core.open_bus(self.base_dir, create, cfg.dir_mode, cfg.group, cfg.lock_timeout_ms,
                                       dict(priority_ratio=cfg.priority_ratio,
                                            adaptive=1 if cfg.adaptive_limit == "delay" else 0,
                                            adaptive_target_ms=cfg.adaptive_target_ms,
                                            adaptive_interval_ms=cfg.adaptive_interval_ms,
                                            adaptive_floor=cfg.adaptive_floor))
                except CfnOSError as e:
                    if create or e.errno != errno.ENOENT:
                        raise
                    return None
                if cfg.metrics_enabled and self.metrics_error is None:
                    # the send loop's backpressure lines and telemetry's share one
                    # writer; a refused METRICS_FILE turns metrics off, and nothing else
                    try:
                        _core.set_metrics(h, cfg.metrics_file, cfg.metrics_max_bytes, cfg.file_mode, cfg.group)
                    except CfnError as e:
                        self.metrics_error = e
                self._handle = h
            return self._handle

    def _need(self, agent: str) -> _core.Handle:
        h = self._h()
        if h is None:
            raise InboxNotFound(f"agent '{agent}' has no inbox (base folder {self.base_dir} does not exist)")
        return h

    def handle(self, create: bool = False) -> Optional[_core.Handle]:
        """The C core's handle (None when the base folder does not exist): for
        tests of the core itself. Nothing in the package above this module uses it."""
        return self._h(create)

    def exists(self) -> bool:
        return self._h() is not None

    def create(self) -> None:
        """The base folder (with the bus's mode) and its state file."""
        self._h(create=True)

    def close(self) -> None:
        with self._lock:
            h, self._handle = self._handle, None
        if h is not None:
            _core.close_bus(h)  # waits for calls in flight (they hold h, so it is not freed under them)

    def destroy(self) -> None:
        """Removes the base folder and everything in it."""
        self.close()
        _rmtree(self.base_dir)

    # -- agents ------------------------------------------------------------------
    def init_agent(self, agent: str, capacity: int) -> None:
        a = agent_bytes(agent)
        _core.init_agent(self._h(create=True), a, capacity)

    def remove_agent(self, agent: str) -> None:
        a = agent_bytes(agent)
        _core.check_agent(a)  # before any path is built from it: "" or ".." must not reach rmtree
        h = self._h()
        if h is None:
            return
        _rmtree(os.path.join(self.base_dir, agent))
        _core.forget_agent(h, a)

    def list_agents(self) -> list[str]:
        """Agents of the base folder that have an inbox, sorted."""
        try:
            names = os.listdir(self.base_dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            if name.startswith("."):
                continue
            try:
                _core.check_agent(name.encode("ascii"))
            except (CfnError, UnicodeEncodeError):
                continue
            path = os.path.join(self.base_dir, name)
            inbox = os.path.join(path, "inbox")
            if os.path.isdir(inbox) and not os.path.islink(inbox) and not os.path.islink(path):
                out.append(name)
        return sorted(out)

    def list_names(self) -> list[str]:
        """Every folder of the base folder that is not a dotfile: each may be an inbox."""
        try:
            with os.scandir(self.base_dir) as it:
                return [e.name for e in it if e.name[0] != "." and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def has_inbox(self, agent: str) -> bool:
        path = os.path.join(self.base_dir, agent, "inbox")
        return os.path.isdir(path) and not os.path.islink(path)

    def has_agent(self, agent: str) -> bool:
        return os.path.isdir(os.path.join(self.base_dir, agent))

    # -- sending and counting ----------------------------------------------------
    def deliver_many(self, sender: str, to: str, mtype: bytes, payloads: list[bytes],
                     backpressure: bool, high: bool = False) -> list[Union[SendResult, CfnError]]:
        """deliver for each payload, in order: its result or the error that refused it."""
        out: list[Union[SendResult, CfnError]] = []
        for p in payloads:
            try:
                out.append(self.deliver(sender, to, mtype, p, backpressure, 0, high))
            except CfnError as e:
                out.append(e)
        return out

    def deliver(self, sender: str, to: str, mtype: bytes, payload: bytes, backpressure: bool,
                deadline_ns: int = 0, high: bool = False, last_try: bool = False) -> SendResult:
        """One send; deadline_ns (CLOCK_MONOTONIC, as time.monotonic_ns) bounds the whole call; a
        high-priority one may use the inbox's headroom. ``last_try``: a backpressure send whose
        waits were spent elsewhere (aio): one try, and a full inbox is its BackpressureTimeout."""
        s, t = agent_bytes(sender, "sender"), agent_bytes(to, "recipient")
        if high:
            opts = self._backpressure_high if backpressure else self._plain_high
        else:
            opts = self._backpressure if backpressure else self._plain
        if last_try:
            opts = _core.new_send_opts(opts, max_retries=0, wait_ms=0, max_total_ms=0)
        if deadline_ns:
            opts = _core.new_send_opts(opts, deadline_ns=deadline_ns)
        return _core.send(self._need(to), s, t, mtype, payload, opts)

    def next_sequence(self, sender: str, to: str) -> int:
        s, t = agent_bytes(sender, "sender"), agent_bytes(to, "recipient")
        return _core.next_sequence(self._h(create=True), s, t)

    def size(self, agent: str) -> int:
        a = agent_bytes(agent)
        h = self._h()
        return 0 if h is None else _core.inbox_size(h, a)

    def capacity(self, agent: str, own: int) -> int:
        a = agent_bytes(agent)
        h = self._h()
        return own if h is None else _core.inbox_capacity(h, a, own)

    def count_files(self, agent: str, box: str) -> int:
        a = agent_bytes(agent)
        if box not in ("inbox", "outbox"):
            raise InvalidArgument(f"box must be 'inbox' or 'outbox', not {box!r}")
        h = self._h()
        return 0 if h is None else _core.scan_count(h, a, box.encode())

    def reconcile(self, agent: str, force: bool) -> ReconcileResult:
        a = agent_bytes(agent)
        return _core.reconcile(self._need(agent), a, force)

    def slots(self, reuse: bool = False) -> list[SlotInfo]:
        """Every inbox the shared state tracks. ``reuse`` keeps one 2.7 MB
        buffer for a caller that reads them every pass (a monitor)."""
        h = self._h()
        if h is None:
            return []
        if reuse and self._slot_buf is None:
            self._slot_buf = _core.new_slot_buffer()
        return _core.slots(h, self._slot_buf if reuse else None)

    def sweep(self) -> int:
        h = self._h()
        return 0 if h is None else _core.slots_sweep(h)

    # -- reading ------------------------------------------------------------------
    def read(self, agent: str, mode: int, max_messages: int, max_bytes: int) -> tuple[list[Record], int]:
        a = agent_bytes(agent)
        return _core.read_messages(self._need(agent), a, mode, max_messages, max_bytes)

    def take(self, agent: str, where: int, names: list[bytes]) -> tuple[list[bool], Optional[CfnError]]:
        a = agent_bytes(agent)
        return _core.take(self._need(agent), a, where, names)

    def put_back(self, agent: str, names: list[bytes]) -> int:
        a = agent_bytes(agent)
        return _core.put_back(self._need(agent), a, names)

    def quarantine(self, agent: str, where: int, names: list[bytes]) -> int:
        a = agent_bytes(agent)
        return _core.quarantine(self._need(agent), a, where, names)

    def arrivals(self, agent: str) -> int:
        """A word that moves whenever a message arrives in the inbox (read it before looking)."""
        a = agent_bytes(agent)
        return _core.arrivals(self._need(agent), a)

    def wait_arrival(self, agent: str, seen: int, timeout_ns: int) -> bool:
        """Sleeps on the inbox's futex until a message arrives after ``seen`` was
        read (True) or timeout_ns passes (False; < 0: none)."""
        a = agent_bytes(agent)
        return _core.wait_arrival(self._need(agent), a, seen, timeout_ns)

    # -- many inboxes at once, for an event loop's waiter thread (aio.py) ---------------
    WORD_ROOM = _core.WORD_ROOM
    WORD_ARRIVAL = _core.WORD_ARRIVAL
    WAIT_WORDS_MAX = _core.WAIT_WORDS_MAX

    def word(self, agent: str, kind: int) -> int:
        a = agent_bytes(agent)
        return _core.word(self._need(agent), a, kind)

    def wait_ctl(self) -> int:
        return _core.wait_ctl(self._h(create=True))

    def wait_interrupt(self) -> None:
        _core.wait_interrupt(self._h(create=True))

    def wait_words(self, words: list[tuple[str, int]], seen: list[int], ctl: int,
                   timeout_ns: int) -> Optional[list[bool]]:
        """Sleeps (one futex_waitv, the GIL released) until one of the (agent,
        kind) words is not what ``seen`` says or the control word moved past
        ``ctl``: which moved, or None when timeout_ns ran out."""
        return _core.wait_words(self._h(create=True), [agent_bytes(a) for a, _ in words], [k for _, k in words],
                                seen, ctl, timeout_ns)

    def clear(self, agent: str) -> int:
        a = agent_bytes(agent)
        h = self._h()
        if h is None:
            return 0
        try:
            return _core.clear_inbox(h, a)
        except InboxNotFound:
            return 0

    # -- state shared by every process ----------------------------------------------
    def counter_add(self, name: str, delta: int = 1) -> None:
        """Adds to a shared counter (nothing when the base folder does not exist)."""
        h = self._h()
        if h is not None:
            _core.counter_add(h, COUNTERS[name], delta)

    def counters(self) -> dict[str, int]:
        """Every shared counter by name (zeros when the base folder does not exist)."""
        h = self._h()
        if h is None:
            return {name: 0 for name in COUNTERS}
        return {name: _core.counter_get(h, idx) for name, idx in COUNTERS.items()}

    def rate_publish(self, s: RateSettings) -> None:
        _core.rate_publish(self._h(create=True), s)

    def rate_read(self) -> Optional[RateSettings]:
        h = self._h()
        return None if h is None else _core.rate_read(h)

    def cooldown_try(self, key: bytes, now_ns: int, cooldown_ns: int) -> Optional[bool]:
        """True: go ahead (the cooldown restarts); False: inside it; None: no
        shared state to ask (the base folder does not exist)."""
        h = self._h()
        return None if h is None else _core.cooldown_try(h, key, now_ns, cooldown_ns)

    # -- flow control ------------------------------------------------------------------
    def circuit(self, agent: str) -> CircuitInfo:
        """The inbox's circuit breaker as every process sees it."""
        a = agent_bytes(agent)
        h = self._h()
        return _core.CircuitInfo("closed", 0, 0, 0, 0.0, 0) if h is None else _core.circuit_get(h, a)

    def circuit_reset(self, agent: str) -> str:
        """Closes the inbox's circuit; the state it had."""
        a = agent_bytes(agent)
        h = self._h()
        return "closed" if h is None else _core.circuit_reset(h, a)

    def flow(self, agent: str) -> FlowInfo:
        """The inbox's flow-control state: count, capacity, adaptive limit, sojourn, drain, line."""
        a = agent_bytes(agent)
        h = self._h()
        return _core.FlowInfo(-1, 0, 0, 0.0, 0, 0, 0) if h is None else _core.flow_get(h, a)

    def top_senders(self, agent: str) -> list[SenderShare]:
        """The inbox's heaviest senders, heaviest first, named: the shared
        table holds keys, and each sender has a folder (its sequences) whose
        name has one; a key no folder has is shown as "?<key>"."""
        a = agent_bytes(agent)
        h = self._h()
        got = [] if h is None else _core.senders_get(h, a)
        if not got:
            return []
        names: dict[int, str] = {}
        for name in self.list_names():
            try:
                names[_core.sender_key(name.encode("ascii"))] = name
            except UnicodeEncodeError:
                continue
        return shares([(names.get(k, f"?{k:010x}"), c) for k, c in got])

    # -- telemetry files ---------------------------------------------------------------
    def metrics_write(self, data: bytes, nlines: int) -> bool:
        """Appends whole metric lines (creating the base folder on first use);
        False when metrics are off. Raises ``metrics_error`` when METRICS_FILE
        was refused."""
        if not self.config.metrics_enabled:
            return False
        h = self._h(create=True)
        e = self.metrics_error
        if e is not None:
            raise type(e)(*e.args)  # a fresh one: re-raising e would grow its traceback each time
        return _core.metrics_write(h, data, nlines) > 0 or nlines == 0

    def open_log(self, path: str) -> int:
        """An appending descriptor on a telemetry file, under the trust rule."""
        return _core.log_open(path, self.config.file_mode, self.config.group)

    def open_log_read(self, path: str) -> Optional[int]:
        return _core.log_open_read(path, self.config.group)


def _rmtree(path: str) -> None:
    # rmtree uses the fd-based walk on Linux: it never follows a planted symlink.
    import shutil  # here, not at the top: shutil pulls in re, bz2 and lzma, ~5 ms for every CLI call

    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


__all__ = ["COUNTERS", "FileStorage", "SenderShare", "Storage"]
