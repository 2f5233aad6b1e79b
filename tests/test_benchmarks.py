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


def torch_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


DRY_RUN_SUITES = ("health", "step", "e2e", "cost")  # what gpu_checks.sh runs (e2e with all three launchers)


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
    """Every suite at --quick, run once for the module: ``gpu_checks.sh --dry-run`` makes health, step, e2e and cost
    (the GPU sequence's own command lines, e2e with all three launchers) while the other suites run beside it (at
    --quick each process takes one thread, so the two share the 2 cores). Returns each suite's folder and the dry
    run."""
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
    # health rows are checks: an ok row needs its check and a summary, not a speed
    check = {**good, "suite": "health", "rows": [{"name": "a", "status": "ok", "settings": {}, "images_per_s": None,
                                                 "check": "loss", "summary": "fell"}]}
    assert validate(check, "health") == []
    bad = json.loads(json.dumps(check))
    bad["rows"][0]["check"] = "speed"
    assert any("'check'" in e for e in validate(bad, "health"))
    bad = json.loads(json.dumps(check))
    del bad["rows"][0]["summary"]
    assert any("'summary'" in e for e in validate(bad, "health"))
    assert validate({**check, "suite": "verify"}, "verify")  # other suites still need their images_per_s




@pytest.mark.slow
def test_gpu_checks_dry_run(suites):
    """`gpu_checks.sh --dry-run`: the GPU sequence (health; step; e2e launched one-process, DDP and ZeRO-2; cost) on
    the CPU at --quick sizes, every file validated. About 2 minutes on 2 busy cores, plus one JIT build of DeepSpeed's CPU
    communication op where TORCH_EXTENSIONS_DIR has none yet (test_deepspeed.py then finds it built)."""
    tmp_path, proc = suites[0]["step"], suites[1]
    log = proc.stderr[-4000:]
    docs = {}
    for suite in ("health", "step", "e2e", "cost"):
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


@pytest.mark.slow
def test_health_checks_in_the_dry_run(suites):
    """The dry run's health suite: peak GPU memory and SyncBN say why they are not measured on a CPU (this torch's
    SyncBatchNorm refuses CPU tensors), and the recipe's step, at tiny size, lowers its loss by the margin."""
    from benchmarks.health import LOSS_MARGIN, RECIPE

    doc = json.loads((suites[0]["health"] / "health.json").read_text())
    by = {r["check"]: r for r in doc["rows"]}
    assert sorted(by) == ["loss", "memory", "sync_bn"]
    assert by["memory"]["status"] == "skipped" and "not measured on CPU" in by["memory"]["note"]
    assert by["memory"]["settings"]["batch"] == 512  # 4096 over the 8 processes of configs/accelerate/8gpu.yaml
    sync_bn = by["sync_bn"]
    if sync_bn["status"] == "skipped":  # a torch whose SyncBatchNorm runs on CPU would run the 2-process check
        assert "SyncBatchNorm" in sync_bn["note"] and "CPU" in sync_bn["note"], sync_bn["note"]
    else:
        assert sync_bn["status"] == "ok" and sync_bn["settings"]["ranks"] == 2, sync_bn
    loss = by["loss"]
    assert loss["status"] == "ok", loss.get("note")
    assert len(loss["loss_by_tenth"]) == 10 and loss["last_tenth"] <= (1 - LOSS_MARGIN) * loss["first_tenth"]
    assert loss["settings"]["config"] == RECIPE and loss["settings"]["optimizer"] == "lars"


def test_memory_search_finds_the_largest_batch_that_fits():
    """The recipe's batch when it fits; else halvings, then bisection to 32 images, in at most 6 tries."""
    from benchmarks.health import largest_fitting

    for limit, expected in ((600, 512), (512, 512), (300, 288), (200, 192), (40, 32), (10, None)):
        tried: list[int] = []
        best = largest_fitting(lambda b: tried.append(b) or b <= limit, 512)
        assert best == expected and len(tried) <= 6, (limit, best, tried)


@pytest.mark.slow
def test_sync_bn_check_finds_batchnorm_that_is_not_synchronised():
    """The SyncBN check's harness on 2 gloo processes (this torch's SyncBatchNorm refuses CPU tensors, so the check
    itself runs on GPUs only): with plain BatchNorm on each shard it must find outputs, gradients and running
    statistics off, and ranks that disagree. About 15 s on 2 busy cores (two processes importing torch)."""
    from benchmarks.health_syncbn import TOL, run_check, verdict

    result = run_check(2, "cpu", sync=False)
    assert "errors" in result, result
    err = result["errors"]
    ok, text = verdict(err)
    assert not ok, text
    for key in ("output", "input_grad", "running_stats", "running_stats_across_ranks", "local_bn_output"):
        assert err[key] > 100 * TOL, (key, err)
    assert err["reference_fp32_vs_fp64"] < TOL / 10, err  # the tolerance is far above fp32's own error


