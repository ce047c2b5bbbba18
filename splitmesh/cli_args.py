"""Argument parsing for the ``splitmesh`` command: no abbreviations, and values checked where they are read.

argparse stays (typer or click would not remove plumbing here: every command is a few flags handed
to the SDK); what it needed was ``allow_abbrev=False`` on every parser, so ``up --tls`` is never read
as a prefix of a top-level ``--tls-dir``, and types that refuse out-of-range values with a one-line
usage error instead of a traceback from deep inside protobuf.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that never accepts abbreviated options; sub-command parsers inherit it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"layer boundaries are not negative, got {text!r}")
    return values


def names(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected comma-separated node ids")
    return values


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An int in [low, high]: the range the wire field (or the meaning) allows."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def number(low: float, high: float | None = None) -> Callable[[str], float]:
    """A finite float in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            span = f"at least {low:g}" if high is None else f"in {low:g}..{high:g}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value

    parse.__name__ = "number"
    return parse
