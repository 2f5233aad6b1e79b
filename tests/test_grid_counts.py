"""scripts/grid_counts.py: the permutation verdicts of several grids summed, with the exact interval."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("grid_counts", Path(__file__).parents[1] / "scripts" / "grid_counts.py")
grid_counts = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(grid_counts)


def _grid(folder: Path, thefts: int, counts: dict[str, tuple[int, list[str]]]) -> Path:
    folder.mkdir(parents=True)
    perm = {"alternatives": 19, "resolution": 0.05,
            **{a: {"at_limit": thefts - len(m), "of": thefts, "missed": m} for a, (_, m) in counts.items()}}
    (folder / "robustness.json").write_text(json.dumps({"thefts": thefts, "permutation": perm}))
    return folder


def test_the_totals_sum_every_grid_with_the_exact_interval(tmp_path, capsys):
    a = _grid(tmp_path / "s1" / "grid", 10, {"weights": (10, []), "probabilities": (9, ["overwrite@5"]),
                                            "labels": (8, ["overwrite@5", "query_crop@0.8"])})
    b = _grid(tmp_path / "s2", 5, {"weights": (5, ["prune@0.5"]), "probabilities": (5, []), "labels": (5, [])})
    grid_counts.main([str(a), str(b / "robustness.json"), "--missed"])
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| s1/grid | 10 | 10/10 | 9/10 (not: overwrite@5) | 8/10 (not: overwrite@5, query_crop@0.8) |"
    assert out[3] == "| s2 | 5 | 4/5 (not: prune@0.5) | 5/5 | 5/5 |"
    # 14/15: Clopper-Pearson 0.68-1.00; 13/15: 0.60-0.98
    assert out[4] == ("| **all 2** | 15 | **14/15 (0.93; 0.68-1.00)** | **14/15 (0.93; 0.68-1.00)** | "
                      "**13/15 (0.87; 0.60-0.98)** |")


def test_a_grid_without_permutation_verdicts_is_refused_in_one_line(tmp_path):
    (tmp_path / "robustness.json").write_text(json.dumps({"thefts": 3}))
    with pytest.raises(SystemExit, match="has no permutation summary"):
        grid_counts.main([str(tmp_path)])
