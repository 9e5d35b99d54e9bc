"""The click app, built from ``commands.COMMANDS``.

Click owns help, parsing and usage errors; every command's body is its row's
handler (handlers.py), run through ``commands.invoke`` as the fast path runs
it. Every failure ends as one line on stderr and an exit code: 0 success, 1
the original's "no", 2 bad usage or bad input.
"""
from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import click

from cfn_fast import __version__, commands
from cfn_fast.commands import Command, Param
from cfn_fast.output import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG

CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_HELP = (
    "\b\nExit status:\n"
    "  0  success\n"
    "  1  no: inbox full, retries spent, not found (or a system error)\n"
    "  2  bad usage or bad input"
)


# -- parameter types -----------------------------------------------------------

if TYPE_CHECKING:  # generic in click >= 8.2; subscripting it at run time would fail on 8.1
    _NumberBase = click.ParamType[Union[int, float]]
else:
    _NumberBase = click.ParamType


class Number(_NumberBase):
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
    "port": lambda p: click.IntRange(0, 65535),
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

def _callback(cmd: Command) -> Callable[..., int]:
    def run(**kw: Any) -> int:
        return commands.invoke(cmd, kw)
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

__all__ = ["Cli", "Number", "build", "cli"]
