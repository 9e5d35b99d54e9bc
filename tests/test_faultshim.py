"""The fault-injection shim (tests/faults) itself, against plain os calls in a
child interpreter, and one demonstration against cfn-fast: a send whose link
into the inbox fails with ENOSPC leaves nothing half-written and no capacity
taken. Each test runs its snippet in a child with the shim preloaded; the child
prints one JSON line, which the test judges."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cfn_fast import MessageBus
from faults import FaultShim

PRELUDE = """
import ctypes, errno, json, os, sys, tempfile, threading
from faults_child import NAMES, arm, calls, disarm, failed, fault, watch

def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

d = os.environ["FAULT_DIR"]
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)

def touch(name):
    open(os.path.join(d, name), "w").close()
"""


def child(shim: FaultShim, tmp_path: Path, code: str, **kw: Any) -> Any:
    """Runs PRELUDE + code in a preloaded child; returns what it printed last, as JSON."""
    from textwrap import dedent
    r = shim.run(PRELUDE + dedent(code), env={"FAULT_DIR": str(tmp_path)}, check=True, **kw)
    return json.loads(r.stdout.splitlines()[-1])


def test_the_nth_call_fails_with_the_chosen_errno_and_the_others_pass(faultshim: FaultShim,
                                                                      tmp_path: Path) -> None:
    out = child(faultshim, tmp_path, """
        for i in range(5): touch(f"f{i}")
        arm("unlinkat", 3, "EIO")
        res = [attempt(lambda: os.unlink(f"f{i}", dir_fd=dfd)) for i in range(5)]
        print(json.dumps({"res": res, "calls": calls("unlinkat"), "failed": failed("unlinkat"),
                          "left": sorted(os.listdir(d))}))
    """)
    assert out["res"] == ["ok", "ok", "EIO", "ok", "ok"]
    assert (out["calls"], out["failed"]) == (5, 1)
    assert out["left"] == ["f2"]  # the failed call never reached the kernel


def test_nth_zero_fails_every_call_and_negative_nth_every_call_from_there(faultshim: FaultShim,
                                                                          tmp_path: Path) -> None:
    out = child(faultshim, tmp_path, """
        for i in range(3): touch(f"a{i}")
        arm("renameat", 0, "ENOSPC")
        every = [attempt(lambda: os.rename(f"a{i}", f"b{i}", src_dir_fd=dfd, dst_dir_fd=dfd)) for i in range(3)]
        arm("renameat", -2, "EXDEV")
        onward = [attempt(lambda: os.rename(f"a{i}", f"b{i}", src_dir_fd=dfd, dst_dir_fd=dfd)) for i in range(3)]
        print(json.dumps({"every": every, "onward": onward, "failed": failed("renameat"),
                          "left": sorted(os.listdir(d))}))
    """)
    assert out["every"] == ["ENOSPC"] * 3
    assert out["onward"] == ["ok", "EXDEV", "EXDEV"]
    assert out["failed"] == 2  # counts restart when a family is armed again
    assert out["left"] == ["a1", "a2", "b0"]


def test_every_family_fails_where_python_reaches_it(faultshim: FaultShim, tmp_path: Path) -> None:
    """Each family once: armed to fail its 1st call, the call raises that errno
    and the next one passes. Python reaches the *64 names (open64, openat64,
    pwrite64, pread64, ftruncate64, posix_fallocate64), counted in their family;
    renameat2, fallocate and getdents64 are called through ctypes."""
    out = child(faultshim, tmp_path, """
        libc = ctypes.CDLL(None, use_errno=True)
        def c_call(fn, *args):
            def go():
                if fn(*args) < 0:
                    e = ctypes.get_errno()
                    raise OSError(e, os.strerror(e))
            return go
        n = iter(range(10**6))
        def fresh():
            name = f"x{next(n)}"
            touch(name)
            return name
        fd = os.open(os.path.join(d, "data"), os.O_RDWR | os.O_CREAT)
        os.write(fd, b"0123456789")
        buf = ctypes.create_string_buffer(4096)
        ops = {
            "open": lambda: os.close(os.open(os.path.join(d, "data"), os.O_RDONLY)),
            "openat": lambda: os.close(os.open("data", os.O_RDONLY, dir_fd=dfd)),
            "unlink": lambda: os.unlink(os.path.join(d, fresh())),
            "unlinkat": lambda: os.unlink(fresh(), dir_fd=dfd),
            "rename": lambda: os.rename(os.path.join(d, fresh()), os.path.join(d, f"r{next(n)}")),
            "renameat": lambda: os.rename(fresh(), f"r{next(n)}", src_dir_fd=dfd, dst_dir_fd=dfd),
            "renameat2": lambda: c_call(libc.renameat2, dfd, fresh().encode(), dfd, f"r{next(n)}".encode(), 0)(),
            "link": lambda: os.link(os.path.join(d, "data"), os.path.join(d, f"l{next(n)}")),
            "linkat": lambda: os.link("data", f"l{next(n)}", src_dir_fd=dfd, dst_dir_fd=dfd),
            "mkdir": lambda: os.mkdir(os.path.join(d, f"d{next(n)}")),
            "mkdirat": lambda: os.mkdir(f"d{next(n)}", dir_fd=dfd),
            "write": lambda: os.write(fd, b"w"),
            "pwrite": lambda: os.pwrite(fd, b"p", 0),
            "read": lambda: os.read(fd, 1),
            "pread": lambda: os.pread(fd, 1, 0),
            "ftruncate": lambda: os.ftruncate(fd, 10),
            "fallocate": c_call(libc.fallocate, fd, 0, ctypes.c_long(0), ctypes.c_long(16)),
            "posix_fallocate": lambda: os.posix_fallocate(fd, 0, 16),
            "fsync": lambda: os.fsync(fd),
            "fdatasync": lambda: os.fdatasync(fd),
            "flock": lambda: __import__("fcntl").flock(fd, __import__("fcntl").LOCK_EX),
            "getdents64": c_call(libc.getdents64, dfd, buf, ctypes.c_size_t(4096)),
            "fchmod": lambda: os.fchmod(fd, 0o600),
            "fchown": lambda: os.fchown(fd, -1, -1),
        }
        res = {}
        for name, op in ops.items():
            arm(name, 1, "EDQUOT")
            res[name] = [attempt(op), attempt(op), calls(name), failed(name)]
            disarm(name)
        print(json.dumps({"res": res, "names": list(NAMES)}))
    """)
    assert sorted(out["res"]) == sorted(out["names"])  # the table covers every family
    for name, got in out["res"].items():
        assert got == ["EDQUOT", "ok", 2, 1], name


def test_the_path_filter_counts_only_matching_calls(faultshim: FaultShim, tmp_path: Path) -> None:
    (tmp_path / "sub-dir").mkdir()
    out = child(faultshim, tmp_path, """
        for n in ("drop-1", "keep-1", "drop-2", "keep-2"): touch(n)
        arm("unlinkat", 2, "EIO", path="keep-")
        names = [attempt(lambda: os.unlink(n, dir_fd=dfd)) for n in ("drop-1", "keep-1", "drop-2", "keep-2")]
        by_name = [names, calls("unlinkat"), failed("unlinkat")]

        # the argument is a bare name: the filter sees it joined to its folder's path
        sub = os.open(os.path.join(d, "sub-dir"), os.O_RDONLY)
        open(os.path.join(d, "sub-dir", "f"), "w").close()
        touch("f")
        arm("unlinkat", 1, "EIO", path="/sub-dir/")
        by_folder = [attempt(lambda: os.unlink("f", dir_fd=dfd)),
                     attempt(lambda: os.unlink("f", dir_fd=sub)), calls("unlinkat")]

        # a call on a descriptor matches on what /proc/self/fd names: a pipe never does
        r, w = os.pipe()
        fd = os.open(os.path.join(d, "data"), os.O_WRONLY | os.O_CREAT)
        arm("write", 0, "ENOSPC", path=d)
        by_fd = [attempt(lambda: os.write(w, b"x")), attempt(lambda: os.write(fd, b"x")),
                 attempt(lambda: os.write(w, b"x")), calls("write"), failed("write")]
        disarm()

        # linkat matches on either side: here only the new name matches
        arm("linkat", 1, "EMLINK", path="new-")
        by_link = [attempt(lambda: os.link("data", "old-x", src_dir_fd=dfd, dst_dir_fd=dfd)),
                   attempt(lambda: os.link("data", "new-x", src_dir_fd=dfd, dst_dir_fd=dfd))]
        disarm()
        print(json.dumps({"by_name": by_name, "by_folder": by_folder, "by_fd": by_fd, "by_link": by_link}))
    """)
    assert out["by_name"] == [["ok", "ok", "ok", "EIO"], 2, 1]
    assert out["by_folder"] == ["ok", "EIO", 1]
    assert out["by_fd"] == ["ok", "ENOSPC", "ok", 1, 1]
    assert out["by_link"] == ["ok", "EMLINK"]


def test_disarm_restores_and_counts_stay_readable_until_armed_again(faultshim: FaultShim,
                                                                     tmp_path: Path) -> None:
    out = child(faultshim, tmp_path, """
        fd = os.open(os.path.join(d, "data"), os.O_WRONLY | os.O_CREAT)
        arm("write", 0, "EIO", path=d)
        during = [attempt(lambda: os.write(fd, b"x")) for _ in range(2)]
        disarm()
        after = [attempt(lambda: os.write(fd, b"y")) for _ in range(3)]
        frozen = [calls("write"), failed("write")]
        with fault("write", nth=2, err="EFBIG", path=d) as f:
            inside = [attempt(lambda: os.write(fd, b"z")) for _ in range(3)]
            live = [f.calls, f.failed]
        os.write(fd, b"after the block")
        print(json.dumps({"during": during, "after": after, "frozen": frozen, "inside": inside,
                          "live": live, "final": [f.calls, f.failed],
                          "content": open(os.path.join(d, "data")).read()}))
    """)
    assert out["during"] == ["EIO", "EIO"]
    assert out["after"] == ["ok"] * 3
    assert out["frozen"] == [2, 2]
    assert out["inside"] == ["ok", "EFBIG", "ok"]
    assert out["live"] == [3, 1] and out["final"] == [3, 1]
    assert out["content"] == "yyyzzafter the block"  # failed writes wrote nothing


def test_bad_names_and_aliases(faultshim: FaultShim, tmp_path: Path) -> None:
    out = child(faultshim, tmp_path, """
        bad = []
        for args in [("unlinkatt", 1, "EIO"), ("unlinkat", 1, "ENOTANERRNO"), ("write", 1, "EIO", "x" * 300)]:
            try:
                arm(*args)
                bad.append("armed")
            except ValueError as e:
                bad.append(str(e)[:40])
        for f in (calls, failed, disarm):
            try:
                f("bogus")
                bad.append("ok")
            except ValueError:
                bad.append("ValueError")
        touch("data")
        arm("openat64", 1, "EMFILE")  # Python calls openat64; the family is openat
        alias = [attempt(lambda: os.close(os.open("data", os.O_RDONLY, dir_fd=dfd))), calls("openat")]
        disarm()
        print(json.dumps({"bad": bad, "alias": alias}))
    """)
    assert out["bad"][0].startswith("faultshim cannot arm 'unlinkatt'")
    assert out["bad"][1].startswith("unknown errno name")
    assert out["bad"][2].startswith("faultshim cannot arm 'write'")
    assert out["bad"][3:] == ["ValueError"] * 3
    assert out["alias"] == ["EMFILE", 1]


def test_threads_share_one_count_and_exactly_the_nth_call_fails(faultshim: FaultShim, tmp_path: Path) -> None:
    out = child(faultshim, tmp_path, """
        THREADS, EACH = 8, 250
        results = [[] for _ in range(THREADS)]
        stop = threading.Event()
        def writer(k):
            fd = os.open(os.path.join(d, f"w{k}"), os.O_WRONLY | os.O_CREAT)
            for _ in range(EACH):
                results[k].append(attempt(lambda: os.write(fd, b"x")))
            os.close(fd)
        def churn():  # re-arms another family all the while: the rule table is shared
            while not stop.is_set():
                arm("unlinkat", 1, "EIO", path="nothing-matches")
                disarm("unlinkat")
        arm("write", 777, "EIO", path=d)
        c = threading.Thread(target=churn)
        c.start()
        ts = [threading.Thread(target=writer, args=(k,)) for k in range(THREADS)]
        for t in ts: t.start()
        for t in ts: t.join()
        stop.set(); c.join()
        flat = [r for rs in results for r in rs]
        sizes = sum(os.path.getsize(os.path.join(d, f"w{k}")) for k in range(THREADS))
        print(json.dumps({"eio": flat.count("EIO"), "ok": flat.count("ok"), "calls": calls("write"),
                          "failed": failed("write"), "bytes": sizes}))
    """, timeout=120)
    assert out == {"eio": 1, "ok": 1999, "calls": 2000, "failed": 1, "bytes": 1999}


def test_nothing_is_counted_or_failed_unless_armed(faultshim: FaultShim, tmp_path: Path) -> None:
    out = child(faultshim, tmp_path, """
        import cfn_fast
        bus = cfn_fast.MessageBus(os.path.join(d, "bus"))
        bus.init_message_bus("bob")
        ids = [bus.send_message("alice", "bob", "t", {"i": i}) for i in range(20)]
        got = [m["msg_id"] for m in bus.consume_messages("bob")]
        touch("a"); os.rename(os.path.join(d, "a"), os.path.join(d, "b")); os.unlink(os.path.join(d, "b"))
        counts = {n: [calls(n), failed(n)] for n in NAMES}
        # a call let through leaves errno as it was, even when a filter made the shim look
        libc = ctypes.CDLL(None, use_errno=True)
        arm("write", 1, "EIO", path="nothing-matches")
        fd = os.open(os.path.join(d, "data"), os.O_WRONLY | os.O_CREAT)
        ctypes.set_errno(errno.ENOTTY)
        wrote = libc.write(fd, b"x", 1)
        print(json.dumps({"same": got == ids, "counts": counts, "wrote": wrote, "errno": ctypes.get_errno(),
                          "seen": calls("write")}))
    """)
    assert out["same"]
    assert set(map(tuple, out["counts"].values())) == {(0, 0)}
    assert (out["wrote"], out["seen"]) == (1, 0)
    assert out["errno"] == __import__("errno").ENOTTY


def test_cfn_faults_arms_rules_when_the_library_loads(faultshim: FaultShim, tmp_path: Path) -> None:
    out = child(faultshim, tmp_path, """
        for n in ("victim-1", "other", "victim-2"): touch(n)
        res = [attempt(lambda: os.unlink(n, dir_fd=dfd)) for n in ("victim-1", "other", "victim-2")]
        link = attempt(lambda: os.link("other-src", "x", src_dir_fd=dfd, dst_dir_fd=dfd))
        print(json.dumps({"res": res, "calls": calls("unlinkat"), "link": link}))
    """, faults="unlinkat:2:EROFS:victim-,linkat:1:28")
    assert out == {"res": ["ok", "ok", "EROFS"], "calls": 2, "link": "ENOSPC"}


@pytest.mark.parametrize("spec", ["unlinkat:x:EIO", "unlinkatt:1:EIO", "unlinkat:1:EBOGUS", "unlinkat:1"])
def test_a_malformed_cfn_faults_stops_the_process(faultshim: FaultShim, spec: str) -> None:
    r = faultshim.run("print('ran')", faults=spec)
    assert r.returncode == 125 and r.stdout == ""
    assert "faultshim: CFN_FAULTS" in r.stderr and spec in r.stderr


def test_the_child_environment_appends_to_ld_preload(faultshim: FaultShim) -> None:
    sanitizers = "/usr/lib/libasan.so /usr/lib/libubsan.so"
    env = faultshim.env(env={"LD_PRELOAD": sanitizers, "PYTHONPATH": "/scratch"}, faults="write:1:EIO")
    assert env["LD_PRELOAD"] == f"{sanitizers} {faultshim.path}"  # the sanitizer runtimes stay first
    assert env["PYTHONPATH"].split(os.pathsep)[1:] == ["/scratch"]
    assert env["CFN_FAULTS"] == "write:1:EIO"
    again = faultshim.env(env={"LD_PRELOAD": env["LD_PRELOAD"]})
    assert again["LD_PRELOAD"] == env["LD_PRELOAD"] and "CFN_FAULTS" not in again


# ---- cfn-fast under injected failures --------------------------------------------------


def test_the_child_imports_the_cfn_fast_this_process_runs(faultshim: FaultShim) -> None:
    """Under .ci/sanitize that is the sanitized build, with its runtimes still preloaded first."""
    import cfn_fast._native
    r = faultshim.run("""
        import json, cfn_fast._native
        maps = open("/proc/self/maps").read()
        print(json.dumps([cfn_fast._native.__file__, "faultshim.so" in maps, "libasan" in maps]))
    """, check=True)
    native, shim, asan = json.loads(r.stdout)
    assert native == cfn_fast._native.__file__ and shim
    assert asan == ("libasan" in os.environ.get("LD_PRELOAD", ""))


def test_a_send_whose_link_into_the_inbox_fails_with_enospc_leaves_nothing(faultshim: FaultShim,
                                                                          tmp_path: Path, base: Path) -> None:
    """A full disk at the moment the new message is linked into the inbox: the
    send raises CfnOSError(ENOSPC), the inbox holds exactly what it held, and
    the place the send had reserved is given back."""
    out = child(faultshim, tmp_path, """
        from cfn_fast import CfnOSError, MessageBus
        bus = MessageBus()
        for a in ("alice", "bob"): bus.init_message_bus(a)
        bus.send_message("alice", "bob", "t", {"n": 0})
        inbox = os.path.join(os.environ["MESSAGE_BASE_DIR"], "bob", "inbox")
        before = {"size": bus.get_inbox_size("bob"), "files": sorted(os.listdir(inbox))}
        with fault("linkat", nth=1, err="ENOSPC", path="/bob/inbox/") as f:
            try:
                bus.send_message("alice", "bob", "t", {"n": 1})
                raised = None
            except CfnOSError as e:
                raised = {"errno": e.errno, "text": str(e)}
        after = {"size": bus.get_inbox_size("bob"), "files": sorted(os.listdir(inbox))}
        bus.recover("bob")  # a full rescan: the counter must agree with the folder
        rescanned = bus.get_inbox_size("bob")
        bus.send_message("alice", "bob", "t", {"n": 2})  # and the bus goes on
        print(json.dumps({"before": before, "after": after, "raised": raised, "failed": f.failed,
                          "rescanned": rescanned, "payloads": [m["payload"]["n"] for m in bus.receive_messages("bob")]}))
    """)
    assert out["failed"] == 1
    assert out["raised"] is not None, "the send did not fail"
    assert out["raised"]["errno"] == __import__("errno").ENOSPC
    assert "No space left on device" in out["raised"]["text"]
    assert out["after"] == out["before"]  # no new file, no temporary left, no place leaked
    assert out["before"]["size"] == 1 and out["rescanned"] == 1
    assert out["payloads"] == [0, 2]
    assert MessageBus().get_inbox_size("bob") == 2  # as a process without the shim sees it


def test_a_cli_send_armed_through_cfn_faults(faultshim: FaultShim, base: Path) -> None:
    MessageBus().init_message_bus("bob")
    r = faultshim.cli("bus", "send", "alice", "bob", "task", '{"x": 1}', faults="linkat:1:ENOSPC:/bob/inbox/")
    assert r.returncode == 1, r.stderr
    assert "No space left on device" in r.stderr and r.stdout == ""
    assert [p for p in os.listdir(base / "bob" / "inbox") if p != ".lock"] == []
    ok = faultshim.cli("bus", "send", "alice", "bob", "task", '{"x": 2}', check=True)
    assert MessageBus().get_inbox_size("bob") == 1 and ok.stdout.strip().startswith("msg-")
