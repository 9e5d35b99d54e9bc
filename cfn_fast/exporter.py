"""Prometheus exposition of the shared state, read at scrape time.

``BusCollector`` is a custom collector: each ``collect`` takes one snapshot
through the Storage API (snapshot.py) and turns it into metric families, so
there is no polling loop and no second copy of any counter. ``cfn-fast
metrics serve`` puts it behind prometheus_client's HTTP server;
``cfn-fast metrics prom`` prints it (or writes it atomically for
node_exporter's textfile collector). Needs the ``prom`` extra.

The ``agent`` label is bounded: the METRICS_TOP_AGENTS fullest inboxes get
their own series, every other inbox is summed into ``agent="other"`` (an agent
really named ``other`` is summed there too, so no series is ever doubled).
"""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Iterator, NamedTuple, Optional

from cfn_fast.extras import require

require("prometheus_client", "prom")

from prometheus_client import CollectorRegistry, generate_latest, start_http_server  # noqa: E402
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric  # noqa: E402

from cfn_fast import snapshot  # noqa: E402
from cfn_fast.errors import CfnError, CfnOSError, InvalidArgument  # noqa: E402
from cfn_fast.ratelimit import TIERS  # noqa: E402
from cfn_fast.storage import COUNTERS  # noqa: E402

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus

OTHER = "other"  # the agent label of every inbox past the top N
TIER_NAMES = tuple(TIERS) + ("configured", "published")


class CounterName(NamedTuple):
    metric: str          # the family name; the sample is <metric>_total
    help: str
    labels: tuple[tuple[str, str], ...] = ()
    scale: float = 1.0   # the counter's unit to the metric's (ms -> s)


# storage.COUNTERS as Prometheus counters. A counter missing here (one added
# later) is still exported, as cfn_<name>_total.
COUNTER_NAMES: dict[str, CounterName] = {
    "sent": CounterName("cfn_messages_sent", "Messages delivered to an inbox."),
    "consumed": CounterName("cfn_messages_consumed", "Messages taken out of an inbox by a consumer."),
    "send_full": CounterName("cfn_sends_refused_full",
                             "Plain sends (no backpressure) refused because the inbox was full."),
    "backpressure_wait": CounterName("cfn_backpressure_waits",
                                     "Waits of backpressure senders for room in a full inbox."),
    "backpressure_success": CounterName("cfn_backpressure_sends",
                                        "Backpressure sends that delivered their message."),
    "backpressure_failure": CounterName("cfn_send_failures",
                                        "Backpressure sends that gave up after their last retry."),
    "reconcile": CounterName("cfn_reconciles", "Inbox counters set from a directory scan."),
    "quarantined": CounterName("cfn_messages_quarantined", "Bad message files moved to .quarantine."),
    "recovered": CounterName("cfn_messages_recovered",
                             "Claimed messages of dead consumers returned to their inbox."),
    "stale_tmp_removed": CounterName("cfn_stale_tmp_removed",
                                     "Temporary files of dead senders removed by a scan."),
    "metrics": CounterName("cfn_metric_lines", "Lines written to METRICS_FILE."),
    "alerts": CounterName("cfn_alerts", "Alerts written to ALERT_LOG_FILE (after the cooldown)."),
    "alerts_suppressed": CounterName("cfn_alerts_suppressed", "Alerts held back by the shared cooldown."),
    "lock_timeouts": CounterName("cfn_lock_timeouts", "Waits for a lock another process held that ran out."),
    "take_errors": CounterName("cfn_take_errors", "Messages a consumer read but could not take."),
    "state_reattached": CounterName("cfn_state_reattached",
                                    "Times a process found the state file replaced and mapped the new one."),
    "slots_freed": CounterName("cfn_slots_freed", "Inbox slots of removed agents freed."),
    "outbox_pruned": CounterName("cfn_outbox_pruned", "Outbox copies pruned past OUTBOX_MAX."),
    "coordination_message_sent": CounterName("cfn_coordination_messages_sent",
                                             "Sum of coordination.message_sent metric values."),
    "coordination_message_received": CounterName("cfn_coordination_messages_received",
                                                 "Sum of coordination.message_received metric values."),
    "coordination_latency_samples": CounterName("cfn_coordination_latency_samples",
                                                "coordination.latency metric lines."),
    "coordination_latency_ms_total": CounterName("cfn_coordination_latency_seconds",
                                                 "Sum of coordination.latency metric values, in seconds.",
                                                 scale=0.001),
    "alerts_inbox_overflow": CounterName("cfn_alerts_by_type", "Alerts written, by type.",
                                         (("type", "inbox_overflow"),)),
    "alerts_inbox_high_utilization": CounterName("cfn_alerts_by_type", "Alerts written, by type.",
                                                 (("type", "inbox_high_utilization"),)),
    "monitor_passes": CounterName("cfn_monitor_passes", "Overflow-monitor passes."),
    "monitor_reconciles": CounterName("cfn_monitor_reconciles", "Inboxes reconciled by a monitor."),
    "inbox_drift": CounterName("cfn_inbox_drift", "Reconciles that found an inbox's counter off."),
    "rate_limit_adjustments": CounterName("cfn_rate_limit_adjustments",
                                          "Rate-limit settings published by apply_dynamic_rate_limit."),
    "metric_write_errors": CounterName("cfn_metric_write_errors", "Metric lines that could not be written."),
    "alert_write_errors": CounterName("cfn_alert_write_errors", "Alert lines that could not be written."),
    "monitors_stopped": CounterName("cfn_monitors_stopped", "Monitors stopped by cleanup."),
    "circuit_opened": CounterName("cfn_circuits_opened", "Inbox circuits opened (tripped, or a probe failed)."),
    "circuit_closed": CounterName("cfn_circuits_closed", "Inbox circuits closed again (a probe got through, "
                                  "or a reset)."),
    "circuit_rejected": CounterName("cfn_sends_refused_circuit", "Sends refused at once by an open circuit."),
    "sent_high": CounterName("cfn_messages_sent_high", "High-priority messages delivered (also in sent)."),
}
CIRCUIT_STATES = {"closed": 0, "open": 1, "half-open": 2}


