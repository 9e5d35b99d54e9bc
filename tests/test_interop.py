"""Interoperability with agents still running the bash original, both ways.

cfn-fast -> bash: messages cfn-fast writes are found, ordered and read by a
bash agent that follows the original's rules (glob *.json, grep the
timestamp and sequence, sort, cat), and its sequence files stay plain integers.

bash -> cfn-fast: messages the test writes in the original's format (its
multi-line layout and field order, ids msg-<secs>-<3 digits>, a leftover
.tmp file, the inbox's .lock, .sequences/<to> holding a plain integer) are
counted, received in order and consumed by cfn-fast, and its sequence numbers
carry on from the original's.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

FIELDS = ["version", "msg_id", "from", "to", "timestamp", "sequence", "type", "payload", "requires_ack"]


def cfn(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "cfn-fast-test-pycache")
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def ok(*args: str) -> str:
    r = cfn(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


# -- a bash agent that reads the way the original did ----------------------------------

BASH_RECEIVE = r'''
set -euo pipefail
inbox="$MESSAGE_BASE_DIR/$1/inbox"
count=$(find "$inbox" -maxdepth 1 -name "*.json" -type f | wc -l)
echo "$count" > "$2/count"
keys=$(mktemp)
for f in "$inbox"/*.json; do
    [[ -f "$f" ]] || continue
    ts=$(grep '"timestamp":' "$f" | head -n 1 | sed 's/.*"timestamp":\s*\([0-9]*\).*/\1/')
    seq=$(grep '"sequence":' "$f" | head -n 1 | sed 's/.*"sequence":\s*\([0-9]*\).*/\1/')
    echo "$ts:$seq:$(basename "$f")" >> "$keys"
done
echo "["
first=true
while IFS=: read -r ts seq name; do
    if [[ "$first" == true ]]; then first=false; else echo ","; fi
    cat "$inbox/$name"
done < <(sort -t: -k1,1n -k2,2n "$keys")
echo "]"
rm -f "$keys"
'''


def bash_receive(agent: str, workdir: Path) -> tuple[int, list[dict[str, Any]]]:
    r = subprocess.run(["bash", "-c", BASH_RECEIVE, "bash-agent", agent, str(workdir)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return int((workdir / "count").read_text()), json.loads(r.stdout)


def test_a_bash_agent_reads_what_cfn_fast_sent_in_order(base, workdir):
    ok("bus", "init", "alice")
    ok("bus", "init", "bob")
    sent = [ok("bus", "send", "alice", "bob", "task", json.dumps({"n": i})).strip() for i in range(5)]
    sent.append(ok("send-backpressure", "alice", "bob", "task", '"last"').strip())
    count, messages = bash_receive("bob", workdir)
    assert count == 6
    assert [m["msg_id"] for m in messages] == sent
    assert [m["payload"] for m in messages] == [{"n": i} for i in range(5)] + ["last"]
    for m in messages:
        assert list(m) == FIELDS
        assert m["msg_id"].startswith(f"msg-{m['timestamp']}-")
        assert (base / "bob" / "inbox" / f"{m['msg_id']}.json").is_file()
        assert m["requires_ack"] is False and m["from"] == "alice" and m["to"] == "bob"
    assert [m["sequence"] for m in messages] == [1, 2, 3, 4, 5, 6]
    assert (base / "alice" / ".sequences" / "bob").read_text().strip() == "6"


def test_a_bash_consumers_rm_is_seen_by_cfn_fast(base):
    ok("bus", "init", "alice")
    ok("bus", "init", "bob")
    for i in range(4):
        ok("bus", "send", "alice", "bob", "task", str(i))
    subprocess.run(["bash", "-c", f'rm -f "{base}/bob/inbox"/*.json'], check=True)
    assert ok("get-size", "bob") == "0\n"
    assert ok("bus", "count", "bob") == "0\n"
    assert ok("check-capacity", "bob") == ""


def test_a_payload_with_its_own_timestamp_key_keeps_the_bash_order(workdir):
    ok("bus", "init", "alice")
    ok("bus", "init", "bob")
    ok("bus", "send", "alice", "bob", "task", '{"timestamp": 9999999999}')
    ok("bus", "send", "alice", "bob", "task", '{"timestamp": 1}')
    _, messages = bash_receive("bob", workdir)
    assert [m["payload"]["timestamp"] for m in messages] == [9999999999, 1]


# -- the original's files, read by cfn-fast -------------------------------------------------

def original_message(msg_id: str, sender: str, to: str, ts: int, seq: int, payload: str) -> str:
    """A message exactly as the original's heredoc wrote it."""
    return (
        "{\n"
        '  "version": "1.1",\n'
        f'  "msg_id": "{msg_id}",\n'
        f'  "from": "{sender}",\n'
        f'  "to": "{to}",\n'
        f'  "timestamp": {ts},\n'
        f'  "sequence": {seq},\n'
        '  "type": "task",\n'
        f'  "payload": {payload},\n'
        '  "requires_ack": false\n'
        "}\n"
    )


