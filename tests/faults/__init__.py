"""Failure injection for the C core's system calls.

The kernel will not fail ``unlinkat``, ``write`` or ``linkat`` on demand, so
``faultshim.c`` (beside this file) is an LD_PRELOAD library that interposes the
libc wrappers cfn_fast._native calls and fails the one a rule names, with the
errno the rule names, without calling through. Rules are armed at run time,
inside a child interpreter started with the shim preloaded, so the test process
itself is never affected.

A test::

    def test_consume_survives_a_failed_unlink(faultshim):
        r = faultshim.run('''
            from faults_child import fault
            from cfn_fast import MessageBus
            bus = MessageBus(); bus.init_message_bus("bob")
            for i in range(5): bus.send_message("alice", "bob", "t", {"i": i})
            with fault("unlinkat", nth=3, err="EIO", path=".json") as f:
                try: bus.consume_messages("bob", 10)
                except OSError as e: print("raised", e.errno)
            assert f.failed == 1, f
        ''')
        assert r.returncode == 0, r.stderr

Host side (this module, imported by tests and conftest):

- ``faultshim`` — session fixture: compiles the shim once with gcc into a temp
  folder (the tests using it skip, with the reason, when there is no gcc) and
  returns a ``FaultShim``.
- ``FaultShim.run(code, timeout=60, *, faults=None, env=None, check=False)`` ->
  ``subprocess.CompletedProcess[str]``: runs ``code`` (dedented) with
  ``python -c`` in a child whose LD_PRELOAD is the parent's with the shim
  appended (so it composes with .ci/sanitize's ASan/UBSan runtimes, which
  must stay first), whose PYTHONPATH starts with this folder (so
  ``import faults_child`` works) and which inherits everything else
  (MESSAGE_BASE_DIR and friends from the conftest). ``faults`` sets CFN_FAULTS
  for the child; ``check=True`` raises AssertionError with the child's output
  when it exits non-zero.
- ``FaultShim.cli(*args, faults=None, timeout=60, env=None, check=False)``:
  ``python -m cfn_fast *args`` the same way, for rules armed from the
  environment (``faults="linkat:1:ENOSPC:/inbox"``).
- ``FaultShim.env(faults=None, env=None) -> dict``: that environment, for your
  own ``subprocess`` call.
- ``run_with_faults(code, timeout=60, **kw)``: ``FaultShim.run`` without the
  fixture (builds on first use; skips the calling test without gcc).

Child side (``faults_child``, see its docstring): ``arm(name, nth=1,
err="EIO", path=None)``, ``disarm(name=None)``, ``calls(name)``,
``failed(name)``, the context managers ``fault(name, nth=1, err="EIO",
path=None)`` and ``watch(name, path=None)`` (count only), and ``NAMES``.

Rules: per call family (``unlinkat``, ``renameat``, ``renameat2``,
``linkat``, ``openat``, ``open``, ``write``, ``pwrite``, ``read``, ``pread``,
``mkdirat``, ``mkdir``, ``ftruncate``, ``fallocate``, ``posix_fallocate``,
``fsync``, ``fdatasync``, ``flock``, ``getdents64``, ``fchmod``, ``fchown``,
``unlink``, ``rename``, ``link``; the *64 and fortified twins count in their
family). ``nth`` counts matching calls from arming, 1-based; 0 fails every
call, -k the k-th and all after; ``err`` 0 only counts. ``path`` keeps only
calls whose path argument, resolved against its directory descriptor, or
whose descriptor's /proc/self/fd link, contains it. Nothing is counted before
arming; libc's calls to itself (fopen, opendir, ...) are never seen. A
fork()ed grandchild inherits the rules as they stand.
CFN_FAULTS="name:nth:ERR[:path],..." arms rules at load, counting from
process start: give those a path filter (the interpreter opens and reads a lot
while it starts).
"""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "faultshim.c"
CFLAGS = ["-std=c11", "-O2", "-g", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared", "-pthread"]

_built: Optional[Path] = None
_unavailable: Optional[str] = None


def build_shim() -> Path:
    """Compiles faultshim.c once per process into a temp folder; pytest.skip
    (with the reason) when there is no gcc. A compile error fails loudly."""
    global _built, _unavailable
    if _built is not None:
        return _built
    if _unavailable is not None:
        pytest.skip(_unavailable)
    if not sys.platform.startswith("linux"):
        _unavailable = "faultshim needs Linux (LD_PRELOAD, /proc/self/fd)"
        pytest.skip(_unavailable)
    gcc = shutil.which("gcc")
    if gcc is None:
        _unavailable = "gcc is not installed: cannot build the faultshim LD_PRELOAD library"
        pytest.skip(_unavailable)
    out = Path(tempfile.mkdtemp(prefix="cfn-faultshim-")) / "faultshim.so"
    atexit.register(shutil.rmtree, out.parent, True)
    # without the sanitizer runtimes .ci/sanitize preloads into this process: gcc needs none
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CFN_FAULTS")}
    r = subprocess.run([gcc, *CFLAGS, "-o", str(out), str(SOURCE), "-ldl"],
                       capture_output=True, text=True, timeout=120, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"building faultshim failed:\n{r.stderr}")
    _built = out
    return out


class FaultShim:
    """The built shim and ways to start children with it preloaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def env(self, faults: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
        """os.environ (plus ``env``) with the shim appended to LD_PRELOAD, this
        folder first on PYTHONPATH, and CFN_FAULTS set to ``faults`` (or unset)."""
        e = dict(os.environ)
        if env:
            e.update(env)
        preload = e.get("LD_PRELOAD", "").replace(":", " ").split()
        if str(self.path) not in preload:
            preload.append(str(self.path))  # after any sanitizer runtime, which must come first
        e["LD_PRELOAD"] = " ".join(preload)
        pypath = [p for p in e.get("PYTHONPATH", "").split(os.pathsep) if p]
        e["PYTHONPATH"] = os.pathsep.join([str(HERE), *pypath])
        if faults:
            e["CFN_FAULTS"] = faults
        else:
            e.pop("CFN_FAULTS", None)
        return e

    def _run(self, argv: list[str], timeout: float, faults: Optional[str], env: Optional[Mapping[str, str]],
             check: bool) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(argv, env=self.env(faults, env), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"child exited {r.returncode}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        return r

    def run(self, code: str, timeout: float = 60, *, faults: Optional[str] = None,
            env: Optional[Mapping[str, str]] = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Runs a Python snippet (dedented) in a child with the shim preloaded."""
        return self._run([sys.executable, "-c", textwrap.dedent(code)], timeout, faults, env, check)

    def cli(self, *args: str, faults: Optional[str] = None, timeout: float = 60,
            env: Optional[Mapping[str, str]] = None, check: bool = False) -> subprocess.CompletedProcess[str]:
        """Runs ``python -m cfn_fast *args`` with the shim preloaded."""
        return self._run([sys.executable, "-m", "cfn_fast", *args], timeout, faults, env, check)


def run_with_faults(code: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    """FaultShim.run without the fixture."""
    return FaultShim(build_shim()).run(code, timeout, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def faultshim() -> FaultShim:
    return FaultShim(build_shim())


__all__ = ["FaultShim", "build_shim", "faultshim", "run_with_faults"]
