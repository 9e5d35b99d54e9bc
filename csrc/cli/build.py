"""Builds the native ``cfn-fast`` program (csrc/cli/) at install time.

Build tooling only: setup.py loads this file and uses ``BuildNative`` as its
``build_scripts`` command, so ``pip install .``, a wheel and ``pip install -e .``
all put the program in the environment's bin folder as ``cfn-fast``. It is
compiled from the same csrc/ sources as the extension (ffi_build.SOURCES, with
ffi_build's flags: CFN_WERROR and CFN_SANITIZE apply to it too) plus csrc/cli/.

Nothing the program must agree with Python about is written twice: the
generated header (``cli_gen.h``, in the build folder) carries

* the settings table, from cfn_fast/config.py SETTINGS (names, kinds, defaults,
  bounds, the backoff names and the boolean words);
* the hot commands and their positional parameters, from cfn_fast/commands.py;
* the first line of each error class's docstring, by C error code, from
  cfn_fast/errors.py and the code table in cfn_fast/_core.py (what Python
  prints when the C text is empty);
* the bash drop-in, cfn_fast/shell.sh, which ``cfn-fast shell`` prints with
  its own path filled in;
* the interpreter this build ran under, for handing commands over to Python.

config.py, commands.py and errors.py are loaded from the source tree under a
bare package object, so cfn_fast/__init__.py never runs and nothing needs the
compiled module.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent          # csrc/cli
CSRC = HERE.parent                              # csrc
ROOT = CSRC.parent                              # the project
PKG = ROOT / "cfn_fast"
CLI_SOURCES = ["main.c", "settings.c", "pyfmt.c"]

# The commands the program serves itself, by the bash original's function name,
# with the positional parameters each C handler expects (commands.py order).
NATIVE_HANDLERS: dict[str, tuple[str, ...]] = {
    "get_inbox_size": ("agent",),
    "check_inbox_capacity": ("agent",),
    "get_inbox_utilization": ("agent",),
    "send_with_backpressure": ("sender", "recipient", "type", "payload"),
    "send_message": ("sender", "recipient", "type", "payload"),
    "message_count": ("agent", "box"),
}


def _load_ffi_build() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("cfn_fast_ffi_build", CSRC / "ffi_build.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_pure(*names: str) -> dict[str, types.ModuleType]:
    """cfn_fast.<name> for each name, imported from the source tree with a bare
    package object in place of cfn_fast/__init__.py; sys.modules is restored."""
    keys = ["cfn_fast", *(f"cfn_fast.{n}" for n in ("errors", "config", "commands", *names))]
    keys = list(dict.fromkeys(keys))
    saved = {k: sys.modules.get(k) for k in keys}
    had_native = "cfn_fast._native" in sys.modules
    pkg = types.ModuleType("cfn_fast")
    pkg.__path__ = [str(PKG)]  # type: ignore[attr-defined]
    sys.modules["cfn_fast"] = pkg
    for k in keys[1:]:
        sys.modules.pop(k, None)
    try:
        mods = {n: importlib.import_module(f"cfn_fast.{n}") for n in names}
        if "cfn_fast._native" in sys.modules and not had_native:
            raise RuntimeError("a module the native build reads imported the compiled module")
        return mods
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def c_string(data: bytes) -> str:
    """A C string literal holding exactly these bytes."""
    out = ['"']
    for i, b in enumerate(data):
        if b == 0x5C:
            out.append("\\\\")
        elif b == 0x22:
            out.append('\\"')
        elif b == 0x0A:
            out.append('\\n"\n    "' if i + 1 < len(data) else "\\n")
        elif 0x20 <= b < 0x7F and not (b == 0x3F and out[-1].endswith("?")):  # no trigraphs
            out.append(chr(b))
        else:
            out.append(f"\\{b:03o}")
    out.append('"')
    return "".join(out)


def _c_str(text: str) -> str:
    return c_string(text.encode("utf-8"))


# the kinds the native program parses; a kind of config.CHOICES (a word out
# of a list: backoff, priority, ...) is CLI_KIND_CHOICE with its words
KINDS = ("int", "float", "str", "path", "bool", "group", "url", "secret")


def _settings_table(config: types.ModuleType) -> list[str]:
    lines = ["/* cfn_fast/config.py CHOICES: the words of each kind that is a choice */"]
    for kind, words in config.CHOICES.items():
        lines.append(f"static const char *const CLI_CHOICES_{kind.upper()}[] = {{"
                     + ", ".join(_c_str(w) for w in words) + ", NULL};")
    lines += ["", "/* cfn_fast/config.py SETTINGS, in its order */", "enum {"]
    for i, s in enumerate(config.SETTINGS):
        lines.append(f"    CLI_SET_{s.attr.upper()} = {i},")
    lines += [f"    CLI_SET_COUNT = {len(config.SETTINGS)}", "};", ""]
    lines.append("static const struct cli_setting CLI_SETTINGS[CLI_SET_COUNT] = {")
    for s in config.SETTINGS:
        choice = s.kind in config.CHOICES
        if s.kind not in KINDS and not choice:
            raise RuntimeError(f"setting {s.env} has a kind the native program does not know: {s.kind!r}")
        d = s.default
        dflt_int = int(d) if isinstance(d, (bool, int)) else 0
        dflt_num = float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) else 0.0
        dflt_str = _c_str(d) if isinstance(d, str) else "NULL"
        in_base = ""
        if s.kind == "path" and d is None:
            in_base = os.path.basename(config.default_path(s.attr, "/"))
        lo, hi = s.minimum, s.maximum
        for v in (lo, hi):
            if v is not None and s.kind in ("int", "group") and not float(v).is_integer():
                raise RuntimeError(f"setting {s.env}: a whole-number setting with a fractional bound")
        lines.append(
            "    {"
            f"{_c_str(s.env)}, CLI_KIND_{'CHOICE' if choice else s.kind.upper()}, "
            f"{int(lo is not None)}, {int(hi is not None)}, "
            f"{int(lo) if lo is not None and s.kind in ('int', 'group') else 0}LL, "
            f"{int(hi) if hi is not None and s.kind in ('int', 'group') else 0}LL, "
            f"{float(lo) if lo is not None else 0.0!r}, {float(hi) if hi is not None else 0.0!r}, "
            f"{dflt_int}LL, {dflt_num!r}, {dflt_str}, {_c_str(in_base) if in_base else 'NULL'}, "
            f"{'CLI_CHOICES_' + s.kind.upper() if choice else 'NULL'}"
            "},")
    lines += ["};", ""]
    lines.append("static const char *const CLI_TRUE_WORDS[] = {"
                 + ", ".join(_c_str(w) for w in sorted(config._TRUE)) + ", NULL};")
    lines.append("static const char *const CLI_FALSE_WORDS[] = {"
                 + ", ".join(_c_str(w) for w in sorted(config._FALSE)) + ", NULL};")
    return lines


def _hot_table(commands: types.ModuleType) -> list[str]:
    lines = ["/* cfn_fast/commands.py: the hot commands a C handler serves, and their positional parameters */"]
    entries = []
    for cmd in commands.COMMANDS:
        if not cmd.hot or cmd.function not in NATIVE_HANDLERS:
            continue
        positional = [p for p in cmd.params if not p.option]
        if tuple(p.name for p in positional) != NATIVE_HANDLERS[cmd.function]:
            print(f"native cfn-fast: {' '.join(cmd.path)} changed its parameters; Python serves it",
                  file=sys.stderr)
            continue
        params = []
        for p in positional:
            choices = ", ".join(_c_str(c) for c in p.choices)
            default = _c_str(str(p.default)) if not p.required else "NULL"
            params.append(f"{{{_c_str(p.name)}, {_c_str(p.kind)}, {int(p.required)}, {default}, "
                          f"{{{choices + ', ' if choices else ''}NULL}}}}")
        path = list(cmd.path) + [""] * (2 - len(cmd.path))
        entries.append(
            f"    {{{{{_c_str(path[0])}, {_c_str(path[1]) if path[1] else 'NULL'}}}, {len(cmd.path)}, "
            f"{_c_str(cmd.function)}, {len(params)},\n     {{{', '.join(params)}}}}},")
    lines.append(f"enum {{ CLI_HOT_COUNT = {len(entries)} }};")
    lines.append("static const struct cli_hot CLI_HOT[CLI_HOT_COUNT ? CLI_HOT_COUNT : 1] = {")
    lines += entries or ["    {{NULL, NULL}, 0, NULL, 0, {{NULL, NULL, 0, NULL, {NULL}}}},"]
    lines += ["};"]
    lines.append("static const char *const CLI_GROUPS[] = {"
                 + ", ".join(_c_str(g) for g in commands.GROUPS) + ", NULL};")
    lines.append(f"#define CLI_PROG {_c_str(commands.PROG)}")
    lines.append(f"enum {{ CLI_EXIT_OK = {commands.EXIT_OK}, CLI_EXIT_NO = {commands.EXIT_NO}, "
                 f"CLI_EXIT_USAGE = {commands.EXIT_USAGE} }};")
    return lines


def _error_docs(errors: types.ModuleType, fastpath: types.ModuleType) -> list[str]:
    """C error code -> (class name, the first line of its docstring, exit code),
    from _core.py's _CODES (read as source: importing _core needs the compiled
    module), errors.py and output.exit_code_for; and every error class's exit code."""
    tree = ast.parse((PKG / "_core.py").read_text(encoding="utf-8"))
    codes: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_CODES" for t in targets):
                for k, v in zip(node.value.keys, node.value.values):
                    if isinstance(k, ast.Attribute) and isinstance(v, ast.Attribute):
                        codes[k.attr] = v.attr
    if not codes:
        raise RuntimeError("cfn_fast/_core.py has no _CODES table the native build can read")

    def exit_code(cls: type) -> int:
        return int(fastpath.exit_code_for(cls("x")))

    lines = ["/* C error code -> the Python error class, its docstring's first line, its exit code */",
             "static const struct cli_errdoc CLI_ERRDOCS[] = {"]
    for code, cls_name in codes.items():
        cls = getattr(errors, cls_name)
        doc = (cls.__doc__ or "").strip().splitlines()
        lines.append(f"    {{{code}, {_c_str(cls_name)}, {_c_str(doc[0] if doc else '')}, {exit_code(cls)}}},")
    lines += ["    {0, NULL, NULL, 0}", "};", "",
              "/* every error class of cfn_fast/errors.py and its exit code */",
              "static const struct cli_errdoc CLI_CLASSES[] = {"]
    for name in errors.__all__:
        cls = getattr(errors, name)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            lines.append(f"    {{0, {_c_str(name)}, NULL, {exit_code(cls)}}},")
    lines += ["    {0, NULL, NULL, 0}", "};"]
    return lines


