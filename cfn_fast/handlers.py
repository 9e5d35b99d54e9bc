"""Every command's body, one function each, named in the command table
(commands.py), which both front ends run: the fast path before click is
imported, and click. Each opens its own bus, prints its result on stdout,
its log lines on stderr, and returns the exit code; a CfnError it raises
becomes one line on stderr (output.fail). Nothing costly is imported at the
top: a hot command pays only for what it uses.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Optional

from cfn_fast.errors import CfnError, InboxNotFound, InvalidPayload
from cfn_fast.output import EXIT_NO, EXIT_OK, fail, log, out

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus


def new_bus() -> "MessageBus":
    from cfn_fast.bus import MessageBus

    return MessageBus()


# -- the hot commands: agent scripts call them in loops ------------------------

def inbox_size(bus: "MessageBus", agent: str) -> int:
    """The inbox's size from a scan of its folder (not the shared counter
    alone): a cold process costs milliseconds anyway, a scan of 1,000 names
    ~0.1 ms, and this way a message a bash agent removed with rm is not
    counted. The scan also corrects the shared counter for everyone else."""
    try:
        return bus.reconcile(agent, force=False).count
    except InboxNotFound:
        return 0


def get_size(agent: str) -> int:
    with new_bus() as bus:
        out(str(inbox_size(bus, agent)))
    return EXIT_OK


def check_capacity(agent: str) -> int:
    with new_bus() as bus:
        size, cap = inbox_size(bus, agent), bus.get_inbox_capacity(agent)
    if size >= cap:
        log("RATE-LIMIT", f"Inbox {agent} at capacity: {size}/{cap} messages")
        return EXIT_NO
    return EXIT_OK


def get_utilization(agent: str) -> int:
    with new_bus() as bus:
        out(str(inbox_size(bus, agent) * 100 // bus.get_inbox_capacity(agent)))
    return EXIT_OK


def send_backpressure(sender: str, recipient: str, type: str, payload: str, priority: Optional[str] = None) -> int:
    with new_bus() as bus:
        out(bus.send_with_backpressure(sender, recipient, type, payload, priority=priority))
    return EXIT_OK


def bus_send(sender: str, recipient: str, type: str, payload: str, priority: Optional[str] = None) -> int:
    with new_bus() as bus:
        msg_id = bus.send_message(sender, recipient, type, payload, priority=priority)
    sent(sender, recipient, type, msg_id)
    return EXIT_OK


def sent(sender: str, recipient: str, type: str, msg_id: str) -> None:
    """What `bus send` prints for a message it sent: the id, and the original's log line."""
    out(msg_id)
    log("MESSAGE-BUS", f"Sent message: {sender} -> {recipient} [{type}] ({msg_id})")


def bus_count(agent: str, box: str) -> int:
    with new_bus() as bus:
        out(str(bus.message_count(agent, box)))
    return EXIT_OK


# -- the others ------------------------------------------------------------------------

