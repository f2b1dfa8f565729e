"""Names a package loads on first use: ``import eca_flax`` (and ``eca_flax.detection``) stay
cheap, importing no JAX, OpenCV or pycocotools until a name that needs them is used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def module_getattr(package: str, homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each of ``homes``' names from its
    module on first use and keeps it in the package."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(homes[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