def interpreter_name() -> str:
    """The versioned name of this interpreter in a bin folder: python3.11, python3.13t."""
    return f"python{sys.version_info[0]}.{sys.version_info[1]}{getattr(sys, 'abiflags', '')}"


def handover_args() -> list[str]:
    """How the program runs the Python CLI: python -m cfn_fast, without the
    current folder first on sys.path (-P), as the console script it replaces
    had it: a json.py or click.py where cfn-fast is run must not be imported.
    Before 3.11 (no -P) the same by hand."""
    if sys.version_info >= (3, 11):
        return ["-P", "-m", "cfn_fast"]
    return ["-c", "import sys\nif sys.path[:1] == ['']: del sys.path[0]\n"
                  "from cfn_fast.__main__ import main\nsys.exit(main())"]


def generate_header() -> str:
    mods = load_pure("config", "commands", "errors", "output")
    out = ["/* Generated by csrc/cli/build.py at build time; do not edit. */",
           "#ifndef CFN_CLI_GEN_H", "#define CFN_CLI_GEN_H", ""]
    out += _settings_table(mods["config"]) + [""]
    out += _hot_table(mods["commands"]) + [""]
    out += _error_docs(mods["errors"], mods["output"]) + [""]
    out.append("/* cfn_fast/shell.sh */")
    out.append("static const char CLI_SHELL_SH[] =\n    " + c_string((PKG / "shell.sh").read_bytes()) + ";")
    out.append("")
    out.append("/* The interpreter that built this program, its versioned name in a bin folder, and")
    out.append(" * what runs the Python CLI on it */")
    out.append(f"#define CLI_BUILD_PYTHON {c_string(os.fsencode(sys.executable))}")
    out.append(f"#define CLI_PYTHON_NAME {_c_str(interpreter_name())}")
    out.append("static const char *const CLI_HANDOVER[] = {"
               + ", ".join(_c_str(a) for a in handover_args()) + ", NULL};")
    out += ["", "#endif", ""]
    return "\n".join(out)


