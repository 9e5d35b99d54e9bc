"""Cold start of the command line, as a user installs it, against the process floor (issue 11).

Every figure is a fresh process timed from fork to exit, and its reference is
timed interleaved with it (round k of both before round k+1 of either), so a
busy shared machine moves both alike; only the ratios are meant to be read.

  cfn-fast get-size / check-capacity / bus count   vs a bare /bin/true exec        <= 2x
  cfn-fast send-backpressure (room in the inbox)   vs /bin/true                    <= 3x
  cfn-fast get-utilization, bus send               vs /bin/true                    (orientation)
  cfn-fast get-stats (handed to Python)            vs the console script it replaced  <= 1x (no slower)
  python -c pass (the venv's interpreter)          vs /bin/true                    (orientation)

and in bash, per call through the drop-in (sourced from the venv's own
`cfn-fast shell`, with the venv neither active nor on PATH, the settings plain
shell variables), against `x=$(/bin/true)` in the same loop:

  x=$(get_inbox_size bob)          <= 1.5x the exec floor
  send_with_backpressure           >= 15x faster than the original's 33 ms send (spec)
  check_inbox_capacity bob         (orientation)
  x=$(get_inbox_size bob) of the bash original, the function the drop-in replaces (orientation)

These run against a REGULAR install (pip install of this tree, not -e: an
editable install would time its import hooks, not what users run): the
bench builds one in a temporary venv (about 15 s) unless CFN_BENCH_VENV
names a venv that holds one (bench/README.md). The smoke pass (benchmarks
disabled) runs each command once, in CFN_BENCH_VENV or this environment.

    pytest bench/bench_startup.py --benchmark-only     # the rows join the table at the end of the run
    python bench/bench_startup.py [rounds]             # a plain table
"""
from __future__ import annotations

import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest

import targets

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 30
BASH_CALLS, BASH_ROUNDS = 100, 15
ORIGINAL_SEND_S = 0.033  # the original's send: two whole-system syncs (shared/spec/bash-original.md)

# name -> (arguments, target ratio against /bin/true or None)
NATIVE = {
    "get-size": (["get-size", "bob"], 2.0),
    "check-capacity": (["check-capacity", "bob"], 2.0),
    "bus count": (["bus", "count", "bob"], 2.0),
    "send-backpressure": (["send-backpressure", "alice", "carol", "task", '{"job":2}'], 3.0),
    "get-utilization": (["get-utilization", "bob"], None),
    "bus send": (["bus", "send", "alice", "carol", "task", '{"job":1}'], None),
}
PYTHON_ONLY = {"get-stats": ["get-stats"]}

