"""Rank-0-only printing for every layer (the floor: torch-free, imports nothing of the package).

A line is printed on the main process only. Which process that is, is the engine's to say:
the engine's process-group module (the one that makes collectives) registers its ``is_main`` here when it is
imported, which every path that makes a process group does first. Before that there is no process
group and every process is the main one.
"""
from __future__ import annotations

import sys
from typing import Callable

from tqdm.auto import tqdm

_is_main: Callable[[], bool] = lambda: True  # noqa: E731  (until the engine registers its own)


def set_main_process(is_main: Callable[[], bool]) -> None:
    """Register the function that says whether this process prints (the process-group module's ``is_main``)."""
    global _is_main
    _is_main = is_main


def info(msg: str) -> None:
    """Print a line on the main process only, without breaking progress bars."""
    if _is_main():
        tqdm.write(msg)


def warn(msg: str) -> None:
    """A warning line on the main process only (stderr), prefixed ``warning:``."""
    if _is_main():
        tqdm.write(f"warning: {msg}", file=sys.stderr)
