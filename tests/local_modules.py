"""The scripts of benchmarks/ and examples/ imported as modules by the tests."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType


@contextlib.contextmanager
def local_modules(folder: Path, *names: str) -> Iterator[list[ModuleType]]:
    """``folder/<name>.py`` for each name, imported with ``folder`` first on the path, so that
    they import their own modules (benchmarks/problems.py, not tests/problems.py). Afterwards
    the path is as it was, the folder's modules are removed and those they shadowed put back.
    Other modules stay: torch imports some lazily (``torch._dynamo`` on a first optimizer
    step), and one imported again registers its operators again, which fails in a later
    test."""
    local = {path.stem for path in folder.glob("*.py")}
    shadowed = {name: sys.modules.pop(name) for name in local if name in sys.modules}
    path = list(sys.path)
    sys.path.insert(0, str(folder))
    try:
        yield [importlib.import_module(name) for name in names]
    finally:
        sys.path[:] = path  # (the scripts insert their folder themselves too)
        for name in local:
            sys.modules.pop(name, None)
        sys.modules.update(shadowed)
