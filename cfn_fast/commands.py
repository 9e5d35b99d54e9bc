"""Every command of the CLI in one table: its name, arguments, help and
the function that runs it (handlers.py). To add a command, add a row here
and its handler there; nothing else names it.

Both front ends are built from ``COMMANDS``: the click app (cli.py) for help,
usage errors and everything else, and the fast path (_fastpath.py) that runs
the rows flagged ``hot`` before click is imported. Neither declares a
command's syntax itself, so they cannot drift. ``invoke`` runs a row for
both. This module imports nothing costly.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

from cfn_fast import handlers as h
from cfn_fast.errors import CfnError
from cfn_fast.output import EXIT_NO, EXIT_OK, EXIT_USAGE, PROG, fail

Default = Union[str, int, float, bool, None]


class Param:
    """One argument or option. (Plain classes: a NamedTuple costs ~1 ms to
    create at import, and this module is on every hot command's path.)"""

    __slots__ = ("name", "help", "kind", "required", "default", "choices", "option")

    def __init__(self, name: str, help: str, kind: str = "text", required: bool = True,
                 default: Default = None, choices: tuple[str, ...] = (), option: bool = False) -> None:
        self.name = name            # Python name; a positional shows as NAME
        self.help = help
        self.kind = kind            # text | agent | json | number | seconds | count | ms | port | choice | flag
        self.required = required
        self.default = default
        self.choices = choices
        self.option = option        # --name instead of a positional

    @property
    def metavar(self) -> str:
        return self.name.upper()

    def __repr__(self) -> str:
        return f"Param({self.name!r}, kind={self.kind!r})"


class Command:
    """One command: where it sits, the original function it stands for, its
    help, parameters and handler (called with the parameters by name)."""

    __slots__ = ("path", "function", "help", "params", "handler", "hot")

    def __init__(self, path: tuple[str, ...], function: str, help: str, params: tuple[Param, ...] = (), *,
                 handler: Callable[..., int], hot: bool = False) -> None:
        self.path = path            # ("get-size",) or ("bus", "send")
        self.function = function    # the bash original's function (or the drop-in's)
        self.help = help            # first line: the summary
        self.params = params
        self.handler = handler      # handlers.<name>(**values) -> exit code
        self.hot = hot              # run by the fast path, before click is imported

    @property
    def name(self) -> str:
        return self.path[-1]

    def __repr__(self) -> str:
        return f"Command({' '.join(self.path)!r})"


GROUPS: dict[str, str] = {
    "bus": "The message bus: inboxes, sending and receiving (message-bus.sh).",
    "metrics": "Metrics: JSONL lines in METRICS_FILE (metrics.sh), Prometheus exposition and plots.",
    "alerts": "Alerts: JSONL lines in ALERT_LOG_FILE, with a shared cooldown (alerting.sh).",
    "circuit": "Circuit breakers: each inbox's, shared by every process that sends to it.",
}

_AGENT = Param("agent", "the agent id (letters, digits, '.', '_' and '-')", "agent")
_FROM = Param("sender", "the sending agent's id", "agent")
_TO = Param("recipient", "the receiving agent's id; its inbox must exist", "agent")
_TYPE = Param("type", "the message type, for example 'task'")
_PAYLOAD = Param("payload", "the payload: one JSON value, checked strictly (RFC 8259)", "json")
_PRIORITY = Param("priority", "high: may use the inbox's headroom, and is taken first [default: CFN_PRIORITY]",
                  "choice", False, None, ("normal", "high"), option=True)

COMMANDS: tuple[Command, ...] = (
    # -- rate limiting (rate-limiting.sh), at the top level -----------------
    Command(("check-capacity",), "check_inbox_capacity",
            "Exit 0 when the agent's inbox has room (or does not exist yet), 1 when it is full.\n\n"
            "Counts the inbox's files first, so messages removed by other tools are seen.",
            (_AGENT,), hot=True, handler=h.check_capacity),
    Command(("get-size",), "get_inbox_size",
            "Print how many messages the agent's inbox holds; 0 when it has no inbox.\n\n"
            "Counts the inbox's files first, so messages removed by other tools are seen.",
            (_AGENT,), hot=True, handler=h.get_size),
    Command(("get-utilization",), "get_inbox_utilization",
            "Print the inbox's fill level: size * 100 / MAX_INBOX_SIZE, rounded down.",
            (_AGENT,), hot=True, handler=h.get_utilization),
    Command(("send-backpressure",), "send_with_backpressure",
            "Send a message, waiting while the recipient's inbox is full; print its id.\n\n"
            "Retries BACKPRESSURE_MAX_RETRIES times, BACKPRESSURE_WAIT_MS apart (see "
            "BACKPRESSURE_BACKOFF), and exits 1 when the inbox stayed full throughout.",
            (_FROM, _TO, _TYPE, _PAYLOAD, _PRIORITY), hot=True, handler=h.send_backpressure),
    Command(("monitor-overflow",), "monitor_inbox_overflow",
            "Watch every inbox, emit size metrics and overflow alerts; runs until signalled.",
            (Param("interval", "seconds between checks", "seconds", False, 5.0),), handler=h.monitor_overflow),
    Command(("apply-rate-limit",), "apply_dynamic_rate_limit",
            "Check the system load once and publish the batch size and retry wait for it.\n\n"
            "Every sender on the base folder picks up the new wait. With --export, print "
            "shell assignments for CFN_BATCH_SIZE and BACKPRESSURE_WAIT_MS (for eval).",
            (Param("export", "print 'export NAME=value' lines for eval", "flag", False, False,
                   option=True),), handler=h.apply_rate_limit),
    Command(("monitor-rate-limit",), "monitor_dynamic_rate_limit",
            "Apply the dynamic rate limit periodically; runs until signalled.",
            (Param("interval", "seconds between checks [default: RATE_LIMIT_CHECK_INTERVAL]",
                   "seconds", False, None),), handler=h.monitor_rate_limit),
    Command(("get-stats",), "get_all_inbox_stats",
            "Print a JSON array with one {agent, size, utilization, max_size} per inbox.\n\n"
            "With --senders, each also lists its heaviest senders and their shares (top_senders); "
            "with --flow, its flow control: circuit, adaptive limit, sojourn, drain, waiting senders.",
            (Param("senders", "add each inbox's heaviest senders", "flag", False, False, option=True),
             Param("flow", "add each inbox's flow control", "flag", False, False, option=True)),
            handler=h.get_stats),
    Command(("get-load",), "get_system_load",
            "Print the 1-minute load average per CPU, with two decimals.", handler=h.get_load),
    Command(("cleanup",), "cleanup_rate_limiting",
            "Stop the monitors started on this base folder (by their pid files, never by name).", handler=h.cleanup),
    Command(("env",), "env",
            "Print every environment variable cfn-fast reads, its value in force and its meaning.", handler=h.env),
    Command(("shell",), "shell",
            "Print the bash drop-in: source <(cfn-fast shell) defines the original's functions.",
            (Param("path", "print the file's path instead of its text", "flag", False, False,
                   option=True),), handler=h.shell),
    Command(("demo",), "demo",
            "Run a small swarm on a private temporary base folder and report what happened.\n\n"
            "Several sender processes flood one slow consumer; backpressure holds the inbox "
            "at its capacity and nothing is lost. Exits 1 if a send failed or a message was lost.",
            (Param("senders", "sender processes", "count", False, 4, option=True),
             Param("messages", "messages each sender sends", "count", False, 300, option=True),
             Param("capacity", "the consumer's inbox capacity (MAX_INBOX_SIZE)", "count", False, 50,
                   option=True),
             Param("batch", "messages the consumer takes per read", "count", False, 10, option=True),
             Param("consume_delay_ms", "the consumer's pause between reads, ms", "ms", False, 5,
                   option=True),
             Param("quiet", "no progress bar", "flag", False, False, option=True),
             Param("plot", "also chart the run's inbox fill and backpressure into this PNG (the 'plot' extra)",
                   "text", False, None, option=True)), handler=h.demo),
    Command(("top",), "top",
            "Show a live full-screen view of the inboxes, the rate limit and recent alerts; q quits.\n\n"
            "One bar per inbox, fullest first (red when full, amber above 80 %), as many as the "
            "screen holds; backpressure waits and failed sends per second; the newest alerts. "
            "Printed once when stdout is not a terminal. Needs the 'top' extra (rich).",
            (Param("interval", "seconds between refreshes", "seconds", False, 1.0, option=True),), handler=h.top),
    # -- the message bus (message-bus.sh), under `bus` -------------------------
    Command(("bus", "init"), "init_message_bus",
            "Create the agent's inbox and outbox (idempotent).", (_AGENT,), handler=h.bus_init),
    Command(("bus", "send"), "send_message",
            "Send a message and print its id; exit 1 when the inbox is missing or full.\n\n"
            "A full inbox never evicts a message: use send-backpressure to wait for room.",
            (_FROM, _TO, _TYPE, _PAYLOAD, _PRIORITY), hot=True, handler=h.bus_send),
    Command(("bus", "send-batch"), "send_batch",
            "Send one message per line of stdin (a JSON payload each), with backpressure.\n\n"
            "Prints each message id; a line that fails is reported on stderr with its line "
            "number and the others still go. Exits 1 when any line failed.",
            (_FROM, _TO, _TYPE, _PRIORITY), handler=h.bus_send_batch),
    Command(("bus", "receive"), "receive_messages",
            "Print the inbox's messages as a JSON array, oldest first; removes nothing.",
            (_AGENT,), handler=h.bus_receive),
    Command(("bus", "consume"), "consume_messages",
            "Take messages out of the inbox and print them as a JSON array, oldest first.\n\n"
            "Each message goes to exactly one consumer, however many run at once.",
            (_AGENT, Param("max", "take at most this many", "count", False, None, option=True)), handler=h.bus_consume),
    Command(("bus", "recover"), "recover",
            "Return messages claimed by consumers that died to their inboxes; print how many.\n\n"
            "With no agent, every inbox of the base folder. The overflow monitor does this too, "
            "on its reconcile cadence.",
            (Param("agent", "only this agent's inbox", "agent", False),), handler=h.bus_recover),
    Command(("bus", "clear"), "clear_inbox",
            "Delete every message in the agent's inbox; exit 1 when it has no inbox.", (_AGENT,), handler=h.bus_clear),
    Command(("bus", "count"), "message_count",
            "Print how many messages the agent's inbox (or outbox) holds; 0 when missing.",
            (_AGENT, Param("box", "which folder to count", "choice", False, "inbox",
                           ("inbox", "outbox"))), hot=True, handler=h.bus_count),
    Command(("bus", "cleanup"), "cleanup_message_bus",
            "Remove the agent's folder and every message in it.", (_AGENT,), handler=h.bus_cleanup),
    Command(("bus", "next-sequence"), "get_next_sequence",
            "Advance the sender-to-recipient sequence number, as a send does, and print it.",
            (_FROM, Param("recipient", "the receiving agent's id", "agent")), handler=h.bus_next_sequence),
    Command(("bus", "init-system"), "init_message_bus_system",
            "Create the base folder (MESSAGE_BASE_DIR) and its shared state.", handler=h.bus_init_system),
    Command(("bus", "cleanup-system"), "cleanup_message_bus_system",
            "Remove the base folder and everything in it.", handler=h.bus_cleanup_system),
    # -- metrics (metrics.sh) and alerts (alerting.sh) ---------------------------
    Command(("metrics", "emit"), "emit_metric",
            "Append one metric line to METRICS_FILE.",
            (Param("metric", "the metric's name, for example coordination.time"),
             Param("value", "a number", "number"),
             Param("unit", "the unit", "text", False, "count"),
             Param("tags", "a JSON object of tags", "json", False, "{}")), handler=h.metrics_emit),
    Command(("metrics", "stats"), "get_metrics_stats",
            "Show the metrics file's size and line count; exit 1 when it does not exist.",
            (Param("json", "print the figures as one JSON object", "flag", False, False,
                   option=True),), handler=h.metrics_stats),
    Command(("metrics", "serve"), "metrics_serve",
            "Serve the bus's state as Prometheus metrics at http://ADDR:PORT/metrics until signalled.\n\n"
            "Read from the shared state at each scrape: no polling, no copy of the counters. "
            "Needs the 'prom' extra (prometheus_client).",
            (Param("port", "TCP port; 0 picks a free one (the log line names it)", "port", False, 9464,
                   option=True),
             Param("addr", "address to listen on", "text", False, "127.0.0.1", option=True)),
            handler=h.metrics_serve),
    Command(("metrics", "prom"), "metrics_prom",
            "Print the Prometheus exposition of the bus's state once (node_exporter textfile format).\n\n"
            "With --out, write it to that file atomically: a temporary file in the same folder, then a "
            "rename. Needs the 'prom' extra (prometheus_client).",
            (Param("out", "write to this file (for example /var/lib/node_exporter/cfn.prom)", "text", False,
                   None, option=True),), handler=h.metrics_prom),
    Command(("metrics", "plot"), "metrics_plot",
            "Chart inbox utilisation and backpressure over time from METRICS_FILE into a PNG.\n\n"
            "Utilisation comes from the overflow monitor's inbox.utilization lines (monitor-overflow), "
            "backpressure from the send loop's backpressure.* lines; METRICS_FILE.1 is read first when "
            "there is one. Prints the PNG's path. Needs the 'plot' extra (matplotlib).",
            (Param("out", "the PNG to write", "text", False, "cfn-metrics.png", option=True),
             Param("agents", "inboxes charted: the fullest at their peak", "count", False, 8, option=True)),
            handler=h.metrics_plot),
    Command(("metrics", "clear"), "clear_metrics",
            "Empty the metrics file (asks first unless --force).",
            (Param("force", "do not ask", "flag", False, False, option=True),), handler=h.metrics_clear),
    Command(("alerts", "emit"), "emit_alert",
            "Append one alert line to ALERT_LOG_FILE, unless the same alert is cooling down.",
            (Param("alert", "the alert's type, for example inbox_overflow"),
             Param("message", "what happened, for people"),
             Param("severity", "info, warning or critical", "text", False, "info"),
             Param("metadata", "a JSON object of details", "json", False, "{}")), handler=h.alerts_emit),
    Command(("alerts", "summary"), "alerts_summary",
            "Print a JSON summary of the alert log (counts by type and severity).",
            (Param("minutes", "only the last this many minutes", "count", False, None, option=True),
             Param("brief", "only total, by_severity and by_type, as the original's get_alert_summary",
                   "flag", False, False, option=True)),
            handler=h.alerts_summary),
    Command(("alerts", "check"), "check_thresholds",
            "Run the original's threshold checks over the last 60 metric lines; alert where crossed.\n\n"
            "coordination-time, delivery-rate, memory-growth, fd-growth, error-rate and queue-depth, "
            "against the ALERT_* settings. A missing metrics file is a warning, not a failure.",
            (Param("file", "the metrics file [default: METRICS_FILE]", "text", False, None),
             Param("only", "run this check alone", "choice", False, None,
                   ("coordination-time", "delivery-rate", "memory-growth", "fd-growth", "error-rate",
                    "queue-depth"), option=True)),
            handler=h.alerts_check),
    Command(("alerts", "clear-old"), "clear_old_alerts",
            "Keep only the alerts of the last HOURS hours in the alert log.",
            (Param("hours", "keep this many hours", "count", False, 24, option=True),), handler=h.alerts_clear_old),
)

# -- flow control ------------------------------------------------------------------
COMMANDS += (
    Command(("circuit", "status"), "circuit_status",
            "Print an inbox's circuit breaker as JSON; exit 0 when closed, 1 when open or half-open.\n\n"
            "With no agent, a JSON array of every inbox's. Sends to an open circuit fail at once with "
            "CircuitOpen, without touching the inbox, until its cooldown ends and probes go.",
            (Param("agent", "only this agent's inbox", "agent", False),), handler=h.circuit_status),
    Command(("circuit", "reset"), "reset_circuit",
            "Close an inbox's circuit now, for every process (a circuit_closed alert says so).",
            (_AGENT,), handler=h.circuit_reset),
)

BY_PATH: dict[tuple[str, ...], Command] = {c.path: c for c in COMMANDS}


def split(argv: Sequence[str]) -> tuple[Optional[Command], list[str]]:
    """The command argv names, and the arguments after its name."""
    if not argv:
        return None, []
    if argv[0] in GROUPS:
        if len(argv) < 2:
            return None, []
        return BY_PATH.get((argv[0], argv[1])), list(argv[2:])
    return BY_PATH.get((argv[0],)), list(argv[1:])


def plain_values(cmd: Command, args: Sequence[str]) -> Optional[dict[str, str]]:
    """The argument values by name when ``args`` is a plain call of a hot
    command (the right count of positionals, choices respected, and choice
    options given as ``--name value`` before them); None otherwise, and then
    click parses it and explains what is wrong. A JSON payload may start with
    '-' (a negative number); click's side accepts that too."""
    if not cmd.hot:
        return None
    named: dict[str, str] = {}
    options = {f"--{p.name.replace('_', '-')}": p for p in cmd.params if p.option and p.choices}
    while len(args) >= 2 and args[0] in options:
        p = options[args[0]]
        if p.name in named or args[1] not in p.choices:
            return None
        named[p.name] = args[1]
        args = args[2:]
    positional = [p for p in cmd.params if not p.option]
    required = sum(1 for p in positional if p.required)
    if not required <= len(args) <= len(positional):
        return None
    for p, a in zip(positional, args):
        if a.startswith("-") and not (p.kind == "json" and a[1:2].isdigit()):
            return None
        if p.choices and a not in p.choices:
            return None
        named[p.name] = a
    for p in positional[len(args):]:
        named[p.name] = str(p.default)
    return named


def invoke(cmd: Command, values: Mapping[str, Any]) -> int:
    """Runs a command's handler on parsed values (both front ends call this).
    Agent ids are checked first, so a bad one is bad input (exit 2) even where
    the command would just find nothing; a CfnError or OSError ends as one line
    on stderr and its exit code."""
    try:
        agents = [(p.name, values[p.name]) for p in cmd.params
                  if p.kind == "agent" and isinstance(values.get(p.name), str)]
        if agents:
            from cfn_fast.storage import check_agent

            for name, value in agents:
                check_agent(value, name)
        return cmd.handler(**values)
    except (CfnError, OSError) as e:  # InboxFull and BackpressureTimeout are the original's "no"
        return fail(cmd.path, e)


__all__ = ["BY_PATH", "COMMANDS", "Command", "EXIT_NO", "EXIT_OK", "EXIT_USAGE", "GROUPS", "PROG", "Param",
           "invoke", "plain_values", "split"]
