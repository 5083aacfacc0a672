"""Argparse types shared by the command lines of the examples and the benchmarks: a value
out of range is refused by argparse, which names the flag (``argument --steps: must be an
integer >= 1, got '0'``), before any work starts.

Not part of the library, standard library only: ``examples/_common.py`` re-exports these
types, and ``benchmarks/argtypes.py`` imports them (the benchmarks' workers run in other
virtual environments, without torch or bilevel).
"""

from __future__ import annotations

import argparse
import math


def count(text: str) -> int:
    """An argparse type: an integer >= 1 (steps, sizes, threads)."""
    return _integer(text, 1)


def two_or_more(text: str) -> int:
    """An argparse type: an integer >= 2 (a sample whose spread is read)."""
    return _integer(text, 2)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (warm-up steps, a first index, 0 for never)."""
    return _integer(text, 0)


def _integer(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be an integer >= {least}, got {text!r}")
    return value


def positive(text: str) -> float:
    """An argparse type: a finite number > 0 (step sizes, penalties, minutes)."""
    value = _finite(text, "> 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def nonnegative(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    value = _finite(text, ">= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _finite(text: str, bound: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):  # NaN compares false with every bound: refused here
        raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text!r}")
    return value


def folder(text: str) -> str:
    """An argparse type: a folder's path, not empty (``Path("")`` is the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must name a folder: an empty path would write into the current folder"
        )
    return text
