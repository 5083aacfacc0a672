"""Warnings that point at the user's line, not at the library's.

A fixed ``stacklevel`` names the right frame for one call path only: the same warning
raised under ``BilevelProblem.step``, ``problem.hypergradient`` or a calculator called
directly sits at a different depth, and a wrong level shows a line inside ``bilevel`` (or
the warning filter's "once per location" keys on it). :func:`warn_user` walks up to the
first frame outside the library and the packages its calls pass through (what Python
3.12's ``skip_file_prefixes`` does, for 3.11).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep

#: packages between the user's line and the library's (a model's ``__call__``, a data
#: loader's workers, ``higher``'s patched forwards, a ``with`` block's exit, an import)
_PASSED_THROUGH = ("torch", "higher")


def _internal_prefixes() -> tuple[str, ...]:
    """Where the frames to pass over come from (a package not imported has none)."""
    prefixes = [_PACKAGE, contextlib.__file__, "<frozen importlib"]
    for name in _PASSED_THROUGH:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path is not None:
            prefixes.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return tuple(prefixes)


def _path(filename: str) -> str:
    return filename if filename.startswith("<") else os.path.abspath(filename)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` at the first frame outside ``bilevel`` (and torch,
    higher, contextlib): the user's line; where every frame is internal, the outermost."""
    internal = _internal_prefixes()
    frame = sys._getframe(1)  # the library's line that warns
    level = 2  # (stacklevel 1 would name this function's own line)
    while frame.f_back is not None and _path(frame.f_code.co_filename).startswith(internal):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
