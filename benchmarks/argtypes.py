"""Argparse types of the benchmarks' command lines: the examples' (``examples/_argtypes.py``:
counts, positive numbers, folders), and those only the benchmarks need.

A value out of range is refused by argparse, which names the flag, before any work starts.
Standard library only: the peers' workers (``worker.py``, ``method_families.py serve``) and
the JAX driver import this module in virtual environments without torch or bilevel.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.append(str(Path(__file__).resolve().parent.parent / "examples"))

from _argtypes import count, folder, nonnegative, nonnegative_int, positive

__all__ = [
    "count",
    "existing_file",
    "existing_folder",
    "folder",
    "json_object",
    "names",
    "nonnegative",
    "nonnegative_int",
    "positive",
]


def names(choices: Iterable[str]) -> Callable[[str], str]:
    """An argparse type: a comma-separated list of at least one of ``choices`` (empty items,
    as in ``a,,b`` or ``a,``, are dropped); the list is returned as a string, ``"a,b"``."""
    known = list(choices)

    def parse(text: str) -> str:
        chosen = [name for name in text.split(",") if name]
        unknown = [name for name in chosen if name not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(map(repr, unknown))}; choose among {', '.join(known)}"
            )
        if not chosen:
            raise argparse.ArgumentTypeError(f"must name at least one of {', '.join(known)}")
        return ",".join(chosen)

    return parse


def existing_file(text: str) -> Path:
    """An argparse type: the path of a file that exists (what the script reads)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no file {text!r}")
    return path


def existing_folder(text: str) -> Path:
    """An argparse type: the path of a folder that exists (what the script reads)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"no folder {text!r}")
    return path


def json_object(text: str) -> dict[str, Any]:
    """An argparse type: a JSON object, such as ``'{"method": "cg"}'``, returned as a dict."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"is not JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {text!r}")
    return value
