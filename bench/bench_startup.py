"""Cold start-up of the hot CLI commands, against a bare interpreter.

Agent scripts call `cfn-fast get-size` and friends in loops, so each call must
cost little more than starting Python. Every figure is a fresh process, timed
from fork to exit; the ratio divides by `python -c pass` measured in the same
run (target: at most 1.6). The bash original's get-size took 3 ms on the
reference machine (shared/spec/bash-original.md); a bash process doing its glob
count is measured here too, for scale.

    pytest bench/bench_startup.py --benchmark-only            # pytest-benchmark, ratios in extra_info
    python bench/bench_startup.py [rounds]                    # a plain table

Bytecode is cached in a private folder (as an installed package has it), and
the console script is used when it is installed beside the interpreter.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import pytest

BASH_ORIGINAL_GET_SIZE_MS = 3.0  # shared/spec/bash-original.md, cold process on the reference machine
TARGET_RATIO = 1.6
ROUNDS = 30

# The original's get_inbox_size, as a cold bash process.
BASH_GET_SIZE = (
    'inbox="$MESSAGE_BASE_DIR/$1/inbox"; [[ -d "$inbox" ]] || { echo 0; exit 0; }; '
    'files=("$inbox"/*.json); if [[ -f "${files[0]}" ]]; then echo "${#files[@]}"; else echo 0; fi'
)

HOT = {
    "get-size": ["get-size", "bob"],
    "check-capacity": ["check-capacity", "bob"],
    "get-utilization": ["get-utilization", "bob"],
    "bus count": ["bus", "count", "bob"],
    "bus send": ["bus", "send", "alice", "bob", "task", '{"job":1}'],
    "send-backpressure": ["send-backpressure", "alice", "bob", "task", '{"job":2}'],
}
CLICK = {  # for contrast: the paths that load click
    "get-size --help": ["get-size", "--help"],
    "get-stats": ["get-stats"],
}


def cfn_argv() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "cfn-fast")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "cfn_fast"]


class Lab:
    """A private base folder with alice and bob (bob holding 100 messages), and
    the environment every timed process gets."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="cfn-bench-startup-")
        env = dict(os.environ)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(
            PYTHONPYCACHEPREFIX=os.path.join(self.root, "pycache"),
            MESSAGE_BASE_DIR=os.path.join(self.root, "messages"),
            METRICS_FILE=os.path.join(self.root, "metrics.jsonl"),
            ALERT_LOG_FILE=os.path.join(self.root, "alerts.jsonl"),
            MAX_INBOX_SIZE="1000000",  # the sends never fill it, however many rounds
        )
        self.env = env
        for agent in ("alice", "bob"):
            self.run([*cfn_argv(), "bus", "init", agent])
        self.run([*cfn_argv(), "bus", "send-batch", "alice", "bob", "seed"],
                 input="".join(f"{i}\n" for i in range(100)))

    def run(self, argv: list[str], input: str | None = None) -> None:
        r = subprocess.run(argv, env=self.env, input=input, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{argv} exited {r.returncode}: {r.stderr}")

    def once(self, argv: list[str]) -> float:
        t0 = time.perf_counter()
        subprocess.run(argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        return time.perf_counter() - t0

    def median_ms(self, argv: list[str], rounds: int) -> float:
        self.once(argv)  # warm the bytecode cache and the page cache
        return statistics.median(self.once(argv) for _ in range(rounds)) * 1000

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


BARE = [sys.executable, "-c", "pass"]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab()
    yield lab
    lab.close()


def _bench(benchmark, record, lab: Lab, name: str, argv: list[str]) -> None:
    """Times the command with pytest-benchmark; before each round, in the
    untimed setup, one `python -c pass` is timed too, so the ratio compares
    runs interleaved on the same (shared, busy) machine."""
    full = [*cfn_argv(), *argv]
    lab.once(full)
    if getattr(benchmark, "disabled", False):  # a smoke run: the command works, nothing is timed
        benchmark(lab.once, full)
        return
    bare: list[float] = []
    benchmark.pedantic(lab.once, args=(full,), setup=lambda: bare.append(lab.once(BARE)) and None,
                       rounds=ROUNDS, iterations=1, warmup_rounds=2)
    base_ms = statistics.median(bare) * 1000
    median_ms = benchmark.stats.stats.median * 1000
    record(benchmark, f"startup.{name}", entry=os.path.basename(full[0]),
           python_c_pass_ms=round(base_ms, 2), median_ms=round(median_ms, 2),
           ratio_vs_python=round(median_ms / base_ms, 3), target_ratio=TARGET_RATIO,
           bash_original_get_size_ms=BASH_ORIGINAL_GET_SIZE_MS)


@pytest.mark.parametrize("name", list(HOT))
def test_hot_command_startup(benchmark, record, lab, name):
    _bench(benchmark, record, lab, name, HOT[name])


@pytest.mark.parametrize("name", list(CLICK))
def test_click_command_startup(benchmark, record, lab, name):
    _bench(benchmark, record, lab, name, CLICK[name])


def test_bare_interpreter(benchmark, record, lab):
    benchmark.pedantic(lab.once, args=(BARE,), rounds=ROUNDS, iterations=1, warmup_rounds=2)
    record(benchmark, "startup.python")


def test_bash_glob_count(benchmark, record, lab):
    """The original's get_inbox_size logic in a cold bash, on this machine."""
    benchmark.pedantic(lab.once, args=(["bash", "-c", BASH_GET_SIZE, "bash", "bob"],), rounds=ROUNDS,
                       iterations=1, warmup_rounds=2)
    record(benchmark, "startup.bash", bash_original_get_size_ms=BASH_ORIGINAL_GET_SIZE_MS)


def table(rounds: int = ROUNDS, out: Callable[[str], None] = print) -> None:
    """The same figures as a plain table; each command's runs alternate with
    `python -c pass` runs, as in the pytest-benchmark run."""
    lab = Lab()
    try:
        out(f"entry: {' '.join(cfn_argv())}   rounds: {rounds}   medians of cold processes")
        for name, argv in {**HOT, **CLICK}.items():
            full = [*cfn_argv(), *argv]
            lab.once(full)
            bare, cmd = [], []
            for _ in range(rounds):
                bare.append(lab.once(BARE))
                cmd.append(lab.once(full))
            b, c = statistics.median(bare) * 1000, statistics.median(cmd) * 1000
            verdict = "" if name in CLICK else ("   met" if c / b <= TARGET_RATIO else "   over the 1.6x target")
            out(f"{'cfn-fast ' + name:<28}{c:8.1f} ms   python -c pass {b:5.1f} ms   {c / b:.2f}x{verdict}")
        bash = lab.median_ms(["bash", "-c", BASH_GET_SIZE, "bash", "bob"], rounds)
        out(f"{'bash get-size (here)':<28}{bash:8.1f} ms")
        out(f"{'bash original (spec)':<28}{BASH_ORIGINAL_GET_SIZE_MS:8.1f} ms   reference machine")
    finally:
        lab.close()


if __name__ == "__main__":
    table(int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS)
