"""What an operator looks at, read at one instant: every inbox the shared
state tracks (size, capacity, senders waiting), the shared counters, the rate
limit in force, and the newest lines of ALERT_LOG_FILE.

Everything comes through the public ``Storage`` / ``MessageBus`` API (one
``slots()`` call for all inboxes, ``counters()``, ``rate_read()``), never the
C core, so the exporter, ``cfn-fast top`` and the plots work on any backend.
Nothing here keeps a copy of a counter: each reader takes a new snapshot.
Needs no optional package.
"""
from __future__ import annotations

import heapq
import os
import time
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple, Optional, Sequence

from cfn_fast import ratelimit
from cfn_fast.overflow import HIGH_UTILIZATION
from cfn_fast.storage import SlotInfo

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus
    from cfn_fast.storage import Storage


class Inbox(NamedTuple):
    agent: str
    size: int      # messages, with sends in flight (the shared counter); 0 when not counted yet
    capacity: int  # the one capacity every process enforces for it
    waiters: int   # senders asleep until a consumer frees a place
    counted: bool = True  # False: never scanned since init (a send, a size read or a monitor pass counts it)

    @property
    def fill(self) -> float:
        """size / capacity: 1.0 is full (more when another tool wrote past it)."""
        return self.size / self.capacity if self.capacity > 0 else 0.0

    @property
    def percent(self) -> int:
        """size * 100 // capacity, as get_inbox_utilization rounds it."""
        return self.size * 100 // self.capacity if self.capacity > 0 else 0

    @property
    def full(self) -> bool:
        return self.size >= self.capacity

    @property
    def high(self) -> bool:
        """Above HIGH_UTILIZATION percent (full ones too): the monitor's warning line."""
        return self.percent > HIGH_UTILIZATION


class RateLimit(NamedTuple):
    tier: str            # high, medium or low while published settings hold; else "configured"
    batch_size: int
    wait_ms: int
    published: bool      # False: nothing published, or it went stale
    load_per_cpu: Optional[float]


class Totals(NamedTuple):
    """Every inbox together."""
    inboxes: int
    messages: int
    capacity: int
    waiters: int
    full: int        # at (or past) capacity
    high: int        # above HIGH_UTILIZATION percent, full ones included
    uncounted: int   # never scanned since init (read as empty)


class Snapshot(NamedTuple):
    wall: float          # time.time() when taken
    mono: float          # time.monotonic(), for rates between two snapshots
    base_dir: str
    slots: Sequence[SlotInfo]  # every tracked inbox, as the storage gave them, in no order
    own_capacity: int    # the capacity of a slot that records none (this process's MAX_INBOX_SIZE)
    totals: Totals
    ranking: list[tuple[float, int, str, int]]  # (-fill, -size, agent, index in slots), one per slot
    counters: dict[str, int]
    rate: RateLimit

    @property
    def inboxes(self) -> list[Inbox]:
        """Every inbox (10,000 objects for 10,000 inboxes: ``fullest`` builds only those it returns)."""
        return [_inbox(s, self.own_capacity) for s in self.slots]

    def fullest(self, n: int) -> list[Inbox]:
        """The ``n`` fullest inboxes, fullest first (ties: more messages, then by name)."""
        if n <= 0:
            return []
        return [_inbox(self.slots[k[3]], self.own_capacity) for k in heapq.nsmallest(n, self.ranking)]


class Alert(NamedTuple):
    timestamp: str
    severity: str
    alert: str
    message: str


def _tier(rl: dict[str, Any]) -> str:
    if not rl["published"]:
        return "configured"
    for t in ratelimit.TIERS.values():
        if t.batch_size == rl["batch_size"] and t.wait_ms == rl["wait_ms"]:
            return t.name
    return "published"


def rate_limit(bus: "MessageBus") -> RateLimit:
    """The batch size and retry wait senders use now, and the tier they come from."""
    rl = ratelimit.current_rate_limit(bus=bus)
    return RateLimit(_tier(rl), int(rl["batch_size"]), int(rl["wait_ms"]), bool(rl["published"]),
                     rl["load_per_cpu"])


