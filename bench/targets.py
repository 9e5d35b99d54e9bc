"""The rows of issue 6's table: what is measured against what, and the target.

One source of truth for bench/conftest.py (the end-of-session summary and the
ratios stored in each benchmark's ``extra_info``) and bench/plot.py (the
README table). Keys name what a benchmark recorded (see ``record`` in
conftest.py): timing keys hold a median in seconds, ``tput.*`` keys hold
messages per second.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

HEADLINE_SEND_SIZE = 100  # messages already in the inbox for the send rows (room left)
SIZES = (10, 100, 1_000, 10_000)  # growth curves of send and scan
SENDERS = (1, 2, 4, 8)  # throughput curve
SLOW_PEERS = ("persist-queue", "diskcache", "redis")
FAST_PEERS = ("posix_ipc", "mp.Queue")
SYSTEMS = ("cfn-fast",) + FAST_PEERS + SLOW_PEERS + ("plain files", "plain-os pair")
RESUME_INTERVAL_S = 0.100  # BACKPRESSURE_WAIT_MS=100


class Row(NamedTuple):
    name: str
    key: str  # cfn-fast's figure
    ref: str  # the reference's figure, measured in the same run
    target: Optional[float]  # None: shown for orientation, no target
    higher_is_better: bool = False  # throughput: ratio = cfn / peer, must be >= target

    def ratio(self, values: dict[str, float]) -> Optional[float]:
        a, b = values.get(self.key), values.get(self.ref)
        if a is None or b is None or b == 0:
            return None
        return a / b

    def verdict(self, ratio: Optional[float]) -> str:
        if ratio is None:
            return "not measured"
        if self.target is None:
            return "(orientation)"
        if self.higher_is_better:
            return "met" if ratio >= self.target else f"missed: {self.target / ratio:.2f}x short"
        return "met" if ratio <= self.target else f"missed by {ratio / self.target:.2f}x"

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        if self.higher_is_better:
            return f">= {self.target:g}x" if self.target >= 1 else f">= 1/{1 / self.target:g}"
        return f"<= {self.target:g}x"


def _rows() -> list[Row]:
    s = HEADLINE_SEND_SIZE
    rows = [
        Row(f"send_message 1 KiB (inbox holds {s})", f"send.cfn@{s}", f"send.floor@{s}", 1.2),
        Row(f"send_message 1 KiB, interleaved with its floor in blocks (inbox holds {s})", f"send.cfn_il@{s}",
            f"send.floor_il@{s}", 1.2),
        Row(f"send_with_backpressure, metrics on (inbox holds {s})", f"send_bp.cfn@{s}", f"send.floor@{s}", 1.5),
        Row(f"send_message with flow control at its defaults (inbox holds {s}; 1.01x before it)",
            f"send.cfn@{s}", f"send.floor@{s}", 1.11),
        Row("breaker check on an open circuit (cfn_send via cffi) vs get_inbox_size (<= 2x: ~2 us)",
            "circuit.check", "size.counter", 2.0),
        Row("send_message refused by an open circuit (CircuitOpen raised) vs get_inbox_size",
            "circuit.refused", "size.counter", None),
        Row("get_inbox_size, 1,000 msgs", "size.cfn@1000", "scan.listdir@1000", 0.01),
        Row("reconcile(force=False), 1,000 msgs, folder changed since its last scan", "scan.reconcile@1000",
            "scan.listdir@1000", 0.5),
        Row("reconcile(force=False), 1,000 msgs, folder unchanged", "scan.reconcile_unchanged@1000",
            "scan.listdir@1000", 0.5),
        Row("message_count, 1,000 msgs", "scan.count@1000", "scan.listdir@1000", 0.5),
        Row("consume_messages(10) from a 1,000-deep inbox", "consume.cfn@1000", "consume.floor@1000", None),
        Row("consume_messages(10) from a 10,000-deep inbox", "consume.cfn@10000", "consume.floor@10000", None),
        Row("consume_messages(10), 1,000 deep, vs a consumer caching its listing", "consume.cfn@1000",
            "consume.floor_cached@1000", None),
        Row("full reconcile, 100,000 msgs in 1,000 inboxes, every folder changed", "all.reconcile",
            "all.listdir", 0.5),
        Row("full reconcile, same, no folder changed", "all.reconcile_unchanged", "all.listdir", 0.5),
        Row("resume of a blocked sender vs the 100 ms interval", "resume.cfn-fast", "resume.interval", 0.001),
        Row("resume of a blocked sender vs POSIX mq_send", "resume.cfn-fast", "resume.posix_ipc", 2.0),
        Row("resume: the plain-os floor (take, pipe wake, write+rename) vs POSIX mq_send", "resume.plain-os",
            "resume.posix_ipc", None),
        Row("resume of a blocked sender vs the plain-os floor", "resume.cfn-fast", "resume.plain-os", None),
        Row("consume_messages: 1,000 in batches of 100 vs read + json.loads + unlink", "drain.cfn",
            "drain.floor_rw", 1.3),
        Row("consume_raw: 1,000 in batches of 100 vs read + unlink", "drain.cfn_raw", "drain.floor_rw_raw", 1.3),
        Row("consume_raw: 1,000 in batches of 100 vs read + unlink, interleaved round by round", "drain.cfn_raw_il",
            "drain.floor_rw_raw_il", 1.3),
        Row("throughput 4 senders vs 1 sender (no collapse)", "tput.cfn-fast@4", "tput.cfn-fast@1", 1.0, True),
    ]
    for n in (1, 4):
        for peer in SLOW_PEERS:
            rows.append(Row(f"throughput {n} sender(s) vs {peer}", f"tput.cfn-fast@{n}", f"tput.{peer}@{n}",
                            10, True))
        rows.append(Row(f"throughput {n} sender(s) vs POSIX queue", f"tput.cfn-fast@{n}", f"tput.posix_ipc@{n}",
                        0.2, True))
        rows.append(Row(f"throughput {n} sender(s) vs multiprocessing.Queue", f"tput.cfn-fast@{n}",
                        f"tput.mp.Queue@{n}", None, True))
        rows.append(Row(f"throughput {n} sender(s) vs plain files (the original's design)", f"tput.cfn-fast@{n}",
                        f"tput.plain files@{n}", None, True))
        rows.append(Row(f"throughput {n} sender(s) vs a plain-os pair doing the same file work",
                        f"tput.cfn-fast@{n}", f"tput.plain-os pair@{n}", 0.8 if n == 1 else None, True))
    return rows


ROWS: list[Row] = _rows()


def fmt_value(key: str, v: Optional[float]) -> str:
    if v is None:
        return "-"
    if key.startswith("tput."):
        return f"{v:,.0f} msg/s"
    if v >= 1:
        return f"{v:.2f} s"
    if v >= 1e-3:
        return f"{v * 1e3:.2f} ms"
    return f"{v * 1e6:.2f} us"


def table(values: dict[str, float], markdown: bool = False) -> list[str]:
    """The ratio table, as aligned text lines or as a Markdown table."""
    head = ("operation", "cfn-fast", "reference", "ratio", "target", "verdict")
    body = []
    for r in ROWS:
        q = r.ratio(values)
        body.append((r.name, fmt_value(r.key, values.get(r.key)), fmt_value(r.ref, values.get(r.ref)),
                     "-" if q is None else f"{q:.4g}x", r.target_text(), r.verdict(q)))
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return lines
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head] + body]
