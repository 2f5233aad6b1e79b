"""Rank-0-only printing for every layer (the floor: torch-free, imports nothing of the package).

A line is printed on the main process only: rank 0 of the process group, or the one process where there is none.
The rank is read from ``torch.distributed`` only when some module has imported it (no process group can exist
before that), so logging neither imports torch nor depends on :mod:`dist_awenc.engine`; the collectives stay in
:mod:`dist_awenc.engine.dist`.
"""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


def _is_main() -> bool:
    tdist = sys.modules.get("torch.distributed")
    if tdist is None or not (tdist.is_available() and tdist.is_initialized()):
        return True
    return tdist.get_world_size() <= 1 or tdist.get_rank() == 0


def info(msg: str) -> None:
    """Print a line on the main process only, without breaking progress bars."""
    if _is_main():
        tqdm.write(msg)


def warn(msg: str) -> None:
    """A warning line on the main process only (stderr), prefixed ``warning:``."""
    if _is_main():
        tqdm.write(f"warning: {msg}", file=sys.stderr)
