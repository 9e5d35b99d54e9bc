"""The Prometheus exporter: what it serves is what the library reports.

Scrapes go over loopback with a real HTTP client to a real `cfn-fast metrics
serve` process, and are parsed with prometheus_client's own text parser;
another process sends between two scrapes, and the second scrape sees it
with no polling loop in between (the collector reads the shared state at
scrape time)."""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="the 'prom' extra is not installed")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cfn_fast import BackpressureTimeout, CircuitOpen, exporter, monitors, telemetry  # noqa: E402
from cfn_fast.storage import COUNTERS  # noqa: E402

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def parse(text: str) -> tuple[Samples, list[Any]]:
    families = list(text_string_to_metric_families(text))
    samples: Samples = {}
    for fam in families:
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"series served twice: {key}"
            samples[key] = s.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def by_agent(samples: Samples, name: str) -> dict[str, float]:
    return {dict(k[1])["agent"]: v for k, v in samples.items() if k[0] == name}


def library(bus: Any, agents: list[str]) -> dict[str, Any]:
    """What the library reports (read first: a size read may count an inbox,
    and a count moves the reconcile counter)."""
    sizes = {a: bus.get_inbox_size(a) for a in agents}
    return {"sizes": sizes, "capacities": {a: bus.get_inbox_capacity(a) for a in agents},
            "counters": telemetry.counters(bus)}


def check_against(samples: Samples, lib: dict[str, Any]) -> None:
    for a, size in lib["sizes"].items():
        cap = lib["capacities"][a]
        assert value(samples, "cfn_inbox_messages", agent=a) == size
        assert value(samples, "cfn_inbox_capacity", agent=a) == cap
        assert value(samples, "cfn_inbox_utilization_ratio", agent=a) == pytest.approx(size / cap)
    for name, v in lib["counters"].items():
        c = exporter.counter_name(name)
        assert value(samples, c.metric + "_total", **dict(c.labels)) == pytest.approx(max(v, 0) * c.scale), name


def test_the_exposition_holds_what_the_library_reports(bus):
    for i in range(3):
        bus.send_message("alice", "bob", "task", {"i": i})
    bus.consume_messages("bob", 1)
    monitors.apply_dynamic_rate_limit(bus=bus, load_per_cpu=0.9)
    lib = library(bus, ["alice", "bob"])
    samples, _ = parse(exporter.exposition(bus).decode())
    check_against(samples, lib)
    assert value(samples, "cfn_inboxes") == 2
    assert value(samples, "cfn_messages_queued") == 2
    assert value(samples, "cfn_rate_limit_tier", tier="high") == 1
    assert value(samples, "cfn_rate_limit_tier", tier="low") == 0
    assert value(samples, "cfn_rate_limit_batch_size") == 5
    assert value(samples, "cfn_rate_limit_wait_seconds") == pytest.approx(0.2)
    assert value(samples, "cfn_rate_limit_published") == 1
    assert value(samples, "cfn_system_load_per_cpu") == pytest.approx(0.9)


def test_the_exposition_reads_the_selected_backend(backend: str, make_bus):
    """On files, on one Redis server and on a Cluster (MESSAGE_BUS_URL): the
    scrape reads that backend's state, and sees another process's sends."""
    bus = make_bus()
    bus.init_message_bus("alice")
    bus.init_message_bus("bob")
    for i in range(3):
        bus.send_message("alice", "bob", "task", {"i": i})
    lib = library(bus, ["alice", "bob"])  # first: a size read may count an inbox
    samples, _ = parse(exporter.exposition(bus).decode())
    check_against(samples, lib)
    code = "import cfn_fast; [cfn_fast.send_message('alice', 'bob', 't', i) for i in range(4)]"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    samples, _ = parse(exporter.exposition(bus).decode())
    assert value(samples, "cfn_inbox_messages", agent="bob") == 7
    assert value(samples, "cfn_messages_sent_total") == 7


def test_every_shared_counter_is_exported_once_as_a_counter(bus):
    bus.send_message("alice", "bob", "task", 1)
    samples, families = parse(exporter.exposition(bus).decode())
    served = {(exporter.counter_name(n).metric + "_total", exporter.counter_name(n).labels) for n in COUNTERS}
    assert len(served) == len(COUNTERS)
    counters = {f.name for f in families if f.type == "counter"}
    for name in COUNTERS:
        assert exporter.counter_name(name).metric in counters


