"""The benchmark suites run (``python -m benchmarks all --quick``) and write valid JSON + markdown.

Speeds are never asserted: CI machines are shared and the quick sizes are
far too small to mean anything.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import SUITES  # noqa: E402
from benchmarks.common import validate  # noqa: E402


HANG_GUARD_S = 600


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "benchmarks", "all", "--quick", "--out", str(out)]
    try:  # a hang guard only: --quick takes about 30 s on 2 busy cores; a slow machine must not fail this test
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`python -m benchmarks all --quick` still running after {HANG_GUARD_S} s (about 20x its usual "
                    "time): it hangs, or this machine is far slower than any seen so far")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_suite_writes_valid_json_and_table(quick_results, suite):
    path = quick_results / f"{suite}.json"
    assert path.exists(), f"{suite}.json was not written"
    doc = json.loads(path.read_text())
    assert validate(doc, suite) == []
    assert doc["quick"] is True and doc["suite"] == suite
    assert any(r["status"] == "ok" for r in doc["rows"]), [(r["name"], r["status"], r.get("note")) for r in doc["rows"]]
    table = (quick_results / f"{suite}.md").read_text()
    assert f"`{suite}` benchmark" in table and "| status |" in table
    assert table.count("\n|") >= len(doc["rows"]) + 1  # header separator + one line per row


@pytest.mark.slow
def test_step_rows_compare_to_the_reference(quick_results):
    doc = json.loads((quick_results / "step.json").read_text())
    steps = [r for r in doc["rows"] if r.get("kind") != "aux"]
    assert {r["settings"]["method"] for r in steps} == {"simclr", "moco_v2", "byol", "embed"}
    for r in steps:
        if r["status"] == "ok":
            # same weights, same views: the hand-written reference computes the project's loss
            assert r["same_architecture"] is True, r["name"]
            assert r["loss_check"]["abs_diff"] <= 1e-3 * max(1.0, abs(r["loss_check"]["project"])), r["loss_check"]


def test_validator_rejects_bad_documents():
    good = {"schema": "dist_awenc.benchmarks/1", "suite": "verify", "device": "cpu", "torch": "2", "cuda": None,
            "quick": True, "created": "2026-01-01T00:00:00+00:00",
            "rows": [{"name": "a", "status": "ok", "settings": {}, "images_per_s": {"median": 2, "min": 1, "max": 3},
                      "seconds": {"median": 2, "min": 1, "max": 3}}]}
    assert validate(good, "verify") == []
    bad = json.loads(json.dumps(good))
    bad["rows"][0]["images_per_s"] = {"median": 5, "min": 1, "max": 3}
    assert validate(bad, "verify")
    bad = json.loads(json.dumps(good))
    bad["rows"][0].update(status="skipped", images_per_s=None)
    assert any("note" in e for e in validate(bad, "verify"))
    bad = json.loads(json.dumps(good))
    del bad["cuda"]
    assert validate(bad)


def test_gpu_launch_commands_use_the_projects_launch_configs():
    """The e2e suite's GPU command lines (no GPU needed to build them): the launch configs exist, ZeRO-2 gets its
    precision from train.mixed_precision (DeepSpeed refuses the launcher's beside a config file) and no LARS."""
    import torch

    from benchmarks.e2e import LAUNCH_CONFIG, ZERO_OPTIM, command, failure, plan
    from benchmarks.project import IMAGE_SIZE
    from dist_awenc.engine.loop import zero_stage

    gpu = SimpleNamespace(on_gpu=True, quick=False, device=torch.device("cuda"))
    args = SimpleNamespace(launchers=None, models=None, methods=None, modes=None)
    cases = plan(gpu, args)
    r50 = [(c[2], c[3]) for c in cases if c[0] == "resnet50_in224"]
    assert r50 == [("bf16_cl", "single"), ("bf16_cl", "ddp"), ("bf16_cl", "zero2")]
    assert all(c[4]["batch"] == 128 and IMAGE_SIZE[c[0]] == 224 for c in cases if c[0] == "resnet50_in224")
    single, _ = command(gpu, "single", 1, "bf16", "no")
    assert single[single.index("--config_file") + 1] == "configs/accelerate/1gpu.yaml"
    zero, env = command(gpu, "zero2", 4, "bf16", "no")
    assert "--mixed_precision" not in zero and not env
    assert zero[zero.index("--num_processes") + 1] == "4"
    assert zero_stage(REPO / "configs" / "deepspeed" / "zero2.json") == 2
    for path in LAUNCH_CONFIG.values():
        assert (REPO / path).is_file()
    assert "optim.name=lars" not in ZERO_OPTIM and any(o.startswith("optim.name=") for o in ZERO_OPTIM)
    cpu = SimpleNamespace(on_gpu=False, quick=True, device=torch.device("cpu"))
    _, env = command(cpu, "ddp", 1, "bf16", "no")
    assert env == {"ACCELERATE_USE_CPU": "1"}
    assert [c[3] for c in plan(cpu, args)] == ["single"]  # the CI smoke run launches once
    log = "[rank0]: Traceback\n[rank0]: RuntimeError: boom\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n"
    assert failure(log) == "RuntimeError: boom"

