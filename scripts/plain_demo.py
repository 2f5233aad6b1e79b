"""Refuse a demo folder that is not plain AWEncoder, for the experiment programs whose baseline it is.

``awenc demo`` embeds with stage 2's specificity term by default (#27; a demo made with the transforms + shadow
recipe is not plain either), but scripts/ablation.sh, scripts/permutation.sh and scripts/robust_carrier.py read
``runs/demo`` as plain AWEncoder (their ``plain`` row, and the stage configs their other variants start from). Make
it plain with ``bash scripts/demo.sh specific.weight=0`` (a demo folder made before the specificity term was the
demo's default is the same run).

    .venv/bin/python scripts/plain_demo.py [runs/demo]     # exit 2, with the reason, unless plain
"""
from __future__ import annotations

import sys
from pathlib import Path

import yaml


def why_not_plain(demo: str | Path = "runs/demo") -> str | None:
    """What makes ``demo`` not plain AWEncoder, or None where it is (or where its stages are not made yet)."""
    for stage in ("watermark", "embed"):
        p = Path(demo) / stage / "config.yaml"
        if not p.exists():
            continue
        cfg = yaml.safe_load(p.read_text()) or {}
        transforms = (cfg.get("robust") or {}).get("transforms") or []
        weight = (cfg.get("shadow") or {}).get("weight") or 0
        specific = (cfg.get("specific") or {}).get("weight") or 0
        if transforms or weight or specific:
            what = (f"robust.transforms={transforms}" if transforms else f"shadow.weight={weight}" if weight
                    else f"specific.weight={specific}")
            return (f"{p} has {what}: this program needs a plain AWEncoder demo; make one with "
                    "'bash scripts/demo.sh specific.weight=0' (move this runs/demo aside first)")
    return None


def require_plain_demo(demo: str | Path = "runs/demo") -> None:
    why = why_not_plain(demo)
    if why:
        sys.exit(f"error: {why}")


if __name__ == "__main__":
    why = why_not_plain(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
    if why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