def counter_name(name: str) -> CounterName:
    return COUNTER_NAMES.get(name) or CounterName(f"cfn_{name}", f"The shared counter {name}.")


class BusCollector:
    """A prometheus_client collector over one bus: reads the shared state at
    every ``collect`` (safe from concurrent scrapes: nothing is kept)."""

    def __init__(self, bus: "MessageBus", top_agents: Optional[int] = None) -> None:
        n = bus.config.metrics_top_agents if top_agents is None else top_agents
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise InvalidArgument(f"top_agents must be a whole number >= 0, not {n!r}")
        self.bus = bus
        self.top_agents = n
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        with self._lock:  # one slot buffer, reused: one scrape reads it at a time
            snap = snapshot.take(self.bus, reuse=True)
        yield from self.inbox_families(snap)
        yield from self.counter_families(snap.counters)
        yield from self.rate_families(snap.rate)
        yield GaugeMetricFamily("cfn_exporter_collect_seconds",
                                "Time this scrape took to read the shared state.",
                                value=time.perf_counter() - t0)

    def inbox_families(self, snap: snapshot.Snapshot) -> Iterator[Metric]:
        t = snap.totals
        named = snap.fullest(min(t.inboxes, self.top_agents))
        if t.inboxes > len(named):
            named = [i for i in named if i.agent != OTHER]  # a real "other" is summed with the rest
        helptail = f" The {self.top_agents} fullest inboxes by agent; the rest summed as agent=\"{OTHER}\"."
        msgs = GaugeMetricFamily("cfn_inbox_messages", "Messages in the inbox (sends in flight included)."
                                 + helptail, labels=["agent"])
        cap = GaugeMetricFamily("cfn_inbox_capacity", "Messages the inbox holds at most." + helptail,
                                labels=["agent"])
        util = GaugeMetricFamily("cfn_inbox_utilization_ratio",
                                 "Messages over capacity, 1 when full (for other: summed over summed)."
                                 + helptail, labels=["agent"])
        wait = GaugeMetricFamily("cfn_inbox_waiting_senders",
                                 "Backpressure senders asleep until the inbox has room." + helptail,
                                 labels=["agent"])
        for i in sorted(named, key=lambda b: b.agent):
            msgs.add_metric([i.agent], i.size)
            cap.add_metric([i.agent], i.capacity)
            util.add_metric([i.agent], i.fill)
            wait.add_metric([i.agent], i.waiters)
        if t.inboxes > len(named):  # the rest: the totals less the named ones, without a pass over them
            size = t.messages - sum(i.size for i in named)
            capacity = t.capacity - sum(i.capacity for i in named)
            msgs.add_metric([OTHER], size)
            cap.add_metric([OTHER], capacity)
            util.add_metric([OTHER], size / capacity if capacity else 0.0)
            wait.add_metric([OTHER], t.waiters - sum(i.waiters for i in named))
        yield from (msgs, cap, util, wait)
        yield from self.flow_families([i.agent for i in named])
        yield GaugeMetricFamily("cfn_inboxes", "Inboxes the shared state tracks.", value=t.inboxes)
        yield GaugeMetricFamily("cfn_inboxes_full", "Inboxes at (or past) their capacity.", value=t.full)
        yield GaugeMetricFamily("cfn_inboxes_high_utilization",
                                "Inboxes above 80 % of their capacity (full ones included).", value=t.high)
        yield GaugeMetricFamily("cfn_messages_queued", "Messages in every inbox together.", value=t.messages)
        yield GaugeMetricFamily("cfn_inboxes_uncounted",
                                "Inboxes not counted since their init (reported as empty until a send, "
                                "a size read or a monitor pass counts them).", value=t.uncounted)

    def flow_families(self, agents: list[str]) -> Iterator[Metric]:
        """Flow control of the named inboxes (one read of each through the
        storage API; the rest are not summed: a state or a limit has no sum)."""
        helptail = f" The {self.top_agents} fullest inboxes by agent."
        state = GaugeMetricFamily("cfn_inbox_circuit_state",
                                  "The inbox's circuit breaker: 0 closed, 1 open, 2 half-open." + helptail,
                                  labels=["agent"])
        limit = GaugeMetricFamily("cfn_inbox_effective_limit",
                                  "Messages senders may put in the inbox now: the adaptive limit while one "
                                  "holds, else its capacity." + helptail, labels=["agent"])
        sojourn = GaugeMetricFamily("cfn_inbox_sojourn_seconds",
                                    "Mean age of the messages consumers took in the last interval measured."
                                    + helptail, labels=["agent"])
        store = self.bus.storage
        for agent in sorted(agents):
            try:
                c, f = store.circuit(agent), store.flow(agent)
            except CfnError:  # removed since the snapshot
                continue
            state.add_metric([agent], CIRCUIT_STATES.get(c.state, 0))
            limit.add_metric([agent], f.limit or f.capacity or self.bus.config.max_inbox_size)
            sojourn.add_metric([agent], f.sojourn_ms / 1000)
        yield from (state, limit, sojourn)

    def counter_families(self, counters: dict[str, int]) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily] = {}
        for name in sorted(counters, key=lambda n: counter_name(n).metric):
            c = counter_name(name)
            fam = families.get(c.metric)
            if fam is None:
                fam = families[c.metric] = CounterMetricFamily(
                    c.metric, c.help, labels=[k for k, _ in c.labels])
            # a shared counter restarts at 0 with a new state file: Prometheus takes that as a reset
            fam.add_metric([v for _, v in c.labels], max(0, counters[name]) * c.scale)
        yield from families.values()

    def rate_families(self, rl: snapshot.RateLimit) -> Iterator[Metric]:
        yield GaugeMetricFamily("cfn_rate_limit_batch_size", "Batch size senders use now.", value=rl.batch_size)
        yield GaugeMetricFamily("cfn_rate_limit_wait_seconds", "Wait between backpressure retries now.",
                                value=rl.wait_ms / 1000)
        yield GaugeMetricFamily("cfn_rate_limit_published",
                                "1 while settings published by the rate-limit monitor hold, else 0.",
                                value=1 if rl.published else 0)
        tier = GaugeMetricFamily("cfn_rate_limit_tier", "1 for the rate-limit tier in force, 0 for the others.",
                                 labels=["tier"])
        for name in TIER_NAMES:
            tier.add_metric([name], 1 if rl.tier == name else 0)
        yield tier
        if rl.load_per_cpu is not None:
            yield GaugeMetricFamily("cfn_system_load_per_cpu",
                                    "1-minute load per CPU at the last rate-limit check.", value=rl.load_per_cpu)


