"""The command line's two entries, for tests that hold them to one behaviour.

``native``: the program csrc/cli/ builds, installed as ``cfn-fast`` beside the
interpreter (``$CFN_FAST_NATIVE`` names another build, as .ci/sanitize's).
``python``: ``python -m cfn_fast``, the Python path it hands everything else to.

``handover_stub(dir)`` makes an interpreter that only records how it was
called (exit 99): with ``CFN_FAST_PYTHON`` pointing at it, a test tells a
call the program served itself from one it handed to Python, and with which
arguments.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import pytest

ENTRIES = ("native", "python")
HANDED_OVER = 99  # the stub interpreter's exit code
ROOT = Path(__file__).resolve().parent.parent


def _native_build():
    spec = importlib.util.spec_from_file_location("cfn_fast_native_build", ROOT / "csrc" / "cli" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _native_build()  # csrc/cli/build.py: what the program was built from
HANDOVER = [os.fsencode(a) for a in BUILD.handover_args()]  # what comes before the arguments handed over


# Read once, at import: the conftest's isolated_env clears every CFN_* variable for each test.
_CHOSEN = os.environ.get("CFN_FAST_NATIVE")


def native_program() -> str:
    path = _CHOSEN or os.path.join(os.path.dirname(sys.executable), "cfn-fast")
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return path
    except OSError:
        pass
    pytest.fail(f"no native cfn-fast at {path}: `pip install .` (or -e .) builds it beside the interpreter; "
                "CFN_FAST_NATIVE may name another build")


def argv(entry: str) -> list[str]:
    return [native_program()] if entry == "native" else [sys.executable, "-m", "cfn_fast"]


def child_env(extra: Optional[Mapping[str, Union[str, bytes]]] = None) -> dict:
    """os.environ, with bytecode cached privately (a cold interpreter does not
    recompile the package at each call), plus ``extra`` (str or bytes values)."""
    env: dict = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "cfn-fast-test-pycache")
    if extra and any(isinstance(v, bytes) for v in extra.values()):
        env = {os.fsencode(k): os.fsencode(v) for k, v in env.items()}
        env.update({os.fsencode(k): os.fsencode(v) for k, v in extra.items()})
    elif extra:
        env.update(extra)
    return env


def run(entry: str, *args: Union[str, bytes], env: Optional[Mapping[str, Union[str, bytes]]] = None,
        input: Optional[bytes] = None, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess:
    """One cold process of the entry; bytes in, bytes out (stderr=STDOUT merges them)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([*argv(entry), *args], env=child_env(env), input=input, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


def handover_stub(where: Path) -> tuple[Path, Path]:
    """(interpreter, log): the interpreter writes its arguments to the log,
    NUL-separated, and exits 99."""
    log = where / "handover.log"
    stub = where / "python-stub"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\000" "$@" > "{log}"\nexit {HANDED_OVER}\n')
    stub.chmod(0o755)
    return stub, log


def handed_over(log: Path) -> Optional[list[bytes]]:
    """The arguments the stub got (and forgets them), or None when it was not called."""
    if not log.exists():
        return None
    args = log.read_bytes().split(b"\0")[:-1]
    log.unlink()
    return args


def normal(data: bytes) -> bytes:
    """Output with what differs from run to run (times, message id tails) blanked."""
    data = re.sub(rb"\[\d\d:\d\d:\d\d\]", b"[HH:MM:SS]", data)
    data = re.sub(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", b"<iso-time>", data)
    data = re.sub(rb"msg-\d+-(\d+)-[0-9a-f]{16}", rb"msg-<time>-\1-<hex>", data)
    data = re.sub(rb'"timestamp": ?\d+', b'"timestamp":<time>', data)
    data = re.sub(rb"\(\d+ ms\)", b"(<n> ms)", data)
    # a heavy sender's count is halved every 10 s: a run may cross that boundary
    data = re.sub(rb'"count":\d+}', b'"count":<n>}', data)
    return data


def tree(root: Path, skip: Sequence[str] = (".cfn-fast.shm",)) -> dict[str, bytes]:
    """Every file under root (normalized name -> normalized bytes), the state file aside."""
    out: dict[str, bytes] = {}
    if not root.exists():
        return out
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            if name in skip:
                continue
            p = Path(dirpath) / name
            rel = normal(os.fsencode(p.relative_to(root))).decode("utf-8", "surrogateescape")
            out[rel] = b"<link>" if p.is_symlink() else normal(p.read_bytes()) if p.is_file() else b"<other>"
    return out