# What pip wrote as bin/cfn-fast before the native program replaced it.
CONSOLE_SCRIPT = """#!{python}
# -*- coding: utf-8 -*-
import re
import sys
from cfn_fast.__main__ import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""

# The bash original's get_inbox_size, as the drop-in's users had it in their shell.
ORIGINAL_GET_SIZE = """
original_get_inbox_size() {
    local inbox="$MESSAGE_BASE_DIR/$1/inbox"
    [[ -d "$inbox" ]] || { echo 0; return 0; }
    local files=("$inbox"/*.json)
    if [[ -f "${files[0]}" ]]; then echo "${#files[@]}"; else echo 0; fi
}
"""

BASH_LOOP = """set -euo pipefail
source <("$1" shell)
MESSAGE_BASE_DIR=$2/messages
METRICS_FILE=$2/metrics.jsonl
ALERT_LOG_FILE=$2/alerts.jsonl
MAX_INBOX_SIZE=1000000
""" + ORIGINAL_GET_SIZE + """
# Each round makes n calls of every kind, one of each in turn, so a burst of
# load on this shared machine falls on all of them alike (times in microseconds:
# EPOCHREALTIME without its point).
for ((r = 0; r < $4; r++)); do
    a=0 b=0 c=0 d=0 e=0
    for ((i = 0; i < $3; i++)); do
        t0=${EPOCHREALTIME/./}; x=$(/bin/true)
        t1=${EPOCHREALTIME/./}; x=$(get_inbox_size bob)
        t2=${EPOCHREALTIME/./}; check_inbox_capacity bob
        t3=${EPOCHREALTIME/./}; send_with_backpressure alice carol task '{"n":1}' >/dev/null
        t4=${EPOCHREALTIME/./}; x=$(original_get_inbox_size bob)
        t5=${EPOCHREALTIME/./}
        ((a += t1 - t0, b += t2 - t1, c += t3 - t2, d += t4 - t3, e += t5 - t4)) || true
    done
    echo "$a $b $c $d $e"
done
"""
BASH_KEYS = ("bash.true", "bash.size", "bash.capacity", "bash.send", "bash.original-size")


def _rows() -> list[targets.Row]:
    R = targets.Row
    rows = [R(f"cfn-fast {name}, cold, vs a bare /bin/true exec", f"startup.{name}", f"startup.true@{name}", t)
            for name, (_, t) in NATIVE.items()]
    rows += [
        R("cfn-fast get-stats (Python) vs the console script it replaced", "startup.get-stats",
          "startup.console@get-stats", 1.0),
        R("python -c pass, cold, vs a bare /bin/true exec", "startup.python", "startup.true@python", None),
        R("bash: x=$(get_inbox_size bob) through the drop-in vs x=$(/bin/true)", "bash.size", "bash.true", 1.5),
        R("bash: send_with_backpressure through the drop-in vs the original's 33 ms send", "bash.send",
          "bash.original-send", 1 / 15),
        R("bash: check_inbox_capacity bob through the drop-in vs x=$(/bin/true)", "bash.capacity", "bash.true",
          None),
        R("bash: x=$(get_inbox_size bob) of the bash original vs x=$(/bin/true)", "bash.original-size",
          "bash.true", None),
    ]
    return rows


ROWS = _rows()
targets.ROWS.extend(r for r in ROWS if r not in targets.ROWS)  # one table at the end of the run


# -- the venv ------------------------------------------------------------------------------------

def regular_install(venv: Path) -> Optional[str]:
    """Why venv does not hold a regular install of cfn-fast (None when it does)."""
    program = venv / "bin" / "cfn-fast"
    try:
        with open(program, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return f"{program} is not the native program"
    except OSError as e:
        return f"{program}: {e.strerror}"
    r = subprocess.run([str(venv / "bin" / "python"), "-c", "import cfn_fast, sys; print(cfn_fast.__file__)"],
                       capture_output=True, text=True, cwd="/")  # not this tree's cfn_fast, through sys.path[0]
    if r.returncode != 0:
        return f"its python cannot import cfn_fast: {r.stderr.strip()}"
    if not Path(r.stdout.strip()).resolve().is_relative_to(venv.resolve()):
        return f"its cfn_fast is {r.stdout.strip()}, outside the venv (an editable install?)"
    editable = [p.name for p in venv.glob("lib/python*/site-packages/__editable__*")]
    if editable:
        return f"it has editable finders: {', '.join(editable)}"
    return None


def build_venv() -> Path:
    """A fresh venv with `pip install <this tree>` (removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="cfn-bench-venv-"))
    atexit.register(shutil.rmtree, root, True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(REPO)], check=True,
                   stdout=subprocess.DEVNULL)
    return venv


def bench_venv(measuring: bool) -> Path:
    given = os.environ.get("CFN_BENCH_VENV")
    if given:
        why = regular_install(Path(given))
        if why:
            raise RuntimeError(f"CFN_BENCH_VENV={given}: {why} (see bench/README.md)")
        return Path(given)
    if not measuring:
        return Path(sys.executable).parent.parent  # the smoke pass: the commands work, nothing timed
    return build_venv()


# -- the lab -------------------------------------------------------------------------------------

class Lab:
    """A private base folder where bob holds 100 messages (alice and carol have
    inboxes; sends go to carol, so bob's count stays put), and the environment
    every timed process gets: the settings exported, the venv not on PATH."""

    def __init__(self, venv: Path) -> None:
        self.venv = venv
        self.program = str(venv / "bin" / "cfn-fast")
        self.python = str(venv / "bin" / "python")
        self.root = Path(tempfile.mkdtemp(prefix="cfn-bench-startup-", dir="/dev/shm" if os.access(
            "/dev/shm", os.W_OK) else None))
        self.console = self.root / "cfn-fast-console-script"
        self.console.write_text(CONSOLE_SCRIPT.format(python=self.python))
        self.console.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")}
        env.update(
            PATH="/usr/local/bin:/usr/bin:/bin",
            PYTHONPYCACHEPREFIX=str(self.root / "pycache"),
            MESSAGE_BASE_DIR=str(self.root / "messages"),
            METRICS_FILE=str(self.root / "metrics.jsonl"),
            ALERT_LOG_FILE=str(self.root / "alerts.jsonl"),
            MAX_INBOX_SIZE="1000000",  # the sends never fill it, however many rounds
        )
        self.env = env
        for agent in ("alice", "bob", "carol"):
            self.run([self.program, "bus", "init", agent])
        self.run([self.program, "bus", "send-batch", "alice", "bob", "seed"],
                 input="".join(f"{i}\n" for i in range(100)))

    def run(self, argv: list[str], input: Optional[str] = None) -> str:
        r = subprocess.run(argv, env=self.env, input=input, capture_output=True, text=True, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr}")
        return r.stdout

    def once(self, argv: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       cwd=self.root)
        return time.perf_counter() - t0

    def bash_per_call(self, calls: int, rounds: int) -> dict[str, float]:
        """Seconds per call of each bash loop, the median over rounds."""
        out = self.run(["bash", "-c", BASH_LOOP, "bash", self.program, str(self.root), str(calls), str(rounds)])
        per: dict[str, list[float]] = {k: [] for k in BASH_KEYS}
        for line in out.split("\n"):
            if line.strip():
                for k, total_us in zip(BASH_KEYS, line.split()):
                    per[k].append(int(total_us) / 1e6 / calls)
        return {k: statistics.median(v) for k, v in per.items()}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


TRUE = ["/bin/true"]


@pytest.fixture(scope="module")
def lab(pytestconfig: pytest.Config) -> Iterator[Lab]:
    from conftest import measuring

    lab = Lab(bench_venv(measuring(pytestconfig)))
    yield lab
    lab.close()


def _interleaved(benchmark, lab: Lab, argv: list[str], ref: list[str]) -> Optional[float]:
    """Times argv with pytest-benchmark; ref is timed once before each round,
    in the untimed setup. Returns ref's median (None in the smoke pass)."""
    lab.once(argv)
    lab.once(ref)  # warm the page cache and the bytecode cache
    if getattr(benchmark, "disabled", False):
        benchmark(lab.once, argv)
        return None
    refs: list[float] = []
    benchmark.pedantic(lab.once, args=(argv,), setup=lambda: refs.append(lab.once(ref)) and None,
                       rounds=ROUNDS, iterations=1, warmup_rounds=2)
    return statistics.median(refs)


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_command_startup(benchmark, record, lab, name):
    ref = _interleaved(benchmark, lab, [lab.program, *NATIVE[name][0]], TRUE)
    if ref is not None:
        record(benchmark, f"startup.true@{name}", value=ref)
        record(benchmark, f"startup.{name}", entry=lab.program)


def test_python_only_command_startup(benchmark, record, lab):
    """get-stats is handed to Python: no slower than the console script was."""
    ref = _interleaved(benchmark, lab, [lab.program, *PYTHON_ONLY["get-stats"]],
                       [str(lab.console), *PYTHON_ONLY["get-stats"]])
    if ref is not None:
        record(benchmark, "startup.console@get-stats", value=ref)
        record(benchmark, "startup.get-stats")


def test_bare_interpreter(benchmark, record, lab):
    ref = _interleaved(benchmark, lab, [lab.python, "-c", "pass"], TRUE)
    if ref is not None:
        record(benchmark, "startup.true@python", value=ref)
        record(benchmark, "startup.python", python=lab.python)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_drop_in_per_call(benchmark, record, lab):
    measured = not getattr(benchmark, "disabled", False)
    calls, rounds = (BASH_CALLS, BASH_ROUNDS) if measured else (2, 1)
    got = benchmark.pedantic(lab.bash_per_call, args=(calls, rounds), rounds=1, iterations=1)
    if measured:
        for key, value in got.items():
            record(benchmark, key, value=value)
        record(benchmark, "bash.original-send", value=ORIGINAL_SEND_S)


def table(rounds: int = ROUNDS, out: Callable[[str], None] = print) -> None:
    """The same figures as a plain table, from one run."""
    venv = bench_venv(True)
    lab = Lab(venv)
    values: dict[str, float] = {}
    try:
        def pair(key: str, argv: list[str], ref_key: str, ref: list[str]) -> None:
            lab.once(argv)
            lab.once(ref)
            a, b = [], []
            for _ in range(rounds):
                b.append(lab.once(ref))
                a.append(lab.once(argv))
            values[key], values[ref_key] = statistics.median(a), statistics.median(b)

        for name, (args, _) in NATIVE.items():
            pair(f"startup.{name}", [lab.program, *args], f"startup.true@{name}", TRUE)
        pair("startup.get-stats", [lab.program, "get-stats"], "startup.console@get-stats",
             [str(lab.console), "get-stats"])
        pair("startup.python", [lab.python, "-c", "pass"], "startup.true@python", TRUE)
        values.update(lab.bash_per_call(BASH_CALLS, BASH_ROUNDS))
        values["bash.original-send"] = ORIGINAL_SEND_S
    finally:
        lab.close()
    out(f"venv: {venv}   rounds: {rounds}   medians of cold processes")
    for line in targets.table(values, markdown=True):
        if any(r.name in line for r in ROWS) or line.startswith(("| operation", "|---")):
            out(line)


if __name__ == "__main__":
    table(int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS)
