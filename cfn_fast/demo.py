"""`cfn-fast demo`: a small swarm on a private temporary base folder.

Several sender processes flood one slow consumer with ``send_with_backpressure``.
The inbox fills to its capacity, senders wait (backpressure) instead of
overflowing it, the consumer drains it, and the report counts what happened:
every number is measured, and ``lost`` is the messages senders were told were
delivered that the consumer never saw.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from cfn_fast.errors import BackpressureTimeout, CfnError, InvalidArgument

CONSUMER = "consumer"


@dataclass(frozen=True)
class DemoSettings:
    senders: int = 4                 # sender processes
    messages: int = 300              # messages per sender
    capacity: int = 50               # the consumer's MAX_INBOX_SIZE
    batch: int = 10                  # messages the consumer takes per read
    consume_delay_ms: int = 5        # the consumer's pause between reads
    wait_ms: int = 20                # BACKPRESSURE_WAIT_MS (a consumer's read wakes waiters sooner)
    max_retries: int = 1000          # BACKPRESSURE_MAX_RETRIES: ample, so only a stalled consumer fails sends

    def check(self) -> None:
        for name in ("senders", "messages", "capacity", "batch", "max_retries"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"demo: {name} must be at least 1")
        for name in ("consume_delay_ms", "wait_ms"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"demo: {name} must not be negative")


@dataclass
class SenderResult:
    index: int
    sent: list[int] = field(default_factory=list)     # message numbers delivered to the inbox
    failed: int = 0                                     # gave up after the retries
    waited: int = 0                                     # sends that had to wait for room
    waited_ns: int = 0                                  # time spent waiting, all sends
    latencies_ns: list[int] = field(default_factory=list)
    error: Optional[str] = None                         # the sender itself broke


@dataclass(frozen=True)
class DemoReport:
    settings: DemoSettings
    sent: int            # sends that returned a message id
    delivered: int       # distinct messages the consumer received
    duplicates: int      # messages the consumer received more than once
    waited: int          # sends that waited for room (backpressure engaged)
    waited_s: float      # time senders spent waiting, in total
    failed: int          # sends that gave up after their retries
    lost: int            # sent, but never delivered
    peak: int            # largest inbox size the consumer saw
    elapsed_s: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _config_values(base: str, s: DemoSettings) -> dict[str, Any]:
    return dict(base_dir=base, max_inbox_size=s.capacity, backpressure_wait_ms=s.wait_ms,
                backpressure_max_retries=s.max_retries, backpressure_backoff="fixed",
                metrics_file=os.path.join(base, "metrics.jsonl"),
                alert_log_file=os.path.join(base, "alerts.jsonl"))


def _new_bus(values: dict[str, Any]) -> Any:
    from cfn_fast.bus import MessageBus
    from cfn_fast.config import Config

    return MessageBus(config=Config(**values))


def _sender(index: int, s: DemoSettings, values: dict[str, Any], results: Any) -> None:
    """One sender process: s.messages sends as fast as backpressure allows."""
    out = SenderResult(index)
    try:
        with _new_bus(values) as bus:
            me = f"sender-{index}"
            for n in range(s.messages):
                t0 = time.perf_counter_ns()
                try:
                    # what send_with_backpressure does, keeping the C loop's account of its waits
                    res = bus.deliver(me, CONSUMER, "work", f'{{"sender":{index},"n":{n}}}')
                    out.sent.append(n)
                    if res.retries or res.wakeups:
                        out.waited += 1
                    out.waited_ns += res.waited_ns
                except BackpressureTimeout:
                    out.failed += 1
                out.latencies_ns.append(time.perf_counter_ns() - t0)
    except BaseException as e:  # report it: the parent must not wait for a result that never comes
        out.error = f"{type(e).__name__}: {e}"
    results.put(out)


def percentile(values: Sequence[int], q: float) -> float:
    """Nearest-rank percentile of ``values`` (q in 0..100); 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return float(ordered[rank - 1])


def summarize(s: DemoSettings, results: Iterable[SenderResult], received: Iterable[tuple[int, int]],
              peak: int, elapsed_s: float) -> DemoReport:
    """The report, from what the senders were told and what the consumer got."""
    results = list(results)
    sent_keys = {(r.index, n) for r in results for n in r.sent}
    received = list(received)
    seen = set(received)
    latencies = [ns for r in results for ns in r.latencies_ns]
    return DemoReport(
        settings=s,
        sent=len(sent_keys),
        delivered=len(seen & sent_keys),
        duplicates=len(received) - len(seen),
        waited=sum(r.waited for r in results),
        waited_s=sum(r.waited_ns for r in results) / 1e9,
        failed=sum(r.failed for r in results),
        lost=len(sent_keys - seen),
        peak=peak,
        elapsed_s=elapsed_s,
        p50_ms=percentile(latencies, 50) / 1e6,
        p99_ms=percentile(latencies, 99) / 1e6,
    )


def _private_base() -> str:
    shm = "/dev/shm"
    parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="cfn-demo-", dir=parent)