def registry(bus: "MessageBus", top_agents: Optional[int] = None) -> CollectorRegistry:
    """A registry holding only the bus's collector (no process metrics)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(BusCollector(bus, top_agents))
    return reg


def exposition(bus: "MessageBus", top_agents: Optional[int] = None) -> bytes:
    """The text exposition (format 0.0.4) of the state now."""
    return generate_latest(registry(bus, top_agents))


def write_textfile(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: a temporary file in the same
    folder (a dotfile not ending in .prom, which node_exporter skips), then a
    rename over ``path``. Readable by others (0644 less the umask), as the
    textfile collector usually runs as another user."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o644 & ~umask)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CfnOSError(e.errno or 0, f"write {path}: {e.strerror}") from None


def serve(bus: "MessageBus", port: int, addr: str, top_agents: Optional[int] = None,
          stop: Optional[threading.Event] = None) -> int:
    """Serves /metrics on addr:port (port 0: a free one) until SIGTERM or
    SIGINT (in the main thread) or ``stop``; returns the port it served."""
    try:
        server, thread = start_http_server(port, addr=addr, registry=registry(bus, top_agents))
    except OSError as e:
        raise CfnOSError(e.errno or 0, f"cannot serve on {addr}:{port}: {e.strerror or e}") from None
    done = stop if stop is not None else threading.Event()
    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, lambda *_: done.set())
    real = server.server_port
    host = f"[{addr}]" if ":" in addr else addr
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] [METRICS] Serving http://{host}:{real}/metrics "
                     f"for {bus.base_dir}\n")
    sys.stderr.flush()
    try:
        while not done.wait(1.0):  # short waits: a signal's handler runs between them
            pass
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return int(real)


__all__ = ["COUNTER_NAMES", "OTHER", "BusCollector", "CounterName", "counter_name", "exposition", "registry",
           "serve", "write_textfile"]

# every shared counter has a name here or the cfn_<name> fallback; none clash
assert len({(counter_name(n).metric, counter_name(n).labels) for n in COUNTERS}) == len(COUNTERS)