def _inbox(s: SlotInfo, own: int) -> Inbox:
    return Inbox(s.agent, s.count if s.count > 0 else 0, s.capacity if s.capacity > 0 else own, s.waiters,
                 s.count >= 0)


def make(base_dir: str, slots: Sequence[SlotInfo], own_capacity: int, counters: dict[str, int],
         rate: RateLimit) -> Snapshot:
    """A snapshot of given parts (``take`` reads them from a bus; tests make
    their own): the totals and the ranking by fill in one pass over the slots,
    with no object per inbox beyond a sort key."""
    own = own_capacity
    n = messages = capacity = waiters = full = high = uncounted = 0
    ranking = []
    for i, s in enumerate(slots):
        c, cap = s.count, s.capacity
        if c < 0:
            uncounted += 1
            c = 0
        if cap <= 0:
            cap = own
        n += 1
        messages += c
        capacity += cap
        waiters += s.waiters
        if c >= cap:
            full += 1
            high += 1
        elif c * 100 // cap > HIGH_UTILIZATION:
            high += 1
        ranking.append((-c / cap, -c, s.agent, i))
    return Snapshot(time.time(), time.monotonic(), base_dir, slots, own_capacity,
                    Totals(n, messages, capacity, waiters, full, high, uncounted), ranking, counters, rate)


def take(bus: "MessageBus", reuse: bool = False) -> Snapshot:
    """The state now, in three storage calls (slots, counters, rate settings).

    Nothing is created, scanned or healed by this read (a scan could wait
    LOCK_TIMEOUT_MS on a stalled bash sender's lock): a missing base folder
    reads as no inboxes and zero counters, and an inbox never counted since
    its init reads as empty (``counted`` False) until a send, a size read or
    a monitor pass counts it. ``reuse`` keeps the storage's slot buffer
    between calls: for one caller at a time."""
    st = bus.storage
    return make(bus.base_dir, st.slots(reuse), bus.config.max_inbox_size, st.counters(), rate_limit(bus))


def fullest(boxes: Iterable[Inbox], n: int) -> list[Inbox]:
    """The ``n`` fullest of ``boxes``, fullest first (ties: more messages, then by name)."""
    return heapq.nsmallest(n, boxes, key=lambda i: (-i.fill, -i.size, i.agent))


def rates(before: Optional[Snapshot], after: Snapshot, names: Sequence[str]) -> dict[str, Optional[float]]:
    """Per second, for each named counter, between two snapshots (None without a previous one)."""
    if before is None or after.mono <= before.mono:
        return {n: None for n in names}
    dt = after.mono - before.mono
    return {n: max(0, after.counters.get(n, 0) - before.counters.get(n, 0)) / dt for n in names}


def recent_alerts(store: "Storage", n: int = 10, tail_bytes: int = 64 * 1024) -> list[Alert]:
    """The newest ``n`` alerts of ALERT_LOG_FILE, newest last, from its last
    ``tail_bytes`` (the file is opened under the telemetry files' trust rule:
    a FIFO or a foreign file there is refused, never read)."""
    import json

    if n <= 0:
        return []
    fd = store.open_log_read(store.config.alert_log_file)
    if fd is None:
        return []
    try:
        end = os.fstat(fd).st_size
        start = max(0, end - tail_bytes)
        data = os.pread(fd, end - start, start)
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first may be cut
    out: list[Alert] = []
    for raw in reversed(lines):
        if len(out) >= n:
            break
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            out.append(Alert(str(rec["timestamp"]), str(rec["severity"]), str(rec["alert"]), str(rec["message"])))
        except (ValueError, KeyError, TypeError):
            continue
    out.reverse()
    return out


__all__ = ["Alert", "Inbox", "RateLimit", "SlotInfo", "Snapshot", "Totals", "fullest", "make", "rate_limit",
           "rates", "recent_alerts", "take"]
