"""Argument types and the parser every ``dcgraph`` command line shares (``dcgraph ...`` and
``python -m dcgraph.bench``): a wrong value is refused while parsing, before any work is done and
before any file is written, in one line (``dcgraph compile: error: ...``) with exit code 2."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

__all__ = ["OneLineParser", "existing_dir", "input_shape", "non_negative", "output_dir", "output_file",
           "positive", "positive_float"]


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the usage is in ``--help``); its
    sub-command parsers are of the same class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Any:
    """``kind(text)`` if it parses and is ``ok``, else argparse's error saying what was ``expected``."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def non_negative(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def validation_fraction(text: str) -> float:
    return _number(text, float, lambda v: 0.0 <= v < 0.5, "a fraction in [0, 0.5)")


def input_shape(text: str) -> str:
    """``N,C,H[,W...]``: positive integers (kept as text; :func:`dcgraph.models.parse_shape` reads it)."""
    from dcgraph.models import parse_shape

    try:
        parse_shape(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _writable_dir(directory: str, what: str) -> None:
    if not os.path.isdir(directory):
        raise argparse.ArgumentTypeError(f"{what}: no such directory {directory!r}")
    if not os.access(directory, os.W_OK):
        raise argparse.ArgumentTypeError(f"{what}: directory {directory!r} is not writable")


def output_file(*suffixes: str) -> Callable[[str], str]:
    """A file to write: its directory exists and is writable, it is not a directory, its name ends
    in one of ``suffixes`` (any name when none)."""

    def check(text: str) -> str:
        if suffixes and not text.endswith(suffixes):
            raise argparse.ArgumentTypeError(f"{text!r} must end in {' or '.join(suffixes)}")
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text!r} is a directory, not a file")
        _writable_dir(os.path.dirname(os.path.abspath(text)), repr(text))
        return text

    check.__name__ = "output file"  # what argparse calls it in "invalid ... value"
    return check


def output_dir(text: str) -> str:
    """A directory to write into: an existing one, or a new one whose parent exists."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory")
    if not os.path.isdir(text):
        _writable_dir(os.path.dirname(os.path.abspath(text)), repr(text))
    return text


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory {text!r}")
    return text
