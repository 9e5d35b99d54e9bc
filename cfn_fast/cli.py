"""The click app, built from ``commands.COMMANDS``.

Click owns help, parsing and usage errors; the hot commands' bodies live in
_fastpath.py (the same functions the fast path runs), the others here. Every
failure ends as one line on stderr and an exit code: 0 success, 1 the
original's "no", 2 bad usage or bad input.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Optional, Sequence

import click

from cfn_fast import __version__, _fastpath, commands
from cfn_fast._fastpath import fail, log, new_bus, out
from cfn_fast.commands import EXIT_NO, EXIT_OK, EXIT_USAGE, PROG, Command, Param
from cfn_fast.errors import CfnError, InboxNotFound, InvalidPayload

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_HELP = (
    "\b\nExit status:\n"
    "  0  success\n"
    "  1  no: inbox full, retries spent, not found (or a system error)\n"
    "  2  bad usage or bad input"
)


# -- parameter types -----------------------------------------------------------

class Number(click.ParamType):
    """A finite int or float, kept an int when written as one (metric values)."""

    name = "number"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if isinstance(value, (int, float)):
            return value
        text = str(value).strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


_TYPES: dict[str, Callable[[Param], Any]] = {
    "text": lambda p: click.STRING,
    "agent": lambda p: click.STRING,
    "json": lambda p: click.STRING,
    "number": lambda p: Number(),
    "seconds": lambda p: click.FloatRange(min=0, min_open=True),
    "count": lambda p: click.IntRange(min=1),
    "ms": lambda p: click.IntRange(min=0),
    "choice": lambda p: click.Choice(p.choices),
}


def _click_param(p: Param) -> click.Parameter:
    if p.kind == "flag":
        return click.Option([f"--{p.name.replace('_', '-')}", p.name], is_flag=True, default=bool(p.default),
                            help=p.help)
    if p.option:
        return click.Option([f"--{p.name.replace('_', '-')}", p.name], type=_TYPES[p.kind](p),
                            default=p.default, show_default=p.default is not None, help=p.help)
    if p.required:  # no default at all: click >= 8.3 treats default=None as "has one"
        return click.Argument([p.name], type=_TYPES[p.kind](p), metavar=p.metavar)
    return click.Argument([p.name], type=_TYPES[p.kind](p), required=False, default=p.default,
                          metavar=f"[{p.metavar}]")


def _help_text(cmd: Command) -> str:
    text = cmd.help
    positional = [p for p in cmd.params if not p.option]
    if positional:
        width = max(len(p.metavar) for p in positional) + 2
        rows = []
        for p in positional:
            extra = f" [default: {p.default}]" if not p.required and p.default is not None else ""
            rows.append(f"  {p.metavar.ljust(width)}{p.help}{extra}")
        text += "\n\n\b\nArguments:\n" + "\n".join(rows)
    return text + "\n\n" + EXIT_HELP + f"\n\n\b\nBash original: {cmd.function}"


# -- the slower commands ---------------------------------------------------------

def _json_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise InvalidPayload(f"{what} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise InvalidPayload(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _dump(value: Any, pretty: bool = False) -> str:
    if pretty:
        return json.dumps(value, indent=2, ensure_ascii=False)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _inbox_exists(base: str, agent: str) -> bool:
    path = os.path.join(base, agent, "inbox")
    return os.path.isdir(path) and not os.path.islink(path)


def bus_init(agent: str) -> int:
    with new_bus() as bus:
        bus.init_message_bus(agent)
        log("MESSAGE-BUS", f"Initialized message bus for {agent}")
        log("MESSAGE-BUS", f"  Inbox: {os.path.join(bus.base_dir, agent, 'inbox')}")
        log("MESSAGE-BUS", f"  Outbox: {os.path.join(bus.base_dir, agent, 'outbox')}")
    return EXIT_OK


def bus_send_batch(sender: str, recipient: str, type: str) -> int:
    """One process for thousands of sends: each stdin line is one payload."""
    cmd = commands.BY_PATH[("bus", "send-batch")]
    sent = failed = 0
    with new_bus() as bus:
        # bytes straight through: C checks each payload, nothing is decoded twice
        for number, line in enumerate(sys.stdin.buffer, 1):
            payload = line.strip()
            if not payload:
                continue
            try:
                out(bus.send_with_backpressure(sender, recipient, type, payload))
                sent += 1
            except CfnError as e:
                failed += 1
                fail(cmd, _at_line(number, e))
    log("MESSAGE-BUS", f"Batch {sender} -> {recipient} [{type}]: {sent} sent, {failed} failed")
    return EXIT_NO if failed else EXIT_OK


def _at_line(number: int, exc: CfnError) -> CfnError:
    """The same error, its message prefixed with the stdin line it came from."""
    err = type(exc).__new__(type(exc))
    err.args = (f"line {number}: {exc}",)
    return err


def _print_messages(files: list[bytes]) -> None:
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
    _print_messages(files)
    log("MESSAGE-BUS", f"Retrieved {len(files)} messages for {agent} (sorted by timestamp)")
    return EXIT_OK


def bus_consume(agent: str, max: Optional[int]) -> int:
    with new_bus() as bus:
        files = bus.consume_raw(agent, max)
    _print_messages(files)
    log("MESSAGE-BUS", f"Consumed {len(files)} messages for {agent}")
    return EXIT_OK


def bus_recover(agent: Optional[str]) -> int:
    with new_bus() as bus:
        n = bus.recover(agent)
    out(str(n))
    if n:
        log("MESSAGE-BUS", f"Returned {n} claimed messages of dead consumers to {agent or 'their inboxes'}")
    return EXIT_OK


def bus_clear(agent: str) -> int:
    with new_bus() as bus:
        if not _inbox_exists(bus.base_dir, agent):
            raise InboxNotFound(f"Inbox not found for agent: {agent}")
        n = bus.clear_inbox(agent)
    if n:
        log("MESSAGE-BUS", f"Cleared {n} messages from {agent} inbox")
    return EXIT_OK


def bus_cleanup(agent: str) -> int:
    with new_bus() as bus:
        if not os.path.isdir(os.path.join(bus.base_dir, agent)):
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


def get_stats() -> int:
    from cfn_fast import monitors

    out(_dump(monitors.get_all_inbox_stats()))
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
         quiet: bool) -> int:
    from cfn_fast.demo import DemoSettings, print_report, run_demo

    settings = DemoSettings(senders=senders, messages=messages, capacity=capacity, batch=batch,
                            consume_delay_ms=consume_delay_ms)
    report = run_demo(settings, progress=not quiet)
    print_report(report)
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
        shown = value if value is not None else ("" if default is None else default)
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


def metrics_stats(json: bool) -> int:
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


def alerts_summary(minutes: Optional[int]) -> int:
    from cfn_fast import telemetry

    out(_dump(telemetry.alerts_summary(minutes), pretty=True))
    return EXIT_OK


SLOW: dict[str, Callable[..., int]] = {
    "init_message_bus": bus_init,
    "send_batch": bus_send_batch,
    "receive_messages": bus_receive,
    "consume_messages": bus_consume,
    "clear_inbox": bus_clear,
    "recover": bus_recover,
    "cleanup_message_bus": bus_cleanup,
    "init_message_bus_system": bus_init_system,
    "cleanup_message_bus_system": bus_cleanup_system,
    "monitor_inbox_overflow": monitor_overflow,
    "apply_dynamic_rate_limit": apply_rate_limit,
    "monitor_dynamic_rate_limit": monitor_rate_limit,
    "get_all_inbox_stats": get_stats,
    "get_system_load": get_load,
    "cleanup_rate_limiting": cleanup,
    "shell": shell,
    "demo": demo,
    "env": env,
    "emit_metric": metrics_emit,
    "get_metrics_stats": metrics_stats,
    "clear_metrics": metrics_clear,
    "emit_alert": alerts_emit,
    "alerts_summary": alerts_summary,
}


def _callback(cmd: Command) -> Callable[..., int]:
    if cmd.hot:
        def run_hot(**kw: Any) -> int:
            return _fastpath.invoke(cmd, [kw[p.name] for p in cmd.params])
        return run_hot
    body = SLOW[cmd.function]

    def run(**kw: Any) -> int:
        try:
            _fastpath.check_params(cmd, [kw[p.name] for p in cmd.params])
            return body(**kw)
        except (CfnError, OSError) as e:
            return fail(cmd, e)
    return run


def _click_command(cmd: Command) -> click.Command:
    settings = dict(CONTEXT)
    if any(p.kind == "json" and not p.option for p in cmd.params):
        settings["ignore_unknown_options"] = True  # a payload may be a negative number: -1
    return click.Command(cmd.name, callback=_callback(cmd), params=[_click_param(p) for p in cmd.params],
                         help=_help_text(cmd),
                         context_settings=settings)


# click >= 8.2 raises this for a group called without a command; 8.1 prints the help and exits 0
_NO_ARGS: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it


class Cli(click.Group):
    """The root group: turns every click exception into one line on stderr."""

    def main(self, args: Optional[Sequence[str]] = None, prog_name: Optional[str] = None,
             complete_var: Optional[str] = None, standalone_mode: bool = True, **extra: Any) -> Any:
        code = self._main(args, prog_name or PROG, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _main(self, args: Optional[Sequence[str]], prog_name: str, complete_var: Optional[str],
              **extra: Any) -> int:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except _NO_ARGS as e:
            sys.stderr.write(e.ctx.get_help() + "\n" if e.ctx else "")
            return EXIT_USAGE
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else PROG
            sys.stderr.write(f"{where}: {e.format_message()} (try '{where} --help')\n")
            return EXIT_USAGE
        except click.ClickException as e:
            sys.stderr.write(f"{PROG}: {e.format_message()}\n")
            return e.exit_code
        except click.Abort:  # click's form of KeyboardInterrupt
            sys.stderr.write(f"{PROG}: interrupted\n")
            return EXIT_INTERRUPTED
        return rv if isinstance(rv, int) else EXIT_OK


def build() -> Cli:
    root = Cli(PROG, help=(
        "A rate-limited, backpressured message bus for agent swarms on the local filesystem: "
        "a drop-in for the bash rate-limiting.sh and message-bus.sh.\n\n"
        "Configured by the original's environment variables (MESSAGE_BASE_DIR, "
        "MAX_INBOX_SIZE, BACKPRESSURE_WAIT_MS, ...; see 'cfn-fast env').\n\n" + EXIT_HELP),
        context_settings=CONTEXT, no_args_is_help=True)
    root = click.version_option(__version__, "--version", prog_name=PROG)(root)
    groups: dict[str, click.Group] = {}
    for name, text in commands.GROUPS.items():
        groups[name] = click.Group(name, help=text, context_settings=CONTEXT, no_args_is_help=True)
        root.add_command(groups[name])
    for cmd in commands.COMMANDS:
        parent = groups[cmd.path[0]] if len(cmd.path) == 2 else root
        parent.add_command(_click_command(cmd))
    return root


cli = build()

__all__ = ["Cli", "Number", "SLOW", "build", "cli", "shell_path"]