def _json_object(text: str, what: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidPayload(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidPayload(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _dump(value: Any, pretty: bool = False) -> str:
    import json

    if pretty:
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def bus_init(agent: str) -> int:
    with new_bus() as bus:
        bus.init_message_bus(agent)
        log("MESSAGE-BUS", f"Initialized message bus for {agent}")
        log("MESSAGE-BUS", f"  Inbox: {os.path.join(bus.base_dir, agent, 'inbox')}")
        log("MESSAGE-BUS", f"  Outbox: {os.path.join(bus.base_dir, agent, 'outbox')}")
    return EXIT_OK


def _stdin_batches() -> Any:
    """Stdin's lines, numbered, in batches of what has arrived so far (with
    the bytes read for them): a pipe that writes a line and waits for its
    msg_id gets it at once, and a file goes in large batches."""
    read = getattr(sys.stdin.buffer, "read1", sys.stdin.buffer.read)  # what has arrived, not waiting for more
    tail = b""
    number = 0
    while True:
        chunk = read(1 << 20)
        lines = (tail + chunk).split(b"\n")
        tail = lines.pop() if chunk else b""
        batch = []
        for line in lines:
            number += 1
            if line.strip():
                batch.append((number, line.strip()))
        if batch or chunk:
            yield batch, len(chunk)
        if not chunk:
            return


def bus_send_batch(sender: str, recipient: str, type: str, priority: Optional[str] = None) -> int:
    """One process for thousands of sends: each stdin line is one payload."""
    from cfn_fast import progress

    sent = failed = 0
    # a bar only for a file on stdin (its length is known) and ids going elsewhere than the terminal
    shown = progress.on_terminal() and not progress.on_terminal(sys.stdout)
    with new_bus() as bus, progress.bar(progress.stdin_length(), "sending", False, shown) as advance:
        # bytes straight through: C checks each payload, nothing is decoded twice
        for batch, size in _stdin_batches():
            advance(size)
            results = bus.send_batch(sender, recipient, type, [p for _, p in batch], priority=priority)
            for (number, _), r in zip(batch, results):
                if isinstance(r, CfnError):
                    failed += 1
                    sys.stdout.flush()
                    fail(("bus", "send-batch"), _at_line(number, r))
                else:
                    out(r)
                    sent += 1
    log("MESSAGE-BUS", f"Batch {sender} -> {recipient} [{type}]: {sent} sent, {failed} failed")
    return EXIT_NO if failed else EXIT_OK


def _at_line(number: int, exc: CfnError) -> CfnError:
    """The same error, its message prefixed with the stdin line it came from."""
    err = type(exc).__new__(type(exc))
    err.args = (f"line {number}: {exc}",)
    return err


def print_messages(files: list[bytes]) -> None:
    """A JSON array of message files exactly as written (C checked each is one
    JSON object): no decoding and re-encoding, so a number such as 1e400 or an
    escape such as \\ud800 comes back as the sender wrote it, and nothing a
    payload holds can make the output fail half-way."""
    body = b",\n".join(f.strip() for f in files)
    sys.stdout.flush()
    sys.stdout.buffer.write(b"[\n" + body + b"\n]\n" if files else b"[]\n")
    sys.stdout.buffer.flush()


def bus_receive(agent: str) -> int:
    with new_bus() as bus:
        files = bus.receive_raw(agent)
    print_messages(files)
    log("MESSAGE-BUS", f"Retrieved {len(files)} messages for {agent} (sorted by timestamp)")
    return EXIT_OK


def bus_consume(agent: str, max: Optional[int]) -> int:
    with new_bus() as bus:
        files = bus.consume_raw(agent, max)
    print_messages(files)
    log("MESSAGE-BUS", f"Consumed {len(files)} messages for {agent}")
    return EXIT_OK


def bus_recover(agent: Optional[str]) -> int:
    from cfn_fast import progress

    with new_bus() as bus, progress.steps("recovering") as step:
        n = bus.recover(agent, step if agent is None else None)
    out(str(n))
    if n:
        log("MESSAGE-BUS", f"Returned {n} claimed messages of dead consumers to {agent or 'their inboxes'}")
    return EXIT_OK


def bus_clear(agent: str) -> int:
    with new_bus() as bus:
        if not bus.storage.has_inbox(agent):
            raise InboxNotFound(f"Inbox not found for agent: {agent}")
        n = bus.clear_inbox(agent)
    if n:
        log("MESSAGE-BUS", f"Cleared {n} messages from {agent} inbox")
    return EXIT_OK


def bus_cleanup(agent: str) -> int:
    with new_bus() as bus:
        if not bus.storage.has_agent(agent):
            log("MESSAGE-BUS", f"No message bus to cleanup for {agent}")
            return EXIT_OK
        inbox, outbox = bus.message_count(agent, "inbox"), bus.message_count(agent, "outbox")
        bus.cleanup_message_bus(agent)
    log("MESSAGE-BUS", f"Cleaned up message bus for {agent} (inbox: {inbox}, outbox: {outbox})")
    return EXIT_OK


def bus_init_system() -> int:
    with new_bus() as bus:
        bus.init_message_bus_system()
        log("MESSAGE-BUS", f"Message bus system initialized at {bus.base_dir}")
    return EXIT_OK


def bus_cleanup_system() -> int:
    with new_bus() as bus:
        existed = os.path.isdir(bus.base_dir)
        agents = len(bus.list_agents())
        bus.cleanup_message_bus_system()
        if existed:
            log("MESSAGE-BUS", f"Message bus system cleaned up ({agents} agents)")
    return EXIT_OK


def monitor_overflow(interval: float) -> int:
    from cfn_fast import monitors

    log("RATE-LIMIT", f"Starting inbox overflow monitoring (interval: {interval:g}s)")
    monitors.monitor_inbox_overflow(interval=interval, pidfile=True)
    return EXIT_OK


def apply_rate_limit(export: bool) -> int:
    from cfn_fast import monitors

    r = monitors.apply_dynamic_rate_limit()
    log("RATE-LIMIT", f"{str(r.get('tier', '')).capitalize()} system load ({r['load_per_cpu']:.2f}): "
                      f"batch size {r['batch_size']}, backpressure wait {r['wait_ms']}ms")
    if export:
        out(f"export CFN_BATCH_SIZE={int(r['batch_size'])}")
        out(f"export BACKPRESSURE_WAIT_MS={int(r['wait_ms'])}")
    return EXIT_OK


def monitor_rate_limit(interval: Optional[float]) -> int:
    from cfn_fast import monitors

    shown = f"{interval:g}s" if interval is not None else "RATE_LIMIT_CHECK_INTERVAL"
    log("RATE-LIMIT", f"Starting dynamic rate limit monitoring (interval: {shown})")
    monitors.monitor_dynamic_rate_limit(interval=interval, pidfile=True)
    return EXIT_OK


def get_stats(senders: bool = False, flow: bool = False) -> int:
    from cfn_fast import monitors

    out(_dump(monitors.get_all_inbox_stats(senders=senders, flow=flow)))
    return EXIT_OK


def get_load() -> int:
    from cfn_fast import monitors

    out(f"{monitors.get_system_load():.2f}")
    return EXIT_OK


def cleanup() -> int:
    from cfn_fast import monitors

    stopped = monitors.cleanup_rate_limiting()
    log("RATE-LIMIT", f"Rate limiting cleanup completed ({stopped} monitors stopped)")
    return EXIT_OK


def shell_path() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "shell.sh")


def shell(path: bool) -> int:
    if path:
        out(shell_path())
    else:
        with open(shell_path(), encoding="utf-8") as f:
            sys.stdout.write(f.read())
    return EXIT_OK


def demo(senders: int, messages: int, capacity: int, batch: int, consume_delay_ms: int,
         quiet: bool, plot: Optional[str] = None) -> int:
    from cfn_fast.demo import DemoSettings, print_report, run_demo

    if plot is not None:
        from cfn_fast.extras import require

        require("matplotlib", "plot")  # before the run, not after it
    settings = DemoSettings(senders=senders, messages=messages, capacity=capacity, batch=batch,
                            consume_delay_ms=consume_delay_ms)
    report = run_demo(settings, progress=not quiet, plot=plot)
    print_report(report)
    if plot is not None:
        log("DEMO", f"Plot of the run written to {plot}")
    return EXIT_OK if report.lost == 0 and report.failed == 0 else EXIT_NO


def env() -> int:
    from cfn_fast.config import SETTINGS, default_path

    base = os.environ.get("MESSAGE_BASE_DIR") or str(SETTINGS[0].default)
    for s in SETTINGS:
        value = os.environ.get(s.env)
        default = s.default
        if isinstance(default, bool):
            default = int(default)
        elif default is None and s.kind == "path":  # a file in the base folder
            default = default_path(s.attr, base)
        shown = s.shown(value) if value is not None else ("" if default is None else default)
        out(f"{s.env}={shown}\t# {s.help}{'' if value is not None else ' (default)'}")
    return EXIT_OK


def metrics_emit(metric: str, value: float, unit: str, tags: str) -> int:
    from cfn_fast import telemetry

    telemetry.emit_metric(metric, value, unit, _json_object(tags, "tags"))
    return EXIT_OK


class MissingFile(CfnError, FileNotFoundError):
    """A file the command reports on does not exist (exit 1)."""


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"


def metrics_stats(json: bool) -> int:  # noqa: A002 (the option is --json)
    from cfn_fast import telemetry

    stats = telemetry.metrics_stats()
    if json:
        out(_dump(stats))
        return EXIT_OK
    if not stats["exists"]:
        raise MissingFile(f"Metrics file does not exist: {stats['file']}")
    out(f"Metrics file: {stats['file']}")
    out(f"Size: {_human_size(int(stats['size_bytes']))}")
    out(f"Entries: {stats['lines']}")
    totals = {k: v for k, v in stats.get("counters", {}).items() if v}
    if totals:  # the shared-memory totals, machine-wide, without parsing the file
        out("Shared totals:")
        width = max(len(k) for k in totals)
        for name, value in totals.items():
            out(f"  {name:<{width}}  {value}")
    return EXIT_OK


def metrics_clear(force: bool) -> int:
    from cfn_fast import telemetry
    from cfn_fast.config import Config

    path = Config.from_env().metrics_file
    if not os.path.exists(path):
        out(f"Metrics file does not exist: {path}")
        return EXIT_OK
    if not force:
        import click

        try:
            sure = click.confirm(f"Clear all metrics in {path}?", default=False, err=True)
        except click.Abort:  # no answer (stdin closed): the same as no
            sure = False
        if not sure:
            out("Metrics clear cancelled")
            return EXIT_OK
    telemetry.clear_metrics()
    out(f"Metrics cleared: {path}")
    return EXIT_OK


def alerts_emit(alert: str, message: str, severity: str, metadata: str) -> int:
    from cfn_fast import telemetry

    telemetry.emit_alert(alert, message, severity, _json_object(metadata, "metadata"))
    return EXIT_OK


def alerts_summary(minutes: Optional[int], brief: bool) -> int:
    from cfn_fast import telemetry

    summary = telemetry.alerts_summary(minutes)
    if brief:
        summary = {k: summary[k] for k in ("total", "by_severity", "by_type")}
    out(_dump(summary, pretty=True))
    return EXIT_OK


def alerts_check(file: Optional[str], only: Optional[str]) -> int:
    from cfn_fast import checks

    with new_bus() as bus:
        path = file or bus.config.metrics_file
        results = checks.run(bus.storage, None if only is None else [only], path)
        if not results and not os.path.lexists(path):
            log("ALERTING", f"WARNING: metrics file not found: {path}")
    return EXIT_OK


def alerts_clear_old(hours: int) -> int:
    from cfn_fast import checks

    with new_bus() as bus:
        kept, removed = checks.clear_old_alerts(bus.storage, hours)
    log("ALERTING", f"Cleared {removed} alerts older than {hours}h ({kept} kept)")
    return EXIT_OK


def _circuit_json(agent: str, c: Any) -> dict[str, Any]:
    return {"agent": agent, "state": c.state, "failures": c.failures, "probes": c.probes,
            "probe_limit": c.probe_limit, "retry_after": round(c.retry_after, 3), "rejected": c.rejected}


def circuit_status(agent: Optional[str]) -> int:
    with new_bus() as bus:
        if agent is not None:
            c = bus.circuit_status(agent)
            out(_dump(_circuit_json(agent, c)))
            return EXIT_OK if c.state == "closed" else EXIT_NO
        out(_dump([_circuit_json(a, bus.circuit_status(a)) for a in bus.list_agents()]))
    return EXIT_OK


def circuit_reset(agent: str) -> int:
    with new_bus() as bus:
        was = bus.reset_circuit(agent)
    log("CIRCUIT", f"Circuit of {agent} reset to closed (it was {was})")
    return EXIT_OK


def bus_next_sequence(sender: str, recipient: str) -> int:
    with new_bus() as bus:
        out(str(bus.get_next_sequence(sender, recipient)))
    return EXIT_OK


# -- the operator's view (optional extras: prom, top, plot) -------------------------

def metrics_serve(port: int, addr: str) -> int:
    from cfn_fast import exporter

    with new_bus() as bus:
        exporter.serve(bus, port, addr)
    return EXIT_OK


def metrics_prom(out: Optional[str]) -> int:
    from cfn_fast import exporter

    with new_bus() as bus:
        data = exporter.exposition(bus)
    if out is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
    else:
        exporter.write_textfile(out, data)
    return EXIT_OK


def metrics_plot(out: str, agents: int) -> int:
    from cfn_fast import plot

    with new_bus() as bus:
        plot.plot_metrics(bus, out, agents)
    sys.stdout.write(out + "\n")  # `out` names the option here, not output.out
    return EXIT_OK


def top(interval: float) -> int:
    from cfn_fast import top as view

    with new_bus() as bus:
        return view.run(bus, interval)
