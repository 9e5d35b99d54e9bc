"""A hostile filesystem: symlinks planted where folders or messages should be,
bad message files, damaged state files, folders of other users. Nothing may
crash, follow a link, or read outside the base folder; bad files are moved
aside and reported; a bad state file is refused with a clear error."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cfn_fast import Config, MessageBus, StateFileError, UnsafePath

STATE = ".cfn-fast.shm"


def outside(tmp: Path) -> Path:
    d = tmp / "outside"
    d.mkdir(exist_ok=True)
    return d


def test_base_folder_that_is_a_symlink_is_refused(workdir: Path) -> None:
    real = outside(workdir)
    link = workdir / "linked-base"
    link.symlink_to(real)
    bus = MessageBus(str(link), Config.from_env())
    with pytest.raises(UnsafePath, match="symlink"):
        bus.init_message_bus("a")
    with pytest.raises(UnsafePath):
        bus.get_inbox_size("a")
    assert os.listdir(real) == []


def test_inbox_or_agent_folder_replaced_by_a_symlink(bus: MessageBus, base: Path, workdir: Path) -> None:
    target = outside(workdir)
    shutil.rmtree(base / "bob" / "inbox")
    (base / "bob" / "inbox").symlink_to(target)
    for call in (lambda: bus.send_message("alice", "bob", "t", "{}"),
                 lambda: bus.receive_messages("bob"),
                 lambda: bus.consume_messages("bob"),
                 lambda: bus.init_message_bus("bob"),
                 lambda: bus.reconcile("bob")):
        with pytest.raises(UnsafePath, match="symlink"):
            call()
    shutil.rmtree(base / "alice")
    (base / "alice").symlink_to(target)
    with pytest.raises(UnsafePath):
        bus.receive_messages("alice")
    bus.init_message_bus("carol")
    with pytest.raises(UnsafePath):
        bus.send_message("alice", "carol", "t", "{}")  # the sender's folder is a link: no sequence written there
    with pytest.raises(UnsafePath):
        bus.init_message_bus("alice")
    assert os.listdir(target) == []


def test_sequence_file_symlink_is_refused(bus: MessageBus, base: Path, workdir: Path) -> None:
    secret = outside(workdir) / "secret"
    secret.write_text("7\n")
    seqs = base / "alice" / ".sequences"
    seqs.mkdir()
    (seqs / "bob").symlink_to(secret)
    with pytest.raises(UnsafePath):
        bus.send_message("alice", "bob", "t", "{}")
    assert secret.read_text() == "7\n"
    assert bus.message_count("bob") == 0


def test_symlinked_and_invalid_messages_are_quarantined_and_reported(
        bus: MessageBus, base: Path, workdir: Path) -> None:
    secret = outside(workdir) / "secret.json"
    secret.write_text(json.dumps({"msg_id": "stolen", "timestamp": 1, "sequence": 1, "payload": "secret"}))
    inbox = base / "bob" / "inbox"
    good = bus.send_message("alice", "bob", "t", {"ok": 1})
    (inbox / "msg-1-001.json").symlink_to(secret)
    (inbox / "msg-1-002.json").write_text("{not json")
    (inbox / "msg-1-003.json").write_text("[1, 2]")  # JSON, but not a message object
    os.mkfifo(inbox / "msg-1-004.json")  # must not block a reader
    (inbox / "msg-1-005.json").mkdir()  # a folder is not a message
    got = bus.receive_messages("bob")
    assert [m["msg_id"] for m in got] == [good]
    assert "secret" not in json.dumps(got)
    quarantine = base / "bob" / ".quarantine"
    moved = sorted(n.split(".json")[0] for n in os.listdir(quarantine))
    assert moved == ["msg-1-001", "msg-1-002", "msg-1-003", "msg-1-004"]
    assert secret.exists() and json.loads(secret.read_text())["payload"] == "secret"
    alerts = [json.loads(line) for line in Path(os.environ["ALERT_LOG_FILE"]).read_text().splitlines()]
    assert any(a["alert"] == "message_quarantined" and a["metadata"]["count"] == 4 for a in alerts)
    assert [m["msg_id"] for m in bus.consume_messages("bob")] == [good]
    assert bus.get_inbox_size("bob") == 0


@pytest.mark.parametrize(
    ("damage", "words"),
    [
        (lambda p: os.truncate(p, 1000), "truncated or foreign"),
        (lambda p: p.write_bytes(os.urandom(os.path.getsize(p))), "bad magic"),
        # empty: refused too, never initialised again under processes that may use it
        (lambda p: p.write_bytes(b""), "has 0 bytes"),
    ],
    ids=["truncated", "foreign", "empty"],
)
def test_damaged_state_file_is_refused_with_a_clear_error(base: Path, make_bus, damage, words) -> None:
    make_bus().init_message_bus("bob")
    damage(base / STATE)
    bus = make_bus()
    with pytest.raises(StateFileError, match=words) as info:
        bus.get_inbox_size("bob")
    assert STATE in str(info.value) and "remove it" in str(info.value)


def test_state_file_of_another_layout_version_is_refused(base: Path, make_bus) -> None:
    make_bus().init_message_bus("bob")
    with open(base / STATE, "r+b") as f:
        f.seek(8)
        f.write((99).to_bytes(4, "little"))
    with pytest.raises(StateFileError, match="layout version 99"):
        make_bus().get_inbox_size("bob")


def test_state_file_that_is_a_symlink_is_refused(base: Path, make_bus, workdir: Path) -> None:
    base.mkdir(mode=0o700)
    (base / STATE).symlink_to(outside(workdir) / "x")
    with pytest.raises(UnsafePath, match="symlink"):
        make_bus().init_message_bus("bob")
    assert not (outside(workdir) / "x").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_base_folder_of_another_user_is_refused(base: Path, make_bus) -> None:
    base.mkdir(mode=0o700)
    os.chown(base, 65534, 65534)
    with pytest.raises(UnsafePath, match="belongs to uid 65534"):
        make_bus().init_message_bus("bob")
    assert os.listdir(base) == []


def test_a_hostile_inbox_never_crashes_the_process(base: Path, make_bus) -> None:
    """Run in a child so that a segfault shows up as a failure, not a dead test run."""
    make_bus().init_message_bus("bob")
    inbox = base / "bob" / "inbox"
    for i, blob in enumerate([b"", b"\x00" * 100, b"{" * 10000, b"[" * 300 + b"]" * 300, os.urandom(5000),
                              b'{"timestamp": 1e999, "sequence": -1}', b'{"a":"\xed\xa0\x80"}']):
        (inbox / f"msg-{i}-000.json").write_bytes(blob)
    code = ("import cfn_fast,sys; b=cfn_fast.MessageBus(sys.argv[1]);"
            "print(len(b.receive_messages('bob')), len(b.consume_messages('bob')))")
    out = subprocess.run([sys.executable, "-c", code, str(base)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]  # only the object with odd numbers is a valid message


def test_private_by_default(bus: MessageBus, base: Path) -> None:
    msg = bus.send_message("alice", "bob", "t", "{}")
    assert stat.S_IMODE((base / "bob" / "inbox" / f"{msg}.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    for d in ("bob", "bob/inbox", "bob/outbox", "alice/.sequences"):
        assert stat.S_IMODE((base / d).stat().st_mode) == 0o700
    assert stat.S_IMODE((base / "alice" / ".sequences" / "bob").stat().st_mode) == 0o600


def test_cfn_group_opens_folders_and_files_to_one_group(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gid = next((g for g in os.getgroups() if g != os.getegid()), None)
    if gid is None and os.geteuid() == 0:
        gid = 100
    if gid is None:
        pytest.skip("this user belongs to no second group")
    monkeypatch.setenv("CFN_GROUP", str(gid))
    bus = MessageBus()
    bus.init_message_bus("bob")
    msg = bus.send_message("alice", "bob", "t", "{}")
    for p, mode in ((base, 0o2770), (base / "bob", 0o2770), (base / "bob" / "inbox", 0o2770),
                    (base / STATE, 0o660), (base / "bob" / "inbox" / f"{msg}.json", 0o660),
                    (base / "bob" / "inbox" / ".lock", 0o660)):
        st = p.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (mode, gid), p
    bus.close()
