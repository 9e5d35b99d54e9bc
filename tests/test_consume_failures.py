"""Nothing is deleted before the caller holds it. A system call failing in the
middle of a consume, a claim or a send (injected: the kernel will not fail
them on demand) leaves every message that was not handed out in the inbox,
counted, and loses none that was."""
from __future__ import annotations

import json
from pathlib import Path
from textwrap import dedent
from typing import Any

import pytest

from cfn_fast import MessageBus
from faults import FaultShim

SETUP = """
import json
from faults_child import fault
from cfn_fast import MessageBus
bus = MessageBus()
bus.init_message_bus("bob")
for i in range(N): bus.send_message("alice", "bob", "t", {"i": i})
seen, errors = [], []
"""


def run(shim: FaultShim, code: str, n: int = 5) -> Any:
    """Sends n messages to bob in a child with the shim preloaded, runs code;
    returns the JSON the child printed last."""
    r = shim.run(SETUP.replace("N", str(n)) + dedent(code), check=True)
    return json.loads(r.stdout.splitlines()[-1])


def drain(bus: MessageBus) -> list[int]:
    return [m["payload"]["i"] for m in bus.consume_messages("bob")]


@pytest.mark.parametrize("nth", [1, 3, 5])
def test_a_consume_whose_unlink_fails_returns_the_rest_and_leaves_that_one_counted(
        faultshim: FaultShim, nth: int) -> None:
    out = run(faultshim, f"""
        with fault("unlinkat", nth={nth}, err="EIO", path=".json") as f:
            seen += [m["payload"]["i"] for m in bus.consume_messages("bob", 10)]
        print(json.dumps({{"seen": seen, "failed": f.failed, "size": bus.get_inbox_size("bob"),
                          "files": bus.message_count("bob")}}))
    """)
    assert out["failed"] == 1
    assert out["seen"] == [i for i in range(5) if i != nth - 1]  # oldest first, the failed one left out
    assert out["size"] == out["files"] == 1                       # it stays in the inbox, counted
    assert drain(MessageBus()) == [nth - 1]                       # and comes out next time


def test_a_consume_whose_every_unlink_fails_raises_and_loses_nothing(faultshim: FaultShim) -> None:
    out = run(faultshim, """
        with fault("unlinkat", nth=0, err="EIO", path=".json"):
            try:
                seen += bus.consume_messages("bob", 10)
            except OSError as e:
                errors.append(e.errno)
        print(json.dumps({"seen": seen, "errors": errors, "size": bus.get_inbox_size("bob")}))
    """)
    assert out == {"seen": [], "errors": [5], "size": 5}
    assert drain(MessageBus()) == [0, 1, 2, 3, 4]


def test_a_consume_whose_read_fails_hands_over_the_others(faultshim: FaultShim) -> None:
    out = run(faultshim, """
        with fault("read", nth=3, err="EIO", path=".json"):
            seen += [m["payload"]["i"] for m in bus.consume_messages("bob", 10)]
        print(json.dumps({"seen": seen, "size": bus.get_inbox_size("bob")}))
    """)
    assert out["seen"] == [0, 1, 3, 4] and out["size"] == 1
    assert drain(MessageBus()) == [2]


def test_a_cli_consume_whose_unlink_fails_prints_only_what_it_took(faultshim: FaultShim, base: Path) -> None:
    bus = MessageBus()
    bus.init_message_bus("bob")
    for i in range(4):
        bus.send_message("alice", "bob", "t", {"i": i})
    r = faultshim.cli("bus", "consume", "bob", faults="unlinkat:2:EIO:/inbox/msg-", check=True)
    assert [m["payload"]["i"] for m in json.loads(r.stdout)] == [0, 2, 3]
    assert drain(bus) == [1]


@pytest.mark.parametrize("nth", [1, 2])
def test_a_claim_whose_rename_fails_claims_the_rest(faultshim: FaultShim, nth: int) -> None:
    out = run(faultshim, f"""
        with fault("renameat", nth={nth}, err="EIO", path=".json"):
            got = bus.claim_messages("bob", 10)
        acked = bus.ack_messages("bob", got)
        print(json.dumps({{"claimed": [m["payload"]["i"] for m in got], "acked": acked,
                          "size": bus.get_inbox_size("bob")}}))
    """, n=3)
    assert out["claimed"] == [i for i in range(3) if i != nth - 1]
    assert out["acked"] == len(out["claimed"]) and out["size"] == 3 - out["acked"]
    assert sorted(drain(MessageBus()) + out["claimed"]) == [0, 1, 2]


def test_an_ack_whose_unlink_fails_keeps_the_claim(faultshim: FaultShim) -> None:
    out = run(faultshim, """
        got = bus.claim_messages("bob", 3)
        with fault("unlinkat", nth=1, err="EIO", path=".json"):
            try:
                bus.ack_messages("bob", got[:1])
            except OSError as e:
                errors.append(e.errno)
        acked = bus.ack_messages("bob", got)
        print(json.dumps({"errors": errors, "acked": acked, "size": bus.get_inbox_size("bob")}))
    """, n=3)
    assert out == {"errors": [5], "acked": 3, "size": 0}


@pytest.mark.parametrize(("call", "err", "path"), [("write", "EIO", None), ("linkat", "ENOSPC", None),
                                                   ("pwrite", "EIO", None), ("openat", "EMFILE", "/bob/inbox")])
def test_a_send_whose_write_fails_leaves_nothing_half_written(faultshim: FaultShim, call: str, err: str,
                                                              path: str) -> None:
    """Nothing half-written, no place leaked, and no sequence number lost or
    used twice: the next send takes the number the failed one would have had.
    (Three sends first, so the failing one must reserve numbers in the file.)"""
    out = run(faultshim, f"""
        import os
        with fault("{call}", nth=1, err="{err}", path={path!r}) as f:
            try:
                bus.send_message("alice", "bob", "t", {{"i": 99}})
            except OSError as e:
                errors.append(e.errno)
        inbox = os.path.join(bus.base_dir, "bob", "inbox")
        names = sorted(n for n in os.listdir(inbox) if n != ".lock")
        print(json.dumps({{"errors": errors, "failed": f.failed, "files": len(names), "size": bus.get_inbox_size("bob"),
                          "next": bus.send_message("alice", "bob", "t", {{"i": 5}}).split("-")[2]}}))
    """, n=3)
    assert out["failed"] == 1 and len(out["errors"]) == 1
    assert out["files"] == out["size"] == 3  # no new file, no place leaked, no temp file
    assert int(out["next"]) == 4
