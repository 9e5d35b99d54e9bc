"""Builds cfn_fast._native (cffi, out-of-line API mode).

Build tooling only: setup.py wires it through ``cffi_modules``, so it never
ships in the wheel. The cdef is read from csrc/cfn_fast.h (preprocessor lines
dropped), so every declaration and constant Python sees is written once, in C.

Environment knobs, read at build time:
  CFN_WERROR=1    add -Werror (CI builds with it)
  CFN_SANITIZE=1  build with AddressSanitizer and UndefinedBehaviorSanitizer
"""
import os
import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["api.c", "bus.c", "consume.c", "flow.c", "json.c", "logfile.c", "metrics.c", "region.c", "scan.c", "send.c",
           "util.c"]


def read_cdef(header: pathlib.Path) -> str:
    lines = header.read_text().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def compile_args() -> tuple[list[str], list[str]]:
    cflags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"]
    ldflags: list[str] = []
    if os.environ.get("CFN_WERROR") == "1":
        cflags.append("-Werror")
    if os.environ.get("CFN_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        cflags = [f for f in cflags if f != "-O2"] + ["-O1", "-g"] + san
        ldflags += san
    return cflags, ldflags


ffibuilder = FFI()
ffibuilder.cdef(read_cdef(HERE / "cfn_fast.h"))
# The one declaration not in the header: the probe Python gives every handle
# (cfn_bus_set_probe), defined in cfn_fast/_core.py with @ffi.def_extern.
ffibuilder.cdef('extern "Python" int cfn_py_probe(void);')
_cflags, _ldflags = compile_args()
ffibuilder.set_source(
    "cfn_fast._native",
    '#include "cfn_fast.h"',
    sources=[os.path.relpath(HERE / s) for s in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    depends=[os.path.relpath(HERE / h) for h in ("cfn_fast.h", "internal.h")],
    extra_compile_args=_cflags,
    extra_link_args=_ldflags,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
