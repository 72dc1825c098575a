"""Package attributes that import their module on first use (PEP 562), for the stage packages.

``pipeline.config`` imports every stage's ``config`` module, which runs the stage package's
``__init__``: if that imported the stage itself, loading a config (or answering a typo in it)
would pull in torch, MONAI, pydicom and MLflow. Each stage package instead declares its public
names and where they live, and :func:`lazy_exports` resolves them when first read.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> None:
    """Give ``package`` the public names of ``exports`` (name -> defining module), loaded on first access.

    A public name that is also a submodule's name (``pipeline.ingest.audit``, the module, and
    ``audit``, the function) keeps meaning the exported object: the import system binds a loaded
    submodule on its package, which would otherwise shadow the export once anything imported the
    submodule. The submodule stays importable by its full name.
    """
    module = sys.modules[package]
    names = dict(exports)

    class _LazyPackage(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            source = names.get(name)
            if source is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            value = getattr(importlib.import_module(source), name)
            types.ModuleType.__setattr__(self, name, value)  # later look-ups skip this method
            return value

        def __setattr__(self, name: str, value: Any) -> None:
            if name in names and isinstance(value, types.ModuleType):
                return
            super().__setattr__(name, value)

        def __dir__(self) -> list[str]:
            return sorted(set(vars(self)) | set(names))

    module.__class__ = _LazyPackage
