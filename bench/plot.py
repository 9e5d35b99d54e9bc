"""Turns a pytest-benchmark JSON file into the plots and the ratio table of
bench/README.md (diskcache's tests/plot.py, in spirit).

    pytest bench/ --benchmark-only --benchmark-json=/tmp/bench.json
    python bench/plot.py /tmp/bench.json            # writes bench/figures/curves.png
    python bench/plot.py /tmp/bench.json --table    # also prints the Markdown table
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from targets import SENDERS, SIZES, SYSTEMS, table  # noqa: E402


def load(path: Path) -> tuple[dict[str, float], dict[str, Any], list[dict[str, Any]]]:
    data = json.loads(path.read_text())
    values: dict[str, float] = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        values.update({k: float(v) for k, v in info.get("values", {}).items()})
    return values, data.get("machine_info", {}), data["benchmarks"]


def _series(values: dict[str, float], prefix: str, xs: tuple[int, ...], scale: float = 1.0) -> tuple[list, list]:
    pts = [(x, values[f"{prefix}@{x}"] * scale) for x in xs if f"{prefix}@{x}" in values]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(values: dict[str, float], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    axes = [grid[0][0], grid[0][1], grid[1][1], grid[1][0]]
    ax = axes[0]
    for prefix, label, style in (("send.floor", "plain os floor", "k--"),
                                 ("send.cfn", "send_message", "C0-o"),
                                 ("send_bp.cfn", "send_with_backpressure (metrics on)", "C1-s")):
        x, y = _series(values, prefix, SIZES, 1e6)
        if x:
            ax.plot(x, y, style, label=label)
    ax.set_xscale("log")
    ax.set_ylim(bottom=0, top=max([1.0] + [line.get_ydata().max() for line in ax.get_lines()]) * 1.2)
    ax.set_xlabel("messages already in the inbox")
    ax.set_ylabel("median per send (us)")
    ax.set_title("send, 1 KiB payload")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    for prefix, label, style in (("scan.listdir", "len(os.listdir(inbox))", "k--"),
                                 ("scan.reconcile", "reconcile(force=False), folder changed", "C0-o"),
                                 ("scan.reconcile_unchanged", "reconcile(force=False), unchanged", "C0:"),
                                 ("scan.count", "message_count (scan)", "C2-^"),
                                 ("size.cfn", "get_inbox_size (counter)", "C1-s")):
        x, y = _series(values, prefix, SIZES, 1e6)
        if x:
            ax.plot(x, y, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("messages in the inbox")
    ax.set_ylabel("median per call (us)")
    ax.set_title("counting an inbox")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[2]
    for i, name in enumerate(SYSTEMS):
        x, y = _series(values, f"tput.{name}", SENDERS)
        if x:
            ax.plot(x, y, "-o" if name == "cfn-fast" else "--.", color=f"C{i}", label=name,
                    linewidth=2.5 if name == "cfn-fast" else 1.2)
    ax.set_yscale("log")
    ax.set_xticks(list(SENDERS))
    ax.set_xlabel("sender processes (+1 consumer)")
    ax.set_ylabel("messages / s (median)")
    ax.set_title("end-to-end throughput, capacity 1,000, 1 KiB")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[3]
    for prefix, label, style in (("consume.floor", "plain os: listdir, sort, rename, read, unlink", "k--"),
                                 ("consume.floor_cached", "plain os, listing kept between batches", "k:"),
                                 ("consume.cfn", "consume_messages(agent, 10)", "C0-o")):
        x, y = _series(values, prefix, SIZES, 1e6 / 10)
        if x:
            ax.plot(x, y, style, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("messages in the inbox")
    ax.set_ylabel("median per message taken (us)")
    ax.set_title("taking the oldest 10")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def machine_line(info: dict[str, Any]) -> str:
    cpu = info.get("cpu", {})
    return (f"{cpu.get('brand_raw', info.get('processor', '?'))}, {cpu.get('count', '?')} CPUs, "
            f"{info.get('system', '')} {info.get('release', '')}, "
            f"{info.get('python_implementation', 'Python')} {info.get('python_version', '')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, help="file written by --benchmark-json")
    ap.add_argument("--out", type=Path, default=HERE / "figures" / "curves.png")
    ap.add_argument("--table", action="store_true", help="print the ratio table as Markdown")
    ap.add_argument("--figures", type=Path, help="also write the figures (key -> value) as a small JSON file")
    args = ap.parse_args(argv)
    values, machine, benches = load(args.json)
    plot(values, args.out, machine_line(machine))
    if args.table:
        print("\n".join(table(values, markdown=True)))
    if args.figures:
        extra: dict[str, Any] = defaultdict(dict)
        for b in benches:
            info = b.get("extra_info", {})
            if any(k.startswith(("tput.", "resume.")) for k in info.get("values", {})):
                extra[b["name"]] = {k: v for k, v in info.items() if k not in ("ratios", "targets")}
        args.figures.write_text(json.dumps({"machine": machine_line(machine), "values": values,
                                            "details": extra}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
