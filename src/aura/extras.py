"""Packages only some paths need: missing, they fail with one line that says what to install.

A bare ImportError would exit 1 with a traceback, as if Aura had a bug, when all the user has to
do is install something. docs/architecture.md ("Dependencies and why") says which package is
core and which an extra, and why.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from aura.errors import ConfigError

# vaderSentiment is not a declared dependency: declaring it would pull in `requests`, which only
# its interactive __main__ demo imports. The Makefile installs it --no-deps.
VADER_INSTALL = "pip install --no-deps vaderSentiment"


def extra_install(extra: str) -> str:
    """The command that installs Aura's optional extra ``extra``."""
    return f"pip install 'aura[{extra}]'"


def require(module: str, needed_for: str, install: str) -> ModuleType:
    """``import module``, or a one-line ConfigError: ``needed_for`` needs it, ``install`` adds
    it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{needed_for} needs {module}: {install}") from None
