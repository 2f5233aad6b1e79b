"""Sum the permutation tests' verdicts over several robustness grids: one markdown row per grid, then the totals.

Each grid is an `awenc robustness` folder (or its robustness.json); its `permutation` summary counts, per access,
the thefts on which the owner's secret ranked first (p at the permutation test's resolution 1/(J + 1)). The totals
carry the exact (Clopper-Pearson) 95% interval from scipy.

    .venv/bin/python scripts/grid_counts.py results/permutation_grid/twin07/s*        # prints the table
    .venv/bin/python scripts/grid_counts.py --out table.md runs/twin07/s*/grid
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scipy import stats

ACCESSES = ("weights", "probabilities", "labels")


def load_summary(path: Path) -> dict:
    """A grid's robustness.json (the folder or the file); exits with a one-line error when it has no permutation."""
    file = path / "robustness.json" if path.is_dir() else path
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"grid_counts: cannot read {file}: {e}")
    if not isinstance(summary.get("permutation"), dict) or "weights" not in summary["permutation"]:
        sys.exit(f"grid_counts: {file} has no permutation summary (a grid run with the plan's alternatives)")
    return summary


def _cell(k: int, n: int, missed: list[str] | None = None, ci: bool = False) -> str:
    text = f"{k}/{n}"
    if ci and n:
        low, high = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        text = f"**{text} ({k / n:.2f}; {low:.2f}-{high:.2f})**"
    return text + (f" (not: {', '.join(missed)})" if missed else "")


def table(paths: list[Path], names: list[str], missed: bool) -> str:
    """The markdown table: a row per grid (its folder's name), a total row."""
    lines = ["| grid | thefts | " + " | ".join(ACCESSES) + " |", "|---" * (len(ACCESSES) + 2) + "|"]
    totals = {a: [0, 0] for a in ACCESSES}
    thefts = 0
    for path, name in zip(paths, names):
        s = load_summary(path)
        thefts += int(s["thefts"])
        cells = []
        for a in ACCESSES:
            b = s["permutation"].get(a, {"at_limit": 0, "of": 0, "missed": []})
            totals[a][0] += int(b["at_limit"])
            totals[a][1] += int(b["of"])
            cells.append(_cell(int(b["at_limit"]), int(b["of"]), b["missed"] if missed else None))
        lines.append(f"| {name} | {s['thefts']} | " + " | ".join(cells) + " |")
    lines.append(f"| **all {len(paths)}** | {thefts} | "
                 + " | ".join(_cell(k, n, ci=True) for k, n in totals.values()) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="+", type=Path, help="awenc robustness folders or their robustness.json")
    ap.add_argument("--out", type=Path, help="write the table here instead of printing it")
    ap.add_argument("--missed", action="store_true", help="name the thefts each access missed")
    args = ap.parse_args(argv)
    # a grid's name: its folder, or the folder above when that is run.name (grid, grid2, ...)
    names = [(p if p.is_dir() else p.parent) for p in args.grids]
    names = [str(n.parent.name + "/" + n.name) if n.name.startswith("grid") else n.name for n in names]
    text = table(args.grids, names, args.missed)
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