# Linked statically when the toolchain can (libc.a is there, no sanitizer): a
# dynamic start (the loader, relocations) is ~0.15 ms of a ~0.3 ms command.
LINK_MODES = (["-static-pie"], ["-static"], [])


def _runs(path: str) -> bool:
    """The linked program starts: `cfn-fast shell` is served natively, without Python."""
    import subprocess

    try:
        r = subprocess.run([path, "shell"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={"CFN_FAST_PYTHON": "/nonexistent"}, timeout=30)
    except OSError:
        return False
    return r.returncode == 0


def build_program(out_dir: str, temp_dir: str, verbose: bool = False) -> str:
    """Compiles and links the program into out_dir/cfn-fast; returns its path."""
    import setuptools  # noqa: F401  (provides distutils on every Python)
    from distutils.ccompiler import new_compiler
    from distutils.errors import LinkError
    from distutils.sysconfig import customize_compiler

    ffi_build = _load_ffi_build()
    cflags, ldflags = ffi_build.compile_args()
    gen_dir = Path(temp_dir) / "cfn-native-gen"
    gen_dir.mkdir(parents=True, exist_ok=True)
    header = generate_header()
    target = gen_dir / "cli_gen.h"
    if not target.exists() or target.read_text(encoding="utf-8") != header:
        target.write_text(header, encoding="utf-8")
    cc = new_compiler(verbose=int(verbose), force=1)
    customize_compiler(cc)
    sources = [str(CSRC / s) for s in ffi_build.SOURCES] + [str(HERE / s) for s in CLI_SOURCES]
    objects = cc.compile(sources, output_dir=str(Path(temp_dir) / "cfn-native-obj"),
                         include_dirs=[str(CSRC), str(HERE), str(gen_dir)],
                         extra_postargs=cflags)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "cfn-fast")
    sanitized = os.environ.get("CFN_SANITIZE") == "1"
    modes = [[]] if sanitized else LINK_MODES  # the sanitizer runtimes are shared libraries
    for i, mode in enumerate(modes):
        last = i == len(modes) - 1
        try:
            cc.link_executable(objects, "cfn-fast", output_dir=out_dir, extra_postargs=ldflags + mode)
        except LinkError:
            if last:
                raise
            continue
        if last or _runs(path):
            break
    return path