def test_names_help_and_types_follow_prometheus_conventions(bus):
    bus.send_message("alice", "bob", "task", 1)
    text = exporter.exposition(bus).decode()
    _, families = parse(text)
    assert families
    for fam in families:
        assert NAME.match(fam.name) and fam.name.startswith("cfn_"), fam.name
        assert fam.documentation, f"{fam.name} has no HELP"
        assert fam.type in ("gauge", "counter"), fam.name
        shown = fam.name + "_total" if fam.type == "counter" else fam.name
        assert f"# HELP {shown} " in text and f"# TYPE {shown} {fam.type}" in text
        for s in fam.samples:
            assert s.name == shown  # counters end in _total; no _created series
            assert all(NAME.match(k) for k in s.labels)


def test_the_agent_label_is_bounded_and_the_rest_summed_as_other(make_bus, monkeypatch):
    bus = make_bus(metrics_top_agents=3, max_inbox_size=20)
    sizes = {f"agent-{i:02d}": i for i in range(12)}
    for agent, n in sizes.items():
        bus.init_message_bus(agent)
        for _ in range(n):
            bus.send_message("x", agent, "t", 1)
    samples, _ = parse(exporter.exposition(bus).decode())
    msgs = by_agent(samples, "cfn_inbox_messages")
    assert set(msgs) == {"agent-11", "agent-10", "agent-09", "other"}
    assert msgs["other"] == sum(range(9))
    assert by_agent(samples, "cfn_inbox_capacity")["other"] == 9 * 20
    assert by_agent(samples, "cfn_inbox_utilization_ratio")["other"] == pytest.approx(sum(range(9)) / 180)
    assert value(samples, "cfn_inboxes") == 12
    assert value(samples, "cfn_messages_queued") == sum(sizes.values())
    # the setting is read from the environment too
    monkeypatch.setenv("METRICS_TOP_AGENTS", "0")
    from cfn_fast import MessageBus

    with MessageBus() as everyone:
        only, _ = parse(exporter.exposition(everyone).decode())
    assert by_agent(only, "cfn_inbox_messages") == {"other": sum(sizes.values())}


def test_an_agent_named_other_is_never_served_twice(make_bus):
    bus = make_bus(metrics_top_agents=2, max_inbox_size=10)
    for agent, n in (("other", 9), ("a", 5), ("b", 1), ("c", 0)):
        bus.init_message_bus(agent)
        for _ in range(n):
            bus.send_message("x", agent, "t", 1)
    samples, _ = parse(exporter.exposition(bus).decode())  # parse() refuses a series served twice
    assert by_agent(samples, "cfn_inbox_messages") == {"a": 5, "other": 10}
    # fewer inboxes than the bound: every one by name, "other" the agent itself
    wide, _ = parse(exporter.exposition(bus, top_agents=10).decode())
    assert by_agent(wide, "cfn_inbox_messages") == {"other": 9, "a": 5, "b": 1, "c": 0}


def test_no_base_folder_reads_as_an_empty_bus_and_creates_nothing(make_bus, base):
    bus = make_bus()
    samples, _ = parse(exporter.exposition(bus).decode())
    assert value(samples, "cfn_inboxes") == 0
    assert value(samples, "cfn_messages_sent_total") == 0
    assert not base.exists()


def test_an_inbox_not_counted_yet_reads_as_empty_and_is_counted(make_bus):
    bus = make_bus()
    bus.init_message_bus("fresh")
    samples, _ = parse(exporter.exposition(bus).decode())
    assert value(samples, "cfn_inbox_messages", agent="fresh") == 0
    assert value(samples, "cfn_inboxes_uncounted") == 1
    bus.get_inbox_size("fresh")  # a size read counts it
    samples, _ = parse(exporter.exposition(bus).decode())
    assert value(samples, "cfn_inboxes_uncounted") == 0


def _cli(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True, timeout=60,
                          **kw)


