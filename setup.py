"""Two things are built from csrc/: the C extension, by cffi (see
csrc/ffi_build.py), and the native ``cfn-fast`` program, by csrc/cli/build.py
as the ``build_scripts`` step: ``scripts`` names the program's main source, so
every install (a wheel, ``pip install .``, ``pip install -e .``) builds it and
puts it in the environment's bin folder. Everything else about the package
lives in pyproject.toml."""
import importlib.util
import os

from setuptools import setup


def _native_build():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cli", "build.py")
    spec = importlib.util.spec_from_file_location("cfn_fast_native_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup(
    cffi_modules=["csrc/ffi_build.py:ffibuilder"],
    scripts=["csrc/cli/main.c"],
    cmdclass={"build_scripts": _native_build().build_scripts_command()},
)
