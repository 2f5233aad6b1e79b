"""The benchmark suites run (``python -m benchmarks <suite> --quick``, and ``benchmarks/gpu_checks.sh --dry-run``)
and write valid JSON + markdown.

Speeds are never asserted: CI machines are shared and the quick sizes are
far too small to mean anything.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REQUIRE_EXTRAS

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repository, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import SUITES  # noqa: E402
from benchmarks.common import validate  # noqa: E402


HANG_GUARD_S = 600


DRY_RUN_SUITES = ("step", "e2e", "cost")  # what gpu_checks.sh runs (e2e with all three launchers)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _run(cmd: list[str], what: str, timeout: int) -> subprocess.CompletedProcess:
    try:  # a hang guard only (about 10x the usual time): a slow machine must not fail these tests
        return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} still running after {timeout} s: it hangs, or this machine is far slower than any seen")


@pytest.fixture(scope="module")
def suites(tmp_path_factory) -> tuple[dict[str, Path], subprocess.CompletedProcess]:
    """Every suite at --quick, run once for the module: ``gpu_checks.sh --dry-run`` makes step, e2e and cost (the GPU
    sequence's own command lines, e2e with all three launchers) while the other suites run beside it (at --quick
    each process takes one thread, so the two share the 2 cores). Returns each suite's folder and the dry run."""
    dry_dir, rest_dir = tmp_path_factory.mktemp("gpu_dry"), tmp_path_factory.mktemp("bench")
    cmd = ["bash", str(REPO / "benchmarks" / "gpu_checks.sh"), "--dry-run", str(dry_dir)]
    dry = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for suite in (s for s in SUITES if s not in DRY_RUN_SUITES):
            proc = _run([sys.executable, "-m", "benchmarks", suite, "--quick", "--out", str(rest_dir)],
                        f"`python -m benchmarks {suite} --quick`", HANG_GUARD_S)
            assert proc.returncode == 0, proc.stderr[-3000:]
        stdout, stderr = dry.communicate(timeout=2 * HANG_GUARD_S)  # a hang guard only
    except BaseException as e:
        dry.kill()
        dry.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            pytest.fail(f"gpu_checks.sh --dry-run still running after {2 * HANG_GUARD_S} s: it hangs")
        raise
    dirs = {s: dry_dir if s in DRY_RUN_SUITES else rest_dir for s in SUITES}
    return dirs, subprocess.CompletedProcess(cmd, dry.returncode, stdout, stderr)


@pytest.mark.slow
@pytest.mark.parametrize("suite", SUITES)
def test_suite_writes_valid_json_and_table(suites, suite):
    path = suites[0][suite] / f"{suite}.json"
    assert path.exists(), f"{suite}.json was not written"
    doc = json.loads(path.read_text())
    assert validate(doc, suite) == []
    assert doc["quick"] is True and doc["suite"] == suite
    assert any(r["status"] == "ok" for r in doc["rows"]), [(r["name"], r["status"], r.get("note")) for r in doc["rows"]]
    if REQUIRE_EXTRAS:  # every extra is installed: no row may pass as "not installed"
        assert not [r["name"] for r in doc["rows"] if r["status"] == "not installed"], doc["rows"]
    table = (suites[0][suite] / f"{suite}.md").read_text()
    assert f"`{suite}` benchmark" in table and "| status |" in table
    assert table.count("\n|") >= len(doc["rows"]) + 1  # header separator + one line per row


@pytest.mark.slow
def test_step_rows_compare_to_the_reference(suites):
    doc = json.loads((suites[0]["step"] / "step.json").read_text())
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




@pytest.mark.slow
def test_gpu_checks_dry_run(suites):
    """`gpu_checks.sh --dry-run`: the GPU sequence (step; e2e launched one-process, DDP and ZeRO-2; cost) on the CPU
    at --quick sizes, every file validated. About 2 minutes on 2 busy cores, plus one JIT build of DeepSpeed's CPU
    communication op where TORCH_EXTENSIONS_DIR has none yet (test_deepspeed.py then finds it built)."""
    tmp_path, proc = suites[0]["step"], suites[1]
    log = proc.stderr[-4000:]
    docs = {}
    for suite in ("step", "e2e", "cost"):
        assert (tmp_path / f"{suite}.json").exists(), log
        docs[suite] = json.loads((tmp_path / f"{suite}.json").read_text())
        assert validate(docs[suite], suite) == [], suite
        assert docs[suite]["quick"] is True and docs[suite]["device_type"] == "cpu"
        assert any(r["status"] == "ok" and r.get("kind") != "aux" for r in docs[suite]["rows"]), suite
    e2e = docs["e2e"]["rows"]
    by = {k: [r for r in e2e if r["settings"]["launcher"] == k] for k in ("single", "ddp", "zero2")}
    assert [r["status"] for r in by["single"]] == ["ok"] and [r["status"] for r in by["ddp"]] == ["ok"], log
    assert "--config_file configs/accelerate/8gpu.yaml" in by["ddp"][0]["settings"]["command"]
    assert by["ddp"][0]["settings"]["mixed_precision"] == "bf16" and by["ddp"][0]["settings"]["channels_last"] is True
    zero2 = by["zero2"]
    if not (importlib.util.find_spec("deepspeed") and importlib.util.find_spec("transformers")):
        assert not REQUIRE_EXTRAS, "AWENC_REQUIRE_EXTRAS is set but DeepSpeed or transformers is not installed"
        assert [r["status"] for r in zero2] == ["not installed"] and "skipped" in zero2[0]["note"]
        assert proc.returncode == 0, log
        return
    assert zero2 and all("8gpu_zero2.yaml" in r["settings"]["command"] for r in zero2 if r["status"] == "ok")
    assert all(r["settings"]["optimizer"] != "lars" for r in zero2 if r["status"] == "ok")
    # ZeRO-2 with bf16 + channels_last on the BatchNorm ResNets runs (the dry run found it failing: DeepSpeed's
    # broadcast of channels_last weights, bf16 BatchNorm weights beside fp32 statistics; both fixed in the engine)
    assert zero2[0]["status"] == "ok" and zero2[0]["settings"]["mixed_precision"] == "bf16", zero2[0].get("note")
    failed = [r for r in e2e + docs["step"]["rows"] + docs["cost"]["rows"] if r["status"] == "failed"]
    assert not failed, [(r["name"], r.get("note")) for r in failed]
    assert proc.returncode == 0, log


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

