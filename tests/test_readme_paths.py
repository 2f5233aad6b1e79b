"""The README's owner and verifier paths, run verbatim, so the guide cannot drift from the code.

The README marks each path's commands with ``<!-- readme-test: NAME -->`` right before a bash fence. This test
takes the blocks ``owner``, ``pirate`` (the stand-in pirate the verifier's path checks) and ``verifier``, in the
README's order, and runs them as one bash script (``set -euo pipefail``) in a fresh folder holding links to
configs/ and docs/, where ``awenc`` and ``python`` mean this checkout. The commands are the README's own quick
ones; the only substitution is the stand-in API's port (8765 becomes a free one, so runs can share a machine).
Then it checks what the README says each step leaves behind.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dist_awenc.verify.permutation import permutation_queries

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\s*\n```bash\n(.*?)\n```", re.S)
PATHS = ("owner", "pirate", "verifier")


def readme_blocks() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    found = BLOCK.findall(text)
    names = [n for n, _ in found]
    assert sorted(names) == sorted(PATHS), f"README.md: marked blocks {names}, expected {list(PATHS)} once each"
    assert names == list(PATHS), f"README.md: the marked blocks must come in the order {list(PATHS)}, not {names}"
    return dict(found)


def test_readme_marks_both_paths():
    blocks = readme_blocks()
    assert "awenc import" in blocks["owner"] and "awenc embed" in blocks["owner"] and "awenc calibrate" in blocks["owner"]
    assert "--mode whitebox" in blocks["verifier"] and "--endpoint" in blocks["verifier"]
    assert "--replay" in blocks["verifier"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shim(folder: Path, name: str, argv: str) -> None:
    path = folder / name
    path.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.mark.slow
def test_readme_owner_and_verifier_paths(tmp_path):
    blocks = readme_blocks()
    port = str(_free_port())
    script = "\n".join(["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
                       + [f"# ---- README: {n}\n" + blocks[n].replace("8765", port) for n in PATHS])
    work = tmp_path / "work"
    work.mkdir()
    for name in ("configs", "docs"):
        (work / name).symlink_to(ROOT / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _shim(bin_dir, "awenc", f"{sys.executable} -m dist_awenc")
    _shim(bin_dir, "python", sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"a README command failed (exit {proc.returncode}):\n{out[-6000:]}"
    runs = work / "runs"

    # the owner's path: the brought encoder imported, protected, calibrated, checked; the hash printed
    card = json.loads((runs / "my_encoder" / "encoder.json").read_text())
    assert card["arch"] == "resnet18" and card.get("imported") is True
    secret = json.loads((runs / "my_secret" / "secret.json").read_text())
    release = json.loads((runs / "my_release" / "encoder.json").read_text())
    assert release["secret_sha256"] == secret["sha256"]
    assert release["secret_sha256"] in proc.stdout.split()  # the hash the README says to publish
    assert (runs / "calibration" / "calibration.json").exists()
    check = json.loads((runs / "my_check" / "verdict.json").read_text())

    # the verifier's path: the pirate's re-saved weights, imported and verified white-box ...
    found = json.loads((runs / "found_weights" / "encoder.json").read_text())
    assert found.get("imported") is True and found["arch"] == "resnet18"
    weights = json.loads((runs / "found_weights_verdict" / "verdict.json").read_text())
    # the same weights (cast to fp16 and back by the pirate): the same white-box effect, up to fp16's rounding
    assert abs(_effect(weights) - _effect(check)) < 0.02, (weights, check)
    # ... the pirate's API verified in label mode within the budget, leaving the evidence bundle ...
    api = runs / "found_api_verdict"
    assert (api / "bundle.json").exists() and (api / "verdict.json").exists()
    # the log holds every query index: the margin test's 99, then the label permutation test's for the plan's J = 4
    # (its owner's part repeats the margin test's images, answered from the log; only 4 x 99 more were sent)
    api_verdict = json.loads((api / "verdict.json").read_text())
    assert [t["mode"] for t in api_verdict["tests"]] == ["blackbox_label", "blackbox_label_permutation"]
    assert len((api / "queries.jsonl").read_text().splitlines()) == 99 + permutation_queries("blackbox_label", 49, 4)
    sent = api_verdict["tests"][-1]["details"]["endpoint"]["queries"]
    assert sent == 99 + permutation_queries("blackbox_label", 49, 4, beside_margin_test=True) == 99 + 4 * 99
    # ... and the bundle replayed offline against the published release
    assert "reproduce verdict.json exactly" in out


def _effect(verdict: dict) -> float:
    """The white-box margin test's effect in a verdict.json (one verdict, or several under a key)."""
    found = []

    def walk(v):
        if isinstance(v, dict):
            if v.get("mode") == "whitebox" and "effect" in v:
                found.append(v["effect"])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(verdict)
    assert found, f"no white-box effect in {sorted(verdict)}"
    return float(found[0])
