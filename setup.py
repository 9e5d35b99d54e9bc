"""The C extension is built by cffi from csrc/ (see csrc/ffi_build.py);
everything else about the package lives in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["csrc/ffi_build.py:ffibuilder"])