def run_demo(s: DemoSettings = DemoSettings(), progress: bool = True, plot: Optional[str] = None) -> DemoReport:
    """Runs the swarm on a private base folder (removed afterwards) and
    reports. With ``plot``, an overflow monitor watches the inboxes during the
    run and their fill and the backpressure are charted into that PNG."""
    s.check()
    root = _private_base()
    base = os.path.join(root, "messages")
    values = _config_values(base, s)
    values["metrics_file"] = os.path.join(root, "metrics.jsonl")
    values["alert_log_file"] = os.path.join(root, "alerts.jsonl")
    try:
        with _new_bus(values) as bus:
            bus.init_message_bus(CONSUMER)
            for i in range(s.senders):
                bus.init_message_bus(f"sender-{i}")
        watcher = _start_watcher(values) if plot is not None else None
        try:
            report = _swarm(s, values, progress)
        finally:
            if watcher is not None:
                watcher.terminate()  # SIGTERM: the monitor ends its pass and stops
                watcher.join(timeout=5)
        if plot is not None:
            from cfn_fast.plot import plot_metrics

            with _new_bus(values) as bus:
                plot_metrics(bus, plot, agents=s.senders + 1)
        return report
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _watch(values: dict[str, Any]) -> None:
    """The overflow monitor of a plotted run: inbox.utilization lines every
    50 ms. Its alerts go to the run's alert file; not on the demo's terminal."""
    from cfn_fast.overflow import monitor_inbox_overflow

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    with _new_bus(values) as bus:
        monitor_inbox_overflow(0.05, bus=bus)


def _start_watcher(values: dict[str, Any]) -> Any:
    p = multiprocessing.get_context("fork").Process(target=_watch, args=(values,), daemon=True)
    p.start()
    return p


def _swarm(s: DemoSettings, values: dict[str, Any], progress: bool) -> DemoReport:
    ctx = multiprocessing.get_context("fork")  # the senders need nothing but this module: fork is quickest
    results_q = ctx.Queue()
    procs = [ctx.Process(target=_sender, args=(i, s, values, results_q), daemon=True)
             for i in range(s.senders)]
    results: list[SenderResult] = []
    received: list[tuple[int, int]] = []
    peak = 0
    bar = _bar(s.senders * s.messages) if progress and sys.stderr.isatty() else None
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    try:
        with _new_bus(values) as bus:
            while True:
                peak = max(peak, bus.get_inbox_size(CONSUMER))
                got = bus.consume_messages(CONSUMER, s.batch)
                received.extend((m["payload"]["sender"], m["payload"]["n"]) for m in got)
                if bar is not None and got:
                    bar.update(len(got))
                _drain(results_q, results)
                if not got:
                    if len(results) == s.senders:
                        break  # every sender is done and the inbox is empty
                    _check_alive(procs, results_q, results)
                if s.consume_delay_ms:
                    time.sleep(s.consume_delay_ms / 1000)
            elapsed = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.render_finish()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    broken = [r for r in results if r.error]
    if broken:
        raise CfnError(f"demo: sender {broken[0].index} failed: {broken[0].error}")
    return summarize(s, results, received, peak, elapsed)


def _drain(results_q: Any, results: list[SenderResult]) -> None:
    while True:
        try:
            results.append(results_q.get_nowait())
        except queue.Empty:
            return


def _check_alive(procs: list[Any], results_q: Any, results: list[SenderResult]) -> None:
    """A sender that died without reporting would make the consumer wait forever."""
    if all(p.exitcode is not None for p in procs) and len(results) < len(procs):
        try:
            results.append(results_q.get(timeout=2))
        except queue.Empty:
            dead = [p.exitcode for p in procs]
            raise CfnError(f"demo: a sender process died without a result (exit codes {dead})") from None


def _bar(total: int) -> Any:
    import click

    bar = click.progressbar(length=total, label="delivered", file=sys.stderr, show_pos=True,
                            show_percent=True, width=30)
    bar.__enter__()
    return bar


def print_report(r: DemoReport, file: Any = None) -> None:
    s = r.settings
    w = file or sys.stdout
    lines = [
        f"cfn-fast demo: {s.senders} senders x {s.messages} messages -> 1 consumer "
        f"(inbox capacity {s.capacity}, {s.batch} per read every {s.consume_delay_ms} ms)",
        f"  sent        {r.sent:>8}   send_with_backpressure returned an id",
        f"  delivered   {r.delivered:>8}   distinct messages the consumer received",
        f"  waited      {r.waited:>8}   sends that waited for room ({r.waited_s:.1f} s in all): backpressure",
        f"  failed      {r.failed:>8}   sends that gave up after their retries",
        f"  lost        {r.lost:>8}   sent but never delivered",
        f"  inbox peak  {r.peak:>8}   of capacity {s.capacity}",
        f"  throughput  {r.throughput:>8.0f}   messages/s over {r.elapsed_s:.2f} s",
        f"  send time   p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms",
    ]
    if r.duplicates:
        lines.append(f"  duplicates  {r.duplicates:>8}   messages received twice")
    w.write("\n".join(lines) + "\n")


__all__ = ["DemoReport", "DemoSettings", "SenderResult", "percentile", "print_report", "run_demo",
           "summarize"]