def build_scripts_command() -> Any:
    """A build_scripts command that builds the program instead of copying
    scripts: setup.py's ``scripts`` names its main source, so that every
    install path (install, bdist_wheel, editable) runs install_scripts."""
    import setuptools  # noqa: F401  (provides distutils on every Python)
    from distutils.command.build_scripts import build_scripts

    class BuildNative(build_scripts):  # type: ignore[misc]
        description = "build the native cfn-fast program (csrc/cli)"

        def run(self) -> None:
            build = self.get_finalized_command("build")
            temp = os.path.join(build.build_temp, "cfn-native")
            path = build_program(self.build_dir, temp, verbose=bool(self.verbose))
            self.outfiles = [path]

        def get_outputs(self) -> list[str]:
            return [os.path.join(self.build_dir, "cfn-fast")]

        def get_source_files(self) -> list[str]:
            return [str(p.relative_to(ROOT)) for p in sorted(HERE.glob("*.[ch]"))] + \
                   [str((HERE / "build.py").relative_to(ROOT))]

    return BuildNative


if __name__ == "__main__":
    # python csrc/cli/build.py OUT_DIR: the program alone (scratch builds, .ci/sanitize)
    out = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "build" / "native")
    print(build_program(out, os.path.join(out, ".tmp"), verbose=True))
