"""Without the optional extras (prometheus_client, rich, matplotlib made
unimportable by a sitecustomize on PYTHONPATH, for every Python process the
test starts), the core, the CLI and the bash drop-in work, and each operator
command says in one line which extra to install (exit 2)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCKER = textwrap.dedent('''
    import sys

    class _NoExtras:
        """Imports of the optional extras fail, as if they were not installed."""
        blocked = {"prometheus_client", "rich", "matplotlib"}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoExtras())
''')

COMMANDS = [
    (("metrics", "serve"), "prom"),
    (("metrics", "serve", "--port", "0"), "prom"),
    (("metrics", "prom"), "prom"),
    (("metrics", "prom", "--out", "x.prom"), "prom"),
    (("metrics", "plot"), "plot"),
    (("top",), "top"),
    (("top", "--interval", "0.5"), "top"),
    (("demo", "--plot", "demo.png"), "plot"),
]


@pytest.fixture
def no_extras(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=60)


def test_the_blocker_blocks(no_extras, tmp_path):
    r = subprocess.run([sys.executable, "-c", "import rich"], capture_output=True, text=True, env=no_extras,
                       timeout=60)
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr


def test_each_operator_command_names_its_extra_in_one_line(no_extras, tmp_path):
    procs = {args: subprocess.Popen([sys.executable, "-m", "cfn_fast", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=no_extras, cwd=tmp_path)
             for args, _ in COMMANDS}
    for args, extra in COMMANDS:
        out, err = procs[args].communicate(timeout=120)
        assert procs[args].returncode == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (args, err)
        assert f"pip install 'cfn-fast[{extra}]'" in lines[0], lines[0]
        assert lines[0].startswith("cfn-fast " + args[0]), lines[0]
        assert out == "", (args, out)
    assert list(tmp_path.iterdir()) == [tmp_path / "site"]  # nothing written: no x.prom, no demo.png


def test_the_core_and_the_cli_work_without_the_extras(no_extras, tmp_path):
    for args in (("bus", "init", "alice"), ("bus", "init", "bob"), ("bus", "send", "alice", "bob", "t", "{}"),
                 ("send-backpressure", "alice", "bob", "t", "[1]"), ("get-stats",), ("metrics", "stats"),
                 ("bus", "recover"), ("top", "--help"), ("metrics", "serve", "--help")):
        r = run(no_extras, *args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)
    assert run(no_extras, "get-size", "bob", cwd=tmp_path).stdout == "2\n"
    code = ("import cfn_fast\n"
            "from cfn_fast import MessageBus, monitors, snapshot\n"
            "b = MessageBus(); assert b.get_inbox_size('bob') == 2\n"
            "assert len(snapshot.take(b).inboxes) == 2\n"
            "try:\n"
            "    import cfn_fast.exporter\n"
            "except ImportError as e:\n"
            "    from cfn_fast.extras import MissingExtra\n"
            "    assert isinstance(e, MissingExtra) and 'cfn-fast[prom]' in str(e), e\n"
            "else:\n"
            "    raise SystemExit('imported')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=no_extras, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_drop_in_works_without_the_extras(no_extras, tmp_path):
    exe = Path(sys.executable).parent / "cfn-fast"
    if not exe.exists() or shutil.which("bash") is None:
        pytest.skip("no cfn-fast program beside this Python")
    env = dict(no_extras, PATH=f"{exe.parent}{os.pathsep}{no_extras.get('PATH', '')}")
    script = ('set -euo pipefail; source <(cfn-fast shell); init_message_bus a; '
              'send_with_backpressure b a task \'{"job":1}\' >/dev/null; get_inbox_size a')
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "1"
