"""``python -m benchmarks summary DIR...``: one markdown table of the headline numbers of every suite file in the
folders (the current table of docs/scale.md)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from benchmarks.common import fmt_stats


def summary(folders: Iterable[Path]) -> str:
    """One markdown table of the headline numbers of every suite file in ``folders``."""
    from benchmarks import SUITES

    out = ["| device | suite | case | measured | reference | ratio |", "|---|---|---|---|---|---|"]
    notes = []
    for folder in folders:
        for suite in SUITES:
            path = Path(folder) / f"{suite}.json"
            if not path.exists():
                continue
            doc = json.loads(path.read_text())
            env = doc.get("environment", {})
            notes.append(f"{doc['device']}: torch {doc['torch']}, CUDA {doc['cuda'] or 'none'}, torch threads "
                         f"{env.get('torch_threads')}, measured {doc['created'][:10]}{' (--quick)' if doc['quick'] else ''} "
                         f"from `{Path(folder).as_posix()}`")
            for r in doc["rows"]:
                if r.get("kind") == "aux":
                    continue
                measured = reference = rat = "-"
                if r["status"] != "ok":
                    measured = f"{r['status']}: {r.get('note', '')}"
                elif suite in ("step", "e2e"):
                    measured = f"{fmt_stats(r['images_per_s'])} img/s"
                    reference = f"{fmt_stats(r['reference_images_per_s'])} img/s"
                    rat = f"{r['ratio']:.2f}"
                    if r.get("views_share") is not None:
                        rat += f" (views {100 * r['views_share']:.0f}% of a step)"
                elif suite == "loader":
                    measured = f"{fmt_stats(r['images_per_s_per_core'])} img/s per core"
                elif suite == "verify":
                    measured = f"{fmt_stats(r['seconds'], 2)} s"
                elif suite == "health":
                    measured = r["summary"]
                elif suite == "cost":
                    measured = f"watermark + embed = {100 * r['fraction']:.1f}% of pre-training"
                    reference = f"device-hours pretrain / watermark / embed: {r.get('device_hours', '-')}"
                out.append(f"| {doc['device']} | {suite} | {r['name']} | {measured} | {reference} | {rat} |".replace("\n", " "))
    return "\n".join(out) + "\n\n" + "\n".join(f"- {n}" for n in dict.fromkeys(notes)) + "\n"