@pytest.mark.gpu
@pytest.mark.skipif(not torch_cuda_devices() >= 2, reason="needs 2 CUDA devices")
def test_sync_bn_agrees_across_gpus():
    """The check itself, on every visible GPU (NCCL): what gpu_checks.sh's sync_bn row runs."""
    import torch

    from benchmarks.health_syncbn import run_check, verdict

    result = run_check(torch.cuda.device_count(), "cuda")
    assert "errors" in result, result
    ok, text = verdict(result["errors"])
    assert ok, text


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



def test_recipe_cost_rows(tmp_path):
    """The cost suite's recipe rows (#27 item 4), run as the suite runs them but at tiny size (a tiny ResNet at 32 px,
    one round; `--quick` skips the ResNet-50 rows): every case measured, the five imagenet fraction rows derived
    from their ratios and the ImageNet configs, the file valid. 10-30 s on 2 busy cores; no speed is asserted."""
    import torch

    from benchmarks import cost
    from benchmarks.common import Context, SuiteWriter

    ctx = Context(device=torch.device("cpu"), quick=True, out_dir=tmp_path, threads=1)
    out = SuiteWriter("cost", ctx, cost.COLUMNS, cost.TABLE_SETTINGS)
    cost.recipe_rows(ctx, out, cost.TINY_RECIPE, 1, tmp_path)
    doc = json.loads((tmp_path / "cost.json").read_text())
    assert validate(doc, "cost") == []
    cases, fractions = doc["rows"][:len(cost.CASES)], doc["rows"][len(cost.CASES):]
    assert [r["settings"]["case"] for r in cases] == list(cost.CASES)
    assert all(r["status"] == "ok" and r["kind"] == "aux" for r in cases), [(r["name"], r.get("note")) for r in cases]
    assert cases[0]["cost_vs_simclr"]["median"] == 1.0
    assert all(r["cost_vs_simclr"]["median"] > 0 for r in cases)
    assert [("restart_seconds" in r) for r in cases] == [c in cost.WITHOUT_SHADOW for c in cost.CASES]
    assert [r["settings"]["variant"] for r in fractions] == list(cost.VARIANTS)
    for r in fractions:
        assert r["status"] == "ok", r.get("note")
        assert r["meets_target"] == (r["fraction"] <= cost.TARGET) and r["fraction_range"][0] <= r["fraction_range"][1]
        s = r["settings"]
        assert (s["pretrain_split"], s["secrets"], s["generation_steps"], s["generation_batch"]) == (1_255_544, 1000, 500, 32)
        assert (s["pretrain_epochs"], s["embed_epochs"], s["processes"]) == (100, 5, 8)
        assert s["shadow_restarts"] == (87 if "shadow" in s["recipe"] else 0)  # 6,130 steps, a restart every 70
        assert ("to_meet_target" in r) == (s["stage2_case"] in cost.WITHOUT_SHADOW)
        if s["stage2_case"] == "embed_specific":  # 4 x (2 x 16 + 1) term images a step of 1024 / 8 source images
            assert s["specific_images_per_source_image"] == {"imagenet": 132 / 128, "measured": 4 * (2 * 2 + 1) / 2}
    table = (tmp_path / "cost.md").read_text()
    assert table.count("\n|") == len(doc["rows"]) + 2 and "imagenet fraction" in table


def test_recipe_cases_run_the_recipe(tmp_path):
    """A recipe case is the stage-2 step `awenc embed` builds with those options: the transforms drawn for the
    marked images, the shadow student in the task, restarted by the loop's hook every `shadow.refresh` steps."""
    import torch

    from benchmarks import cost

    plain, _ = cost.build_case("embed", cost.TINY_RECIPE, 200, tmp_path / "a", tmp_path)
    assert plain.model.shadow is None and not plain.make_inputs.robust.enabled
    case, _ = cost.build_case("embed_recipe", cost.TINY_RECIPE, 200, tmp_path / "b", tmp_path)
    assert case.make_inputs.robust.transforms == ("jpeg", "resize", "crop", "noise", "blur")
    assert case.make_inputs.robust.p_identity == 0.5
    shadow = case.model.shadow
    assert shadow is not None and case.model.weights["shadow"] == 1.0
    before = [p.clone() for p in shadow.student.parameters()]
    case.after_step(case.model, 69)
    assert all(torch.equal(a, b) for a, b in zip(before, shadow.student.parameters()))
    case.after_step(case.model, 70)  # refresh = 70: a fresh student
    assert not all(torch.equal(a, b) for a, b in zip(before, shadow.student.parameters()))


