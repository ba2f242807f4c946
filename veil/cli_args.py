"""argparse types shared by the ``veil`` commands: numbers checked when the command line is read.

A flag given a value that would do nothing (``--epochs 0``), turn a limit off (``--max-batch 0``) or be
changed behind the user's back (``--review-failures -1`` raised to 1) is refused with one line and exit
status 2, before anything starts.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def whole_number(minimum: int) -> Callable[[str], int]:
    """A count flag: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expects a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def limit(zero_means_none: bool = False) -> Callable[[str], float]:
    """A limit flag: a finite number > 0 (>= 0 where 0 documents "no limit"). NaN, infinities and negative
    numbers would leave the limit silently broken or off."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_means_none):
            allowed = ">= 0 (0: no limit)" if zero_means_none else "> 0"
            raise argparse.ArgumentTypeError(f"expects a finite number {allowed}, got {text!r}")
        return value

    return parse


def seconds(text: str) -> float:
    """A wait in seconds: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expects a finite number of seconds >= 0, got {text!r}")
    return value
