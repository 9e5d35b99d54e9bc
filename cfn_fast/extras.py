"""Optional dependencies: the operator's commands need packages the core does
not (``prom``: prometheus_client, ``top``: rich, ``plot``: matplotlib; ``ops``
installs all three). ``require`` imports one or says, in one line, which
extra brings it; the command line turns that into exit 2.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from cfn_fast.errors import ConfigError

# module -> the extra that installs it (pyproject.toml's optional-dependencies)
EXTRAS: dict[str, str] = {"prometheus_client": "prom", "rich": "top", "matplotlib": "plot"}


class MissingExtra(ConfigError, ImportError):
    """An optional dependency is not installed; the message names the extra
    that brings it. A ConfigError (the installation lacks a part), so the
    command line exits 2 with that one line."""


def require(module: str, extra: str) -> ModuleType:
    """Imports ``module`` or raises MissingExtra naming ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or module
        raise MissingExtra(f"needs the '{extra}' extra ({missing} is not installed): "
                           f"pip install 'cfn-fast[{extra}]'") from None


__all__ = ["EXTRAS", "MissingExtra", "require"]