def test_recipe_specific_case_runs_the_term_on_the_whole_batch_and_its_cost_is_rescaled(tmp_path):
    """Case (h) is stage 2 with the demo's specificity term on every image of the measured batch; its extra cost over
    plain stage 2 is rescaled by the ImageNet step's term images per source image over the measured one."""
    from benchmarks import cost

    case, _ = cost.build_case("embed_specific", cost.TINY_RECIPE, 200, tmp_path / "h", tmp_path)
    spec = case.model.specific
    assert spec is not None and case.model.weights["specific"] == 10.0
    assert (spec.secrets, spec.images, spec.keep) == (4, cost.TINY_RECIPE.batch, 0.0)
    inp = cost.imagenet_inputs(cost.RECIPE_SPECIFIC)
    assert inp["specific_images_per_source_image"] == 132 / 128 and cost.imagenet_inputs()["specific_images_per_source_image"] == 0
    plain, measured = {"median": 2.0, "min": 1.5, "max": 2.5, "n": 3}, {"median": 12.0, "min": 11.0, "max": 13.0, "n": 3}
    scaled = cost.scaled_specific(plain, measured, 2, inp)  # measured: 4 x 5 term images for 2 source images = 10
    assert scaled["median"] == 2.0 + 10.0 * (132 / 128) / 10 and scaled["min"] == 1.5 + 9.5 * (132 / 128) / 10
    assert scaled["n"] == 3
    most = cost.specific_budget(inp, 0.4, 2.0, 12.0, 2)  # term images per source image that reach the target exactly
    at_most = cost.scaled_specific(plain, measured, 2, {**inp, "specific_images_per_source_image": most})
    assert cost.imagenet_estimate(0.4, at_most["median"], inp)["fraction"] == pytest.approx(cost.TARGET)


def test_imagenet_estimate_reproduces_the_configs_arithmetic():
    """At the configs' own per-image guesses (stage 1: 3 forward-equivalents, stage 2: 16, SimCLR: 6) the estimate
    gives their header comments' numbers: 15.6 H200-hours of pre-training, stage 1 about 1.0, stage 2 about 2.1,
    about 20% in all; the shadow's restarts add restarts x processes x seconds; each knob of to_meet_target
    brings the fraction to the target."""
    from benchmarks import cost

    inp = cost.imagenet_inputs()
    est = cost.imagenet_estimate(3 / 6, 16 / 6, inp)
    hours = {k: v / 3600 for k, v in est["device_seconds"].items()}
    assert round(hours["pretrain"], 1) == 15.6 and round(hours["watermark"], 1) == 1.0 and round(hours["embed"], 1) == 2.1
    assert round(est["fraction"], 2) == 0.20
    shadow = cost.imagenet_inputs(cost.RECIPE_SHADOW)
    assert (shadow["embed_steps"], shadow["shadow_restarts"], shadow["processes"]) == (6130, 87, 8)
    with_restarts = cost.imagenet_estimate(3 / 6, 16 / 6, shadow, restart_seconds=2.0)
    assert with_restarts["restart_device_seconds"] == 87 * 8 * 2.0
    c1, c2, c2_plain, rs = 0.5, 6.0, 2.5, 2.0
    need = cost.to_meet_target(shadow, c1, c2, c2_plain, rs)
    q = need["shadow_share_of_batch"]
    at_q = cost.imagenet_estimate(c1, c2_plain + q * (c2 - c2_plain), shadow, restart_seconds=rs)["fraction"]
    assert 0 < q < 1 and abs(at_q - cost.TARGET) < 1e-9
    fewer = {**shadow, "embed_epochs": need["embed_epochs"]}
    at_e = cost.imagenet_estimate(c1, c2, fewer, restart_seconds=rs * need["embed_epochs"] / shadow["embed_epochs"])
    assert abs(at_e["fraction"] - cost.TARGET) < 1e-9
    at_s = cost.imagenet_estimate(c1, c2, {**shadow, "generation_steps": need["generation_steps"]}, restart_seconds=rs)
    assert abs(at_s["fraction"] - cost.TARGET) < 1e-9
