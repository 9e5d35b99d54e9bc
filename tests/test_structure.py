"""The package's shape, checked: imports run one way through the layers (no
cycle, even through imports inside functions), only the storage touches the
compiled core, every C function Python may call is declared once (the
header) and wrapped once (_core), and importing the package stays cheap."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cfn_fast"
HEADER = PKG.parent / "csrc" / "cfn_fast.h"

# Lower layers never import higher ones. A new module gets a place here.
LAYERS: dict[str, float] = {
    "errors": 0,
    "config": 1, "output": 1, "extras": 1, "logs": 1,
    "_native": 2, "_core": 3, "redis_scripts": 3,
    "storage": 4, "redis_storage": 4,
    "codec": 5, "fields": 5,
    "metrics": 6, "alerts": 6, "checks": 6.5,
    "bus": 7,
    "defaults": 8, "__init__": 8, "aio": 8,
    "lifecycle": 9,
    "ratelimit": 10, "overflow": 10,
    "telemetry": 11, "monitors": 11, "snapshot": 11,
    "demo": 12, "handlers": 12, "exporter": 12, "top": 12, "plot": 12, "progress": 12,
    "commands": 13,
    "_fastpath": 14, "cli": 14, "native_sent": 14,
    "__main__": 15,
}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(module: str) -> set[str]:
    """The cfn_fast modules a module imports at run time (anywhere in it,
    inside functions too; not those under `if TYPE_CHECKING:`)."""
    path = PKG / f"{module}.py"
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "cfn_fast" or a.name.startswith("cfn_fast."):
                    found.add(a.name.split(".")[1] if "." in a.name else "__init__")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cfn_fast":
            if node.module == "cfn_fast":
                for a in node.names:  # from cfn_fast import x: a submodule, or a name of __init__
                    found.add(a.name if (PKG / f"{a.name}.py").exists() else "__init__")
            else:
                found.add(node.module.split(".")[1])
    found.discard(module)
    return found


MODULES = sorted(p.stem for p in PKG.glob("*.py"))
GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) - set(LAYERS) == set()


def test_imports_run_one_way_through_the_layers() -> None:
    upward = [(m, dep) for m, deps in GRAPH.items() for dep in deps if LAYERS[dep] > LAYERS[m]]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for dep in sorted(GRAPH.get(m, ())):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(trail + [m, dep])}"
            if dep not in state and dep in GRAPH:
                visit(dep, trail + [m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [])


def test_only_the_storage_touches_the_compiled_core() -> None:
    assert sorted(m for m, deps in GRAPH.items() if "_core" in deps) == ["storage"]
    assert sorted(m for m, deps in GRAPH.items() if "_native" in deps) == ["_core"]
    for m in MODULES:
        if m != "storage":
            assert "._h(" not in (PKG / f"{m}.py").read_text(), f"{m} reaches into the storage's handle"


def _imports_package(module: str, package: str) -> bool:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == package for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
            return True
    return False


def test_only_the_redis_storage_touches_its_engine() -> None:
    assert [m for m in MODULES if _imports_package(m, "redis")] == ["redis_storage"]
    # and nothing imports it but the one place that picks a backend
    assert sorted(m for m, deps in GRAPH.items() if "redis_storage" in deps) == ["bus"]


def test_the_file_backend_needs_no_redis_client() -> None:
    code = ("import sys; sys.modules['redis'] = None; import cfn_fast; b = cfn_fast.MessageBus('/nonexistent/x'); "
            "print(b.get_inbox_size('a'), 'redis_storage' in ' '.join(sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["0", "False"]


def test_every_c_function_is_declared_once_and_wrapped_once() -> None:
    declared = re.findall(r"^[a-z][\w \*]*?\b(cfn_\w+)\(", HEADER.read_text(), re.M)
    assert len(declared) == len(set(declared)), "a function declared twice in cfn_fast.h"
    core = (PKG / "_core.py").read_text()
    unwrapped = [f for f in declared if f"lib.{f}" not in core]
    assert unwrapped == [], "declared in cfn_fast.h, never called from _core.py"
    for m in MODULES:
        if m != "_core":
            assert "lib.cfn_" not in (PKG / f"{m}.py").read_text(), f"{m} calls the C core directly"


def test_importing_the_package_loads_nothing_costly() -> None:
    code = ("import sys; before = set(sys.modules); import cfn_fast; "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                timeout=60).stdout.split())
    assert loaded & {"typing", "re", "json", "threading", "click", "cffi", "cfn_fast._native", "psutil"} == set()
    assert loaded <= {"cfn_fast", "cfn_fast.errors"}
