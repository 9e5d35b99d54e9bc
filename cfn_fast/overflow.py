"""The overflow monitor: every tracked inbox's size and utilisation as metric
lines, alerts when one is full (critical) or above 80 % (warning), and a
reconcile of every inbox on a slower cadence; and the original's inbox
statistics (get-stats).
"""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

from cfn_fast import alerts, metrics
from cfn_fast.defaults import resolve
from cfn_fast.errors import CfnError, InboxNotFound, InvalidArgument
from cfn_fast.lifecycle import Lifecycle, check_interval, check_iterations, report
from cfn_fast.storage import SlotInfo

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus

HIGH_UTILIZATION = 80  # percent: above it, inbox_high_utilization (warning)


def get_all_inbox_stats(*, bus: Optional["MessageBus"] = None, senders: bool = False,
                        flow: bool = False) -> list[dict[str, Any]]:
    """``{"agent","size","utilization","max_size"}`` for every agent folder with
    an inbox, sorted by agent, from the shared counters (no directory scans
    once an inbox is tracked). With ``senders``, each also has "top_senders":
    its heaviest senders, ``{"sender","share","count"}``, heaviest first. With
    ``flow``, "flow": its flow control (circuit, adaptive limit, sojourn,
    drain, waiting senders, high-priority sends)."""
    b = resolve(bus)
    agents = b.list_agents()
    own = b.config.max_inbox_size
    known: dict[str, tuple[int, int]] = {}
    if len(agents) > 32:  # one C call beats one per agent
        known = {s.agent: (s.count, s.capacity) for s in b.storage.slots()}
    out = []
    for agent in agents:
        size, cap = known.get(agent, (-1, 0))
        if size < 0:
            try:
                size = b.get_inbox_size(agent)
                cap = b.get_inbox_capacity(agent)
            except InboxNotFound:  # removed since the listing
                continue
        cap = _capacity(cap, own)
        row: dict[str, Any] = {"agent": agent, "size": size, "utilization": size * 100 // cap, "max_size": cap}
        if senders:
            row["top_senders"] = [t._asdict() for t in b.storage.top_senders(agent)]
        if flow:
            row["flow"] = flow_row(b, agent)
        out.append(row)
    return out


def _capacity(inbox: int, own: int) -> int:
    """The inbox's capacity (the smallest any sender used since its init: the
    one its sends are refused at, whatever this monitor's MAX_INBOX_SIZE);
    that setting only when the inbox has none recorded."""
    return inbox if inbox > 0 else own


def flow_row(bus: "MessageBus", agent: str) -> dict[str, Any]:
    """An inbox's flow control as get-stats --flow shows it."""
    f, c = bus.storage.flow(agent), bus.storage.circuit(agent)
    cap = f.capacity or bus.config.max_inbox_size
    return {"circuit": c.state, "circuit_retry_after": round(c.retry_after, 3), "limit": f.limit or cap,
            "capacity": cap, "high_headroom": -(-cap * bus.config.priority_headroom_pct // 100),
            "sojourn_ms": round(f.sojourn_ms, 3), "drained_per_s": f.drained, "waiting": f.waiting,
            "high_sent": f.high_sent}


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
        self._size = metrics.LineTemplate("inbox.size", "count", "agent")
        self._util = metrics.LineTemplate("inbox.utilization", "percent", "agent")
        self.errors: set[str] = set()

    def _folders(self) -> list[str]:
        return self.bus.storage.list_names()

    def _reconcile(self, names: list[str], fresh: set[str], seen: set[str]) -> int:
        """Reconciles each named inbox (skipping those in ``fresh``); adds the
        ones that exist to ``seen``; returns how many were scanned."""
        done = drift = 0
        reconcile = self.bus.storage.reconcile
        for name in names:
            if name in fresh:
                seen.add(name)
                continue
            try:
                r = reconcile(name, True)
            except InboxNotFound:  # an agent folder without an inbox (a sender's)
                continue
            except (CfnError, UnicodeEncodeError) as e:  # not an agent id, an unsafe folder, ...
                if not isinstance(e, ValueError):
                    report("reconcile", e, self.errors)
                continue
            seen.add(name)
            if r.scanned:
                done += 1
                if r.before >= 0 and r.before != r.count:
                    drift += 1
        if done:
            self.bus.storage.counter_add("monitor_reconciles", done)
        if drift:
            self.bus.storage.counter_add("inbox_drift", drift)
        return done

    def _recent(self, tracked: list[SlotInfo]) -> set[str]:
        since = time.time_ns() - int(self.interval * self.reconcile_every * 1e9) // 2
        return {s.agent for s in tracked if s.reconcile_ns > since}

    def reconcile_all(self, everyone: bool = False) -> int:
        """Scans every inbox of the base folder now and sets its counter (also
        returning dead consumers' claims and removing stale temp files);
        returns how many were scanned. Without ``everyone``, an inbox another
        process reconciled within the last half round is left alone."""
        names = self._folders()
        tracked = self.bus.storage.slots(reuse=True)
        seen: set[str] = set()
        done = self._reconcile(names, set() if everyone else self._recent(tracked), seen)
        self._gone = {s.agent for s in tracked if s.count >= 0} - seen
        self._round = []
        return done

    def reconcile_slice(self) -> int:
        """Reconciles the next slice of the current round (starting a new round when one ends)."""
        if not self._round:
            self._round = sorted(self._folders(), reverse=True)
            tracked = self.bus.storage.slots(reuse=True)
            self._round_tracked = {s.agent for s in tracked if s.count >= 0}
            self._round_fresh = self._recent(tracked)
            self._round_seen = set()
            self._round_step = -(-len(self._round) // self.reconcile_every)
        take = self._round[-self._round_step:] if self._round_step else []
        del self._round[len(self._round) - len(take):]
        done = self._reconcile(take, self._round_fresh, self._round_seen)
        if not self._round:  # the round is complete: now we know which tracked inboxes are gone
            self._gone = self._round_tracked - self._round_seen
        return done

    def run_pass(self, reconcile: Optional[bool] = None) -> PassResult:
        """One pass; ``reconcile`` None follows the schedule, True reconciles
        every inbox first, False none."""
        b = self.bus
        if not b.storage.exists():  # no base folder yet: nothing to watch
            self.passes += 1
            return PassResult(0, 0, 0, 0)
        if reconcile is None:
            reconciled = self.reconcile_all() if self.passes == 0 else self.reconcile_slice()
        else:
            reconciled = self.reconcile_all() if reconcile else 0
        own = b.config.max_inbox_size
        metrics_on = b.config.metrics_enabled
        if metrics_on:
            try:
                self._size.refresh()
                self._util.refresh()
            except CfnError as e:
                report("metrics", e, self.errors)
                metrics_on = False
        size_line, util_line = self._size.line, self._util.line
        gone = self._gone
        out: list[bytes] = []
        hot: list[tuple[str, int, int, int]] = []
        limited: list[tuple[str, Any]] = []
        n = 0
        for s in self.bus.storage.slots(reuse=True):
            size = s.count
            if size < 0 or (gone and s.agent in gone):
                continue
            n += 1
            cap = _capacity(s.capacity, own)
            util = size * 100 // cap
            if metrics_on:
                out.append(size_line(size, s.agent))
                out.append(util_line(util, s.agent))
            if util > HIGH_UTILIZATION:
                hot.append((s.agent, size, cap, util))
        if out:
            try:
                metrics.write_lines(b.storage, b"".join(out), len(out))
            except CfnError as e:
                report("metrics", e, self.errors)
        if b.config.adaptive_limit == "delay":  # the adaptive limits, as metric lines and an alert
            for s in self.bus.storage.slots(reuse=True):
                if s.count < 0 or (gone and s.agent in gone):
                    continue
                try:
                    f = b.storage.flow(s.agent)
                except CfnError as e:
                    report("flow", e, self.errors)
                    continue
                if metrics_on and f.limit:
                    out_flow = b"".join((
                        metrics.format_metric("inbox.limit", f.limit, "count", {"agent": s.agent}),
                        metrics.format_metric("inbox.sojourn_ms", round(f.sojourn_ms, 3), "milliseconds",
                                              {"agent": s.agent})))
                    try:
                        metrics.write_lines(b.storage, out_flow, 2)
                    except CfnError as e:
                        report("metrics", e, self.errors)
                if f.limit and f.capacity and f.limit * 2 <= f.capacity:
                    limited.append((s.agent, f))
        sent_alerts = 0
        for agent, f in limited:
            try:
                sent_alerts += alerts.emit(
                    b.storage, "inbox_delay_high",
                    f"Inbox of {agent} is held to {f.limit} of its {f.capacity} places: messages waited "
                    f"{f.sojourn_ms:.0f} ms on average (target {b.config.adaptive_target_ms} ms)",
                    "warning", {"agent": agent, "limit": f.limit, "capacity": f.capacity,
                                "sojourn_ms": round(f.sojourn_ms, 3), "target_ms": b.config.adaptive_target_ms})
            except CfnError as e:
                report("alerts", e, self.errors)
        for agent, size, cap, util in hot:
            who, top = alerts.top_senders(b.storage, agent)
            meta = {"agent": agent, "size": size, "max_size": cap, "utilization": util, "top_senders": top}
            try:
                if util >= 100:
                    sent = alerts.emit(b.storage, "inbox_overflow",
                                       f"Inbox of {agent} is full: {size}/{cap} messages ({util}%){who}",
                                       "critical", meta)
                else:
                    sent = alerts.emit(b.storage, "inbox_high_utilization",
                                       f"Inbox of {agent} is at {util}% of capacity ({size}/{cap} messages){who}",
                                       "warning", meta)
                sent_alerts += sent
            except CfnError as e:
                report("alerts", e, self.errors)
        b.storage.counter_add("monitor_passes", 1)
        self.passes += 1
        return PassResult(n, len(out), sent_alerts, reconciled)


def monitor_inbox_overflow(interval: float = 5, iterations: Optional[int] = None, *, pidfile: bool = False,
                           bus: Optional["MessageBus"] = None, reconcile_every: int = 12,
                           stop: Optional[threading.Event] = None) -> int:
    """Checks every inbox each ``interval`` seconds (see OverflowMonitor) until
    ``iterations`` passes are done (forever when None), SIGTERM/SIGINT
    arrives (when run in the main thread) or ``stop`` is set. With ``pidfile``, writes <base>/.monitors/overflow-<pid>.pid for
    ``cleanup_rate_limiting``. Returns the number of passes."""
    every = check_interval(interval)
    count = check_iterations(iterations)
    b = resolve(bus)
    mon = OverflowMonitor(b, every, reconcile_every)
    with Lifecycle(b, "overflow", pidfile, stop) as life:
        while not life.orphaned() and (count is None or mon.passes < count):
            t0 = time.monotonic()
            try:
                mon.run_pass()
            except (CfnError, OSError) as e:  # e.g. the base folder removed under us
                report("pass", e, mon.errors)
                mon.passes += 1
            if count is None or mon.passes < count:
                life.sleep(every - (time.monotonic() - t0))
    return mon.passes


__all__ = ["HIGH_UTILIZATION", "OverflowMonitor", "PassResult", "get_all_inbox_stats", "monitor_inbox_overflow"]