@pytest.fixture
def bash_written(base: Path) -> list[str]:
    """alice's bash agent sent bob four messages (names not in time order),
    left a half-written .tmp file behind, and its sequence file says 4."""
    for agent in ("alice", "bob"):
        for box in ("inbox", "outbox"):
            (base / agent / box).mkdir(parents=True, exist_ok=True)
    inbox = base / "bob" / "inbox"
    (inbox / ".lock").touch()
    rows = [  # (id, timestamp, sequence): chronological order is the list's order
        ("msg-1700000000-917", 1700000000, 1),
        ("msg-1700000000-042", 1700000000, 2),
        ("msg-1700000001-500", 1700000001, 3),
        ("msg-1700000002-001", 1700000002, 4),
    ]
    for n, (mid, ts, seq) in enumerate(rows):
        payload = json.dumps({"step": n, "note": "from bash"})
        (inbox / f"{mid}.json").write_text(original_message(mid, "alice", "bob", ts, seq, payload))
    (inbox / "msg-1700000003-123.json.tmp").write_text('{\n  "version": "1.1",\n  "msg_id": "msg-17')
    seqdir = base / "alice" / ".sequences"
    seqdir.mkdir()
    (seqdir / "bob").write_text("4\n")
    (seqdir / "bob.lock").touch()
    return [r[0] for r in rows]


def test_cfn_fast_counts_the_originals_messages_and_not_the_leftovers(bash_written, monkeypatch):
    assert ok("bus", "count", "bob") == "4\n"
    assert ok("get-size", "bob") == "4\n"
    monkeypatch.setenv("MAX_INBOX_SIZE", "4")
    assert cfn("check-capacity", "bob").returncode == 1
    assert ok("get-utilization", "bob") == "100\n"


def test_cfn_fast_receives_the_originals_messages_in_time_then_sequence_order(bash_written):
    messages = json.loads(ok("bus", "receive", "bob"))
    assert [m["msg_id"] for m in messages] == bash_written
    assert [m["payload"]["step"] for m in messages] == [0, 1, 2, 3]
    assert all(list(m) == FIELDS for m in messages)


def test_cfn_fast_consumes_the_originals_messages_once(bash_written, base):
    assert [m["msg_id"] for m in json.loads(ok("bus", "consume", "bob"))] == bash_written
    assert json.loads(ok("bus", "consume", "bob")) == []
    assert list((base / "bob" / "inbox").glob("*.json")) == []


def test_cfn_fast_carries_on_the_originals_sequence(bash_written, base):
    msg_id = ok("bus", "send", "alice", "bob", "task", '{"from":"cfn-fast"}').strip()
    mine = json.loads((base / "bob" / "inbox" / f"{msg_id}.json").read_text())
    assert mine["sequence"] == 5
    assert (base / "alice" / ".sequences" / "bob").read_text().strip() == "5"
    order = [m["msg_id"] for m in json.loads(ok("bus", "receive", "bob"))]
    assert order == bash_written + [msg_id]  # a later timestamp sorts last