def test_metrics_prom_prints_the_exposition_and_writes_a_textfile_atomically(bus, tmp_path, monkeypatch):
    bus.send_message("alice", "bob", "task", 1)
    lib = library(bus, ["alice", "bob"])
    r = _cli("metrics", "prom")
    assert r.returncode == 0, r.stderr
    printed, _ = parse(r.stdout)
    check_against(printed, lib)

    out = tmp_path / "cfn.prom"
    out.write_text("old\n")
    r = _cli("metrics", "prom", "--out", str(out))
    assert r.returncode == 0 and r.stdout == "", r.stderr
    written, _ = parse(out.read_text())
    assert value(written, "cfn_inbox_messages", agent="bob") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfn.prom"]  # no temporary file left
    assert out.stat().st_mode & 0o777 == 0o644 & ~_umask()

    # the temporary file is in the same folder, hidden from the textfile collector (*.prom)
    renames: list[tuple[str, str]] = []
    real = os.replace

    def spy(src: Any, dst: Any) -> None:
        renames.append((os.fspath(src), os.fspath(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    exporter.write_textfile(str(out), b"x 1\n")
    (src, dst), = renames
    assert os.path.dirname(src) == str(tmp_path) and dst == str(out)
    assert os.path.basename(src).startswith(".") and not src.endswith(".prom")
    assert out.read_bytes() == b"x 1\n"

    r = _cli("metrics", "prom", "--out", str(tmp_path / "no-such-folder" / "x.prom"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


class Server:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cfn_fast", "metrics", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = ""
        deadline = time.monotonic() + 30
        while "Serving" not in line:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, f"no server: {self.proc.stderr.read() if self.proc.stderr else ''}"
            ready, _, _ = select.select([self.proc.stderr], [], [], left)
            if ready:
                line = self.proc.stderr.readline() if self.proc.stderr else ""
        m = re.search(r"http://([\d.]+):(\d+)/metrics", line)
        assert m, line
        self.url = m.group(0)

    def scrape(self) -> tuple[Samples, str]:
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            assert resp.status == 200
            ctype = resp.headers["Content-Type"]
            return parse(resp.read().decode())[0], ctype

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            for f in (self.proc.stdout, self.proc.stderr):
                if f:
                    f.close()


def test_a_scrape_over_loopback_sees_what_another_process_sent(bus):
    for i in range(4):
        bus.send_message("alice", "bob", "task", {"i": i})
    server = Server("--addr", "127.0.0.1")
    try:
        lib = library(bus, ["alice", "bob"])
        first, ctype = server.scrape()
        assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
        check_against(first, lib)
        assert value(first, "cfn_inbox_messages", agent="bob") == 4

        r = _cli("bus", "send", "alice", "bob", "task", json.dumps({"from": "another process"}))
        assert r.returncode == 0, r.stderr
        lib = library(bus, ["alice", "bob"])
        second, _ = server.scrape()
        assert value(second, "cfn_inbox_messages", agent="bob") == 5 == lib["sizes"]["bob"]
        assert value(second, "cfn_messages_sent_total") == value(first, "cfn_messages_sent_total") + 1
        check_against(second, lib)

        bus.consume_messages("bob", 2)
        third, _ = server.scrape()
        assert value(third, "cfn_inbox_messages", agent="bob") == 3
        assert value(third, "cfn_messages_consumed_total") == value(second, "cfn_messages_consumed_total") + 2
    finally:
        code = server.stop()
    assert code == 0


def test_serve_refuses_a_port_in_use_in_one_line(bus):
    server = Server()
    try:
        port = server.url.rsplit(":", 1)[1].split("/")[0]
        r = _cli("metrics", "serve", "--port", port)
        assert r.returncode == 1
        assert len(r.stderr.strip().splitlines()) == 1 and port in r.stderr, r.stderr
        r = _cli("metrics", "serve", "--port", "70000")
        assert r.returncode == 2
    finally:
        server.stop()



def test_flow_control_is_exported(backend: str, make_bus):
    """An inbox's circuit, effective limit and sojourn per agent, and the
    breaker's counters: an open circuit is seen as open by the scrape, on
    files, one Redis server and a Cluster."""
    bus = make_bus(max_inbox_size=1, breaker_failures=1, backpressure_wait_ms=1, backpressure_max_retries=1,
                   backpressure_max_total_ms=10_000)
    bus.init_message_bus("alice")
    bus.init_message_bus("bob")
    bus.send_message("alice", "bob", "task", 1)
    samples, _ = parse(exporter.exposition(bus).decode())
    assert value(samples, "cfn_inbox_circuit_state", agent="bob") == 0
    assert value(samples, "cfn_inbox_effective_limit", agent="bob") == 1
    with pytest.raises(BackpressureTimeout):
        bus.send_with_backpressure("alice", "bob", "task", 2)  # stays full: trips the breaker
    with pytest.raises(CircuitOpen):
        bus.send_message("alice", "bob", "task", 3)
    samples, _ = parse(exporter.exposition(bus).decode())
    assert value(samples, "cfn_inbox_circuit_state", agent="bob") == 1
    assert value(samples, "cfn_inbox_circuit_state", agent="alice") == 0
    assert value(samples, "cfn_circuits_opened_total") == 1
    assert value(samples, "cfn_sends_refused_circuit_total") == 1
    bus.reset_circuit("bob")
    samples, _ = parse(exporter.exposition(bus).decode())
    assert value(samples, "cfn_inbox_circuit_state", agent="bob") == 0
    assert value(samples, "cfn_circuits_closed_total") == 1
