"""`awenc sweep`: grid expansion, the sweep folder, failures, resume, collection; through a real SLURM.

Tests marked ``slurm`` run against a single-node SLURM on localhost: the one
``SLURM_CONF`` points at when a controller answers (CI starts it with
scripts/slurm_local.sh), else one this module starts (root and slurm-wlm
needed) and stops by PID at the end; they skip, with the reason, where
neither is possible (``AWENC_REQUIRE_SLURM=1`` turns the skip into a failure).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_overrides, weights
from dist_awenc.config import CalibrateConfig, PretrainConfig, WatermarkConfig, load_config
from dist_awenc.errors import ConfigError
from dist_awenc.launch import sweep as sw
from dist_awenc.launch.cluster import (balanced, parse_max_array_size, slurm_available,
                                       split)
from dist_awenc.launch.jobs import StageJob

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sweep" / "tiny.yaml"
# waits on SLURM jobs are hang guards at about 10x the usual time on 2 busy cores, never speed checks (#15)
HANG_GUARD_S = 300
SMALL_GRID = ["grid.attacks=[prune_global,query_jpeg]", "grid.strengths={prune_global: [0.2, 0.8], query_jpeg: [50]}",
              "grid.seeds=[0,1]"]


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    """A tiny clean encoder and a secret generated on it (the 'watermarked' encoder of these grids)."""
    from accelerate.state import AcceleratorState

    from dist_awenc.ssl.pretrain import pretrain
    from dist_awenc.watermark.generate import watermark

    AcceleratorState._reset_state(reset_partial_state=True)
    root = tmp_path_factory.mktemp("owner")
    f0 = pretrain(load_config(PretrainConfig, None, tiny_overrides(root, "f0")))
    secret = watermark(load_config(WatermarkConfig, None, [f"run.out_dir={root}", "run.name=wm", f"encoder={f0}", "data.image_size=8",
                                                           "generation.steps=5", "generation.batch_size=32",
                                                           "plan.n_whitebox=64", "plan.alternatives=0"]))
    return f0, secret


def tiny_sweep(owner, out_dir, *extra: str, name: str = "sweep") -> sw.SweepConfig:
    f0, secret = owner
    return load_config(sw.SweepConfig, TINY, [f"encoder={f0}", f"secret={secret}", f"run.out_dir={out_dir}",
                                              f"run.name={name}", *extra])


def rows_of(path: Path, drop=("attack_seconds",)) -> list[dict]:
    """A robustness table without its wall-clock column."""
    with path.open(newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def robustness_on_one_machine(sweep_yaml: Path, out_dir: Path, overrides: list[str]) -> Path:
    """`awenc robustness` with the sweep file's grid sections (no `slurm`), one torch thread like the jobs."""
    from dist_awenc.cli import main

    body = yaml.safe_load(sweep_yaml.read_text())
    body.pop("slurm", None)
    body.pop("run", None)
    cfg = out_dir / "robustness.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(yaml.safe_dump(body))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["robustness", "--config", str(cfg), f"run.out_dir={out_dir}", "run.name=one", *overrides]) == 0
    finally:
        torch.set_num_threads(threads)
    return out_dir / "one" / "robustness.csv"


# ------------------------------------------------------------------ units


def test_expansion_targets_and_null_population(owner, tmp_path):
    f0, secret = owner
    null = tmp_path / "null.yaml"
    null.write_text(yaml.safe_dump({"run": {"name": "cal", "out_dir": str(tmp_path)},
                                    "population": {"methods": ["simclr", "byol"], "archs": ["tiny:8"], "attacks": [], "owner_budget": False, "seeds": 2}}))
    cfg = load_config(sw.SweepConfig, None, [*SMALL_GRID, f"encoder={f0}", f"secret={secret}",
                                             f"encoders={{other: {f0}}}", f"secrets={{other: {secret}}}",
                                             f"null_population={null}"])
    ccfg = sw.null_config(cfg)
    tasks = sw.expand(cfg, sw.null_pretrain_configs(ccfg))
    ids = [t.id for t in tasks]
    assert ids[:4] == ["null.simclr_tiny8_group_s0", "null.simclr_tiny8_group_s1", "null.byol_tiny8_group_s0", "null.byol_tiny8_group_s1"]
    assert len(ids) == 4 + 2 * 2 * 4 == len(set(ids))  # 2 targets x (baseline + 3 attack strengths) x 2 seeds
    assert "main.prune_global__0.8__s1" in ids and "other.query_jpeg__50__s0" in ids
    # null encoders go where `awenc calibrate` with that config looks for them
    pcfg = sw.null_pretrain_configs(ccfg)["byol_tiny8_group_s1"]
    assert Path(pcfg.run.out_dir) == tmp_path / "cal" / "population"
    with pytest.raises(ConfigError, match="same targets"):
        sw.targets_of(load_config(sw.SweepConfig, None, [f"encoders={{a: {f0}}}"]))
    with pytest.raises(ConfigError, match="empty"):
        sw.expand(load_config(sw.SweepConfig, None, []))


def test_array_splitting_and_cluster_limits():
    assert split(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [len(p) for p in balanced(list(range(10)), 3)] == [4, 3, 3]
    assert balanced([1, 2], 5) == [[1], [2]]
    text = "MaxArraySize            = 1001\nSchedulerParameters     = sched_interval=2,max_array_tasks=300\n"
    assert parse_max_array_size(text) == 300
    assert parse_max_array_size("MaxArraySize = 64\n") == 64
    assert parse_max_array_size("") == 1001
    with pytest.raises(ConfigError, match="MaxArraySize 0"):
        split([1], 0)


def test_slurm_section_is_checked():
    with pytest.raises(ConfigError, match="tasks_per_job"):
        load_config(sw.SweepConfig, TINY, ["slurm.tasks_per_job=0"])
    with pytest.raises(ConfigError, match="unknown config key 'slurm.gpus'"):
        load_config(sw.SweepConfig, TINY, ["slurm.gpus=1"])


def test_shipped_sweep_configs_load():
    for p in sorted((REPO / "configs" / "sweep").glob("*.yaml")):
        cfg = load_config(sw.SweepConfig, p)
        if cfg.null_population:
            load_config(CalibrateConfig, REPO / cfg.null_population)
    cfg = load_config(sw.SweepConfig, TINY, ["encoder=x", "secret=y"])
    assert len(sw.expand(cfg)) >= 40  # the demo-scale grid CI sweeps through SLURM


def test_stage_job_command_lines(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")
    gpu = StageJob("pretrain", "/c.yaml", ["train.epochs=2"], processes_per_node=8, gpus=True, mixed_precision="bf16")
    cmd, env = gpu.command(num_nodes=2, node_rank=1, main_host="node07")
    joined = " ".join(cmd)
    assert env == {}
    assert "--multi_gpu --mixed_precision bf16" in joined  # no accelerate config: DDP
    assert "--num_processes 16 --num_machines 2 --machine_rank 1 --main_process_ip node07" in joined
    assert joined.endswith("-m dist_awenc pretrain --config /c.yaml train.epochs=2 data.num_workers=3")  # 32 CPUs / 8 - 1
    ddp = StageJob("pretrain", None, [], processes_per_node=8, gpus=True,
                     accelerate_config=str(REPO / "configs" / "accelerate" / "8gpu.yaml"))
    cmd, _ = ddp.command(num_nodes=2, node_rank=0, main_host="node07")
    assert "--config_file" in cmd and "--multi_gpu" not in cmd and "--mixed_precision" not in cmd  # the config's
    cpu2, env = StageJob("embed", None, [], processes_per_node=2, gpus=False).command(1, 0, "localhost")
    assert env == {"ACCELERATE_USE_CPU": "1"} and "--multi_gpu" in cpu2 and "--cpu" not in cpu2  # 2 real processes
    cpu1, _ = StageJob("embed", None, [], processes_per_node=1, gpus=False).command(1, 0, "localhost")
    assert "--cpu" in cpu1 and "--multi_gpu" not in cpu1


def test_prepare_checks_inputs_and_refuses_another_grid(owner, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        sw.prepare(tiny_sweep(owner, tmp_path, f"secret={tmp_path / 'nope.safetensors'}"))
    root = sw.prepare(tiny_sweep(owner, tmp_path, *SMALL_GRID))
    sw.prepare(tiny_sweep(owner, tmp_path, *SMALL_GRID, "slurm.time_min=99"))  # only slurm.* changed: fine
    assert sw.Sweep(root).config.slurm.time_min == 99
    with pytest.raises(ConfigError, match="different grid"):
        sw.prepare(tiny_sweep(owner, tmp_path, *SMALL_GRID, "grid.seeds=[5]"))
    # each target folder holds the config `awenc robustness` would run for it
    from dist_awenc.stages.robustness import RobustnessConfig

    rcfg = load_config(RobustnessConfig, root / "targets" / "main" / "config.yaml")
    assert rcfg.grid.seeds == [0, 1] and Path(rcfg.run.out_dir) == root / "targets"


# ------------------------------------------------------------------ reading a sweep folder (issue #14)


def plain_sweep(root: Path, tasks: list[dict], submissions: list[dict] = ()) -> Path:
    """A sweep folder's sweep.json and jobs.json, written by hand (no config, no torch)."""
    root.mkdir(parents=True, exist_ok=True)
    full = [{"kind": "robustness", "target": "", "attack": "", "strength": 0.0, "seed": 0, "name": "", **t} for t in tasks]
    (root / "sweep.json").write_text(json.dumps({"format": sw.SWEEP_FORMAT, "cwd": str(root), "tasks": full}))
    if submissions:
        (root / "jobs.json").write_text(json.dumps({"submissions": list(submissions)}))
    return root


ROB_TASK = {"id": "main.prune_global__0.5__s0", "target": "main", "attack": "prune_global", "strength": 0.5}
NULL_TASK = {"id": "null.simclr_w8_group_s0", "kind": "null", "name": "simclr_w8_group_s0"}


def test_ids_read_from_a_sweep_folder_are_checked(tmp_path):
    """Task ids, target and null names (sweep.json), job and task ids (jobs.json) become paths only when safe."""
    ok = sw.Sweep(plain_sweep(tmp_path / "ok", [ROB_TASK, NULL_TASK]))
    assert ok.result_path(ROB_TASK["id"]) == ok.root / "targets" / "main" / "tasks" / "prune_global__0.5__s0.json"
    assert ok.result_path(NULL_TASK["id"]) == ok.root / "null" / "simclr_w8_group_s0.json"
    bad_plans = {
        "dotdot": [{**ROB_TASK, "id": "main.x/../../../../etc/passwd"}],
        "slash_target": [{**ROB_TASK, "id": "../evil.none__0__s0", "target": "../evil"}],
        "null_name": [{**NULL_TASK, "id": "null.x", "name": "../../x"}],
        "mismatch": [{**NULL_TASK, "id": "null.other"}],
        "kind": [{**ROB_TASK, "kind": "shell"}],
        "attack": [{**ROB_TASK, "id": "main.x__0.5__s0", "attack": "../../../x"}],
        "extra_key": [{**ROB_TASK, "command": "rm -rf"}],
    }
    for name, tasks in bad_plans.items():
        with pytest.raises(ConfigError, match="sweep.json"):
            sw.Sweep(plain_sweep(tmp_path / name, tasks))
    for name, jobs in {"job": {"../../x": [ROB_TASK["id"]]}, "task": {"123": ["../../errors/x"]}}.items():
        root = plain_sweep(tmp_path / f"jobs_{name}", [ROB_TASK], [{"time": 0, "executor": "slurm", "jobs": jobs}])
        with pytest.raises(ConfigError, match=f"jobs.json: {name} id .* is not a valid id"):
            sw.task_states(sw.Sweep(root))
    with pytest.raises(ConfigError, match="not a valid id"):
        ok.error_path("a/b")
    assert not (tmp_path / "errors").exists()


def _record_many(root: str, n: int) -> None:
    sweep = sw.Sweep(root)
    for i in range(n):
        sweep.record({"time": i, "executor": "local", "jobs": {str(os.getpid() * 1000 + i): [ROB_TASK["id"]]}})


def test_jobs_json_updates_are_locked(tmp_path):
    """Submitters recording at once (two `awenc sweep resume`, say) lose no submission: jobs.json.lock serialises them."""
    import multiprocessing

    root = plain_sweep(tmp_path / "s", [ROB_TASK])
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(str(root), 15)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    subs = sw.Sweep(root).submissions()
    assert len(subs) == 60 and len({next(iter(s["jobs"])) for s in subs}) == 60
    assert (root / "jobs.json.lock").exists() and not list(root.glob(".jobs.json.*"))


def test_scheduler_states_ask_sacct_for_purged_jobs(tmp_path, monkeypatch):
    from dist_awenc.launch.cluster import scheduler_states

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '100_0|RUNNING'\necho '100_[3-9%2]|PENDING'\n")
    (bin_dir / "sacct").write_text("#!/bin/sh\necho '100_0|PENDING'\necho '100_1|OUT_OF_MEMORY'\necho '100_2|CANCELLED by 1000'\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    states = scheduler_states(["100_0", "100_1", "100_2"])
    assert states == {"100_0": "RUNNING", "100_1": "OUT_OF_MEMORY", "100_2": "CANCELLED"}  # squeue wins where it knows


def test_a_job_failing_outside_its_tasks_names_the_cause(tmp_path):
    """SweepJob failing before its first task (here: the sweep's config.yaml is gone) writes errors/<id>.json, which
    status reads, since it never opens submitit's result pickle."""
    from dist_awenc.launch.jobs import SweepJob

    root = plain_sweep(tmp_path / "s", [ROB_TASK, NULL_TASK])
    with pytest.raises(ConfigError, match="does not exist"):
        SweepJob()(str(root), [ROB_TASK["id"], NULL_TASK["id"]])
    states = sw.task_states(sw.Sweep(root))
    assert {s.state for s in states.values()} == {"failed"}
    assert all("config.yaml' does not exist" in s.error for s in states.values())


def test_status_and_collect_import_nothing_heavy(tmp_path):
    """`awenc sweep status|collect` (--dir or --config) in a fresh interpreter: no torch, submitit or plotting."""
    root = plain_sweep(tmp_path / "runs" / "sweep_tiny", [ROB_TASK, NULL_TASK],
                       [{"time": 0, "executor": "local", "jobs": {"999999999": [ROB_TASK["id"], NULL_TASK["id"]]}}])
    (root / "null").mkdir()
    (root / "null" / "simclr_w8_group_s0.json").write_text(json.dumps({"encoder": "/x/e.safetensors", "run_dir": "/x"}))
    code = f"""
import json, sys, time
start = time.perf_counter()
from dist_awenc.cli import main

rc = [main(["sweep", "status", "--dir", {str(root)!r}]),
      main(["sweep", "status", "--config", {str(TINY)!r}, "run.out_dir={tmp_path / 'runs'}", "encoder=x"]),
      main(["sweep", "collect", "--dir", {str(root)!r}])]
heavy = sorted(m for m in ("torch", "submitit", "cloudpickle", "numpy", "sklearn", "matplotlib", "pyarrow", "accelerate")
               if m in sys.modules)
print(json.dumps({{"rc": rc, "heavy": heavy, "seconds": time.perf_counter() - start}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [], report
    assert report["rc"] == [1, 1, 1]  # the robustness task's job ended without a result: failed
    assert "local job 999999999 ended without a result" in out.stdout
    assert json.loads((root / "summary.json").read_text())["counts"]["done"] == 1


def test_status_config_names_the_folder_the_schema_names(tmp_path):
    """`status/collect --config` read only `run` (no schema, no torch): the same folder as the full config, and
    unknown keys are still refused."""
    from dist_awenc.config import RunSection

    assert sw.RUN_KEYS == tuple(f.name for f in dataclasses.fields(RunSection)) and RunSection().out_dir == sw.RUN_OUT_DIR
    assert tuple(f.name for f in dataclasses.fields(sw.SweepConfig)) == sw.SECTIONS
    for path, extra in [(TINY, []), (REPO / "configs" / "sweep" / "digits.yaml", []), (None, []),
                        (TINY, [f"run.out_dir={tmp_path}", "run.name=other", "grid.seeds=[3]"]), (TINY, ["run.name=12"])]:
        full = sw.sweep_dir_of(load_config(sw.SweepConfig, path, extra))
        assert sw.folder_of_config(str(path) if path else None, extra) == full
    for bad, match in [(["run.nmae=x"], "unknown config key 'run.nmae'"), (["bogus=1"], "unknown config key 'bogus'"),
                       (["run.name"], "not of the form key.sub=value")]:
        with pytest.raises(ConfigError, match=match):
            sw.folder_of_config(str(TINY), bad)
    with pytest.raises(ConfigError, match="does not exist"):
        sw.folder_of_config(str(tmp_path / "nope.yaml"))


# ------------------------------------------------------------------ without SLURM


def test_null_population_lands_where_calibrate_reuses_it(tmp_path, monkeypatch):
    """Null encoders pre-trained by a sweep are the very runs `awenc calibrate` (same config, same directory)
    reuses, even when the sweep is resumed from another directory."""
    from dist_awenc.config import to_yaml
    from dist_awenc.runs import run_dir_of, status
    from dist_awenc.stages.calibrate import null_encoder_configs

    monkeypatch.chdir(tmp_path)
    Path("null.yaml").write_text(yaml.safe_dump({
        "run": {"name": "cal", "out_dir": "runs"}, "data": {"image_size": 8},
        "population": {"methods": ["simclr"], "archs": ["tiny:8"], "attacks": [], "owner_budget": False, "seeds": 1, "n_secrets": 1},
        "encoder": {"proj_hidden_dim": 32, "proj_dim": 16},
        "pretrain": {"epochs": 1, "max_steps": 4, "batch_size": 64, "checkpoint_every": 2, "progress": False}}))
    cfg = load_config(sw.SweepConfig, None, ["null_population=null.yaml", "run.out_dir=runs", "run.name=nulls"])
    sweep = sw.Sweep(sw.prepare(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    sw.resume(sweep, executor="debug")
    assert [t.state for t in sw.task_states(sweep).values()] == ["done"]
    monkeypatch.chdir(tmp_path)
    ccfg = load_config(CalibrateConfig, "null.yaml")
    (pcfg,) = null_encoder_configs(ccfg, run_dir_of(ccfg) / "population")
    assert (run_dir_of(pcfg) / "config.yaml").read_text() == to_yaml(pcfg)  # what reuse_or_run compares
    assert status(run_dir_of(pcfg))["state"] == "complete"
    assert not (elsewhere / "runs").exists()


def test_debug_executor_failure_collect_resume(owner, tmp_path, monkeypatch, capsys):
    """In-process: a failing task is named with its error, the rest are kept; resume reruns only it."""
    cfg = tiny_sweep(owner, tmp_path, *SMALL_GRID)
    bad = "main.prune_global__0.8__s1"
    monkeypatch.setenv(sw.FAIL_ENV, bad)
    sweep = sw.run(cfg, executor="debug")
    states = sw.task_states(sweep)
    assert {t.id for t in states.values() if t.state == "failed"} == {bad}
    assert sum(t.state == "done" for t in states.values()) == 7
    summary = json.loads((sweep.root / "summary.json").read_text())
    assert list(summary["failed"]) == [bad] and "injected failure" in summary["failed"][bad]
    assert len(rows_of(sweep.root / "sweep.csv")) == 7
    assert sw.sweep_command("collect", directory=str(sweep.root)) == 1  # failures: exit code 1
    assert f"failed {bad}: RuntimeError: injected failure" in capsys.readouterr().out
    kept = {p.name: p.stat().st_mtime_ns for p in (sweep.root / "targets" / "main" / "tasks").iterdir()}
    monkeypatch.delenv(sw.FAIL_ENV)
    sw.resume(sweep, executor="debug")
    assert sweep.submissions()[-1]["jobs"] == {next(iter(sweep.submissions()[-1]["jobs"])): [bad]}
    after = {p.name: p.stat().st_mtime_ns for p in (sweep.root / "targets" / "main" / "tasks").iterdir()}
    assert {k: v for k, v in after.items() if k in kept} == kept and len(after) == 8
    assert not (sweep.root / "errors" / f"{bad}.json").exists()
    assert sw.sweep_command("status", directory=str(sweep.root)) == 0
    # collect is idempotent
    first = {n: (sweep.root / n).read_bytes() for n in ("sweep.csv", "summary.json", "failures.json")}
    sw.collect(sweep)
    assert first == {n: (sweep.root / n).read_bytes() for n in first}
    import pyarrow.parquet as pq

    table = pq.read_table(sweep.root / "sweep.parquet")
    assert table.num_rows == 8 and str(table.schema.field("decision_whitebox").type) == "bool"
    assert str(table.schema.field("p_whitebox").type) == "double" and table.column("target").to_pylist() == ["main"] * 8


def test_local_executor_gives_the_robustness_table(owner, tmp_path):
    """A laptop without SLURM: submitit's local executor fills the same folder; the table is `awenc robustness`'s."""
    cfg = tiny_sweep(owner, tmp_path, *SMALL_GRID)
    sweep = sw.run(cfg, executor="local")  # waits and collects
    assert len(sweep.submissions()) == 2  # array_parallelism=2 processes share the 8 tasks
    assert all(t.state == "done" for t in sw.task_states(sweep).values())
    one = robustness_on_one_machine(TINY, tmp_path / "single", SMALL_GRID + [f"encoder={owner[0]}", f"secret={owner[1]}"])
    assert rows_of(sweep.root / "targets" / "main" / "robustness.csv") == rows_of(one)
    sweep_rows = rows_of(sweep.root / "sweep.csv", drop=("attack_seconds", "target"))
    assert sweep_rows == rows_of(one)
    assert sw.run(cfg, executor="local").submissions() == sweep.submissions()  # nothing left to submit


# ------------------------------------------------------------------ a real SLURM


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A SLURM controller to submit to: the running one, or a single-node one started here and stopped after."""
    if slurm_available():
        yield os.environ.get("SLURM_CONF", "")
        return
    why = ""
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        why = "slurm-wlm is not installed (apt-get install -y --no-install-recommends slurm-wlm)"
    elif os.geteuid() != 0:
        why = "starting a local SLURM (scripts/slurm_local.sh) needs root"
    if why:
        if os.environ.get("AWENC_REQUIRE_SLURM"):
            pytest.fail(f"AWENC_REQUIRE_SLURM is set but no SLURM can be started: {why}")
        pytest.skip(f"no SLURM here: {why}")
    d = tmp_path_factory.mktemp("slurm")
    script = REPO / "scripts" / "slurm_local.sh"
    out = subprocess.run(["bash", str(script), "start", str(d)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        subprocess.run(["bash", str(script), "stop", str(d)], capture_output=True, timeout=60)
        msg = f"scripts/slurm_local.sh start failed: {out.stderr.strip() or out.stdout.strip()}"
        if os.environ.get("AWENC_REQUIRE_SLURM"):
            pytest.fail(msg)
        pytest.skip(msg)
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(d / "slurm.conf"))
    # a SIGTERM (CI timeout, kill) unwinds like Ctrl-C, so the daemons below are still stopped
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield str(d / "slurm.conf")
    finally:
        signal.signal(signal.SIGTERM, previous)
        subprocess.run(["scancel", "--user", str(os.getuid())], capture_output=True, timeout=30)
        mp.undo()
        subprocess.run(["bash", str(script), "stop", str(d)], capture_output=True, timeout=60)


def _submitter(cfg_path: Path, overrides: list[str], env: dict) -> subprocess.Popen:
    """`awenc sweep run --executor slurm --wait` as its own process (to be killed after submission)."""
    code = ("import sys; from dist_awenc.launch.sweep import sweep_command; "
            "sweep_command('run', sys.argv[1], sys.argv[2:], executor='slurm', wait_for=True)")
    return subprocess.Popen([sys.executable, "-c", code, str(cfg_path), *overrides], env=env, cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slurm
def test_slurm_grid_failure_resume_and_the_single_machine_table(owner, slurm_cluster, tmp_path, monkeypatch):
    """>= 40 tasks as real SLURM arrays (parallelism 2, split to MaxArraySize); killing `awenc sweep` after
    submission loses nothing; one failing task is named and alone resubmitted; the table equals `awenc robustness`."""
    f0, secret = owner
    overrides = [f"encoder={f0}", f"secret={secret}", f"run.out_dir={tmp_path}", "slurm.max_array_size=3"]
    cfg = load_config(sw.SweepConfig, TINY, overrides)
    n = len(sw.expand(cfg))
    assert n >= 40
    bad = "main.prune_global__0.5__s1"
    proc = _submitter(TINY, overrides, {**os.environ, sw.FAIL_ENV: bad})
    root = tmp_path / "sweep_tiny"
    deadline = time.time() + HANG_GUARD_S  # a hang guard (submission takes seconds), never a speed check
    while time.time() < deadline:
        if (root / "jobs.json").exists() and sum(len(ids) for s in sw.Sweep(root).submissions()
                                                 for ids in s["jobs"].values()) == n:
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    proc.kill()  # `awenc sweep` dies right after submitting: the jobs go on
    proc.wait(timeout=30)
    sweep = sw.Sweep(root)
    subs = sweep.submissions()
    per_job = cfg.slurm.tasks_per_job
    elements = -(-n // per_job)
    assert elements > 3 and [len(s["jobs"]) for s in subs] == [3] * (elements // 3) + ([elements % 3] if elements % 3 else [])
    script = (sweep.logs / subs[0]["array"] / f"{subs[0]['array']}_submission.sh").read_text()
    assert "#SBATCH --array=0-2%2" in script and "#SBATCH --cpus-per-task=1" in script
    # jobs get the sweep folder and task ids, nothing else: submitit's pickles stay tiny
    assert max(p.stat().st_size for p in sweep.logs.rglob("*_submitted.pkl")) < 2048
    states = sw.wait(sweep, poll_s=2, timeout_s=2 * HANG_GUARD_S)  # ~45 s on 2 cores; a hang guard only
    assert {t.id for t in states.values() if t.state == "failed"} == {bad}
    assert sum(t.state == "done" for t in states.values()) == n - 1
    summary = sw.collect(sweep)
    assert summary["failed"][bad].startswith("RuntimeError: injected failure")
    assert [f["id"] for f in json.loads((root / "failures.json").read_text())] == [bad]
    assert len(rows_of(root / "sweep.csv")) == n - 1
    tasks_dir = root / "targets" / "main" / "tasks"
    kept = {p.name: p.stat().st_mtime_ns for p in tasks_dir.iterdir()}
    # resume (the failure no longer injected) resubmits only that task
    monkeypatch.delenv(sw.FAIL_ENV, raising=False)
    sw.resume(sweep, executor="slurm", wait_for=True)
    last = sweep.submissions()[-1]
    assert list(last["jobs"].values()) == [[bad]]
    after = {p.name: p.stat().st_mtime_ns for p in tasks_dir.iterdir()}
    assert {k: v for k, v in after.items() if k in kept} == kept and len(after) == n
    assert json.loads((root / "summary.json").read_text())["failed"] == {}
    # collect is idempotent
    first = {p: (root / p).read_bytes() for p in ("sweep.csv", "summary.json", "failures.json",
                                                  "targets/main/robustness.csv", "targets/main/robustness.json")}
    assert sw.sweep_command("collect", directory=str(root)) == 0
    assert first == {p: (root / p).read_bytes() for p in first}
    # the same grid and seeds on one machine give the same table
    one = robustness_on_one_machine(TINY, tmp_path / "single", [f"encoder={f0}", f"secret={secret}"])
    assert rows_of(root / "targets" / "main" / "robustness.csv") == rows_of(one)
    assert len(rows_of(one)) == n


TIMEOUT_TEST = "test_slurm_timeout_requeues_pretraining_and_resumes_from_its_checkpoint"


@pytest.fixture(scope="module")
def timeout_job(slurm_cluster, tmp_path_factory):
    """A null-population pre-training task with a 1-minute limit, submitted to SLURM (checked by TIMEOUT_TEST)."""
    from accelerate.state import AcceleratorState

    from dist_awenc.ssl.pretrain import pretrain

    tmp_path = tmp_path_factory.mktemp("timeout")
    # steps for about 50 s of work at this machine's speed, so the first run surely meets its time limit: with
    # signal_delay_s=20, slurmctld sends USR2 10-40 s into a 1-minute job (it checks limits every 30 s)
    AcceleratorState._reset_state(reset_partial_state=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the job (slurm.cpus_per_task=1)
    try:
        speed = {"train.max_steps": 200, "train.epochs": 100, "train.checkpoint_every": 50}
        pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "speed", **speed)))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
    times = [json.loads(line)["time"] for line in (tmp_path / "speed" / "metrics.jsonl").read_text().splitlines()]
    per_step = (times[-1] - times[0]) / (len(times) - 1)
    steps = 50 * int(min(1000, max(20, 50 / per_step / 50)))
    every = int(max(20, 2.0 / per_step))
    null = tmp_path / "null.yaml"
    null.write_text(yaml.safe_dump({
        "run": {"name": "cal", "out_dir": str(tmp_path)}, "data": {"image_size": 8},
        "population": {"methods": ["simclr"], "archs": ["tiny:8"], "attacks": [], "owner_budget": False, "seeds": 1, "n_secrets": 1},
        "encoder": {"proj_hidden_dim": 32, "proj_dim": 16},
        "pretrain": {"epochs": 100000, "max_steps": steps, "batch_size": 64, "checkpoint_every": every,
                     "log_every": 50, "keep_checkpoints": 2, "progress": False},
    }))
    cfg = load_config(sw.SweepConfig, None, [f"run.out_dir={tmp_path}", "run.name=timeout", f"null_population={null}",
                                             "slurm.time_min=1", "slurm.signal_delay_s=20", "slurm.max_requeues=10",
                                             "slurm.mem_gb=1"])
    sweep = sw.run(cfg, executor="slurm", wait_for=False)
    (tid,) = sweep.tasks
    job = next(iter(sweep.submissions()[0]["jobs"]))  # one task: a plain job, no array
    return {"sweep": sweep, "tid": tid, "job": job, "steps": steps, "logs": sweep.logs / job,
            "run_dir": tmp_path / "cal" / "population" / "simclr_tiny8_group_s0"}


@pytest.fixture(scope="module", autouse=True)
def _the_timeout_job_runs_beside_the_other_tests(request):
    """Submit TIMEOUT_TEST's job when the module starts, where a SLURM is already running (as in CI) and that test
    is selected: its minute of waiting for the time limit then overlaps the tests before it (the test that checks
    it comes last in this file). Elsewhere the test submits it itself."""
    if slurm_available() and any(item.name == TIMEOUT_TEST for item in request.session.items):
        request.getfixturevalue("timeout_job")


@pytest.mark.slurm
def test_slurm_stage_job_and_sbatch_template_run_accelerate_launch(slurm_cluster, tmp_path):
    """`awenc submit` (submitit, one task per node) and slurm/accelerate_multinode.sbatch both run a stage through
    `accelerate launch` in a real SLURM job; a refused submission is one line naming SLURM's reason."""
    from dist_awenc.errors import AwencError
    from dist_awenc.launch.cluster import SlurmSection, max_array_size
    from dist_awenc.launch.submit import submit_stage, wait_stage

    slurm = SlurmSection(time_min=10, mem_gb=1)
    rec = submit_stage("pretrain", None, tiny_overrides(tmp_path, "via_submitit"), executor="slurm", slurm=slurm)
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G",
                          "--time=10", f"--output={tmp_path}/template.out", str(REPO / "slurm" / "accelerate_multinode.sbatch"),
                          "pretrain", *tiny_overrides(tmp_path, "via_sbatch")],
                         env={**os.environ, "AWENC_PYTHON": sys.executable}, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    state = wait_stage(rec["run_dir"], poll_s=1, timeout_s=2 * HANG_GUARD_S)  # ~20 s usually
    assert state["state"] == "done", state
    log = (tmp_path / "via_submitit" / "slurm" / rec["job"] / f"{rec['job']}_0_log.out").read_text()
    assert "accelerate.commands.launch" in log and "--num_cpu_threads_per_process 1" in log
    deadline = time.time() + 2 * HANG_GUARD_S
    while json.loads((tmp_path / "via_sbatch" / "status.json").read_text() if (tmp_path / "via_sbatch" / "status.json").exists()
                     else "{}").get("state") != "complete":
        assert time.time() < deadline, (tmp_path / "template.out").read_text()[-3000:]
        time.sleep(1)
    for name in ("via_submitit", "via_sbatch"):
        assert (tmp_path / name / "encoder.safetensors").exists()
    assert max_array_size() == int(os.environ.get("AWENC_SLURM_MAX_ARRAY_SIZE", "1001"))  # read from scontrol
    with pytest.raises(AwencError, match="sbatch refused the job: .*partition"):
        submit_stage("pretrain", None, tiny_overrides(tmp_path, "refused"), executor="slurm",
                     slurm=SlurmSection(partition="no_such_partition", mem_gb=1))


@pytest.mark.slurm
def test_sbatch_template_on_two_tasks_standing_in_for_two_nodes_equals_one_process(slurm_cluster, tmp_path):
    """slurm/accelerate_multinode.sbatch's srun path with two tasks (machine ranks 0 and 1, one gloo process each)
    ends with the weights of one process on the same global batch; only machine 0 writes."""
    from safetensors.torch import load_file

    from dist_awenc.ssl.pretrain import pretrain

    one = pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "one")))
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--gpus-per-node=0",
                          "--cpus-per-task=1", "--mem=1G", "--time=10", f"--output={tmp_path}/two.out",
                          str(REPO / "slurm" / "accelerate_multinode.sbatch"), "pretrain", *tiny_overrides(tmp_path, "two")],
                         env={**os.environ, "AWENC_PYTHON": sys.executable, "GLOO_SOCKET_IFNAME": "lo"}, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    status = tmp_path / "two" / "status.json"
    deadline = time.time() + 2 * HANG_GUARD_S  # ~30 s usually
    while json.loads(status.read_text() if status.exists() else "{}").get("state") != "complete":
        assert time.time() < deadline, (tmp_path / "two.out").read_text()[-3000:] if (tmp_path / "two.out").exists() else ""
        time.sleep(1)
    log = (tmp_path / "two.out").read_text()
    assert "2 machine(s) x 1 process(es)" in log and log.count("encoder ->") == 1  # machine 0 alone writes
    a, b = load_file(str(one)), load_file(str(tmp_path / "two" / "encoder.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slurm
@pytest.mark.numerics
def test_a_preemption_signal_saves_requeues_and_resumes_bit_for_bit(slurm_cluster, tmp_path):
    """USR1 to slurm/accelerate_multinode.sbatch's batch shell (`scancel --signal=USR1 --batch`, what
    --signal=B:USR1@300 does before the limit) and USR2 to an `awenc submit` job's step (submitit's signal): each
    training saves at its next step (no periodic checkpoint falls there), the job requeues itself, resumes from that
    step and ends with the weights of an uninterrupted run (#31)."""
    from dist_awenc.engine.loop import checkpoints
    from dist_awenc.launch.cluster import SlurmSection
    from dist_awenc.launch.submit import submit_stage
    from dist_awenc.ssl.pretrain import pretrain

    long = {"train.max_steps": 300, "train.epochs": 100, "train.checkpoint_every": 1000, "train.log_every": 1}
    out = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G",
                          "--time=10", f"--output={tmp_path}/template.out", str(REPO / "slurm" / "accelerate_multinode.sbatch"),
                          "pretrain", *tiny_overrides(tmp_path, "via_sbatch", **long)],
                         env={**os.environ, "AWENC_PYTHON": sys.executable}, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    jobs = {"via_sbatch": out.stdout.strip().split(";")[0]}
    rec = submit_stage("pretrain", None, tiny_overrides(tmp_path, "via_submitit", **long), executor="slurm",
                       slurm=SlurmSection(time_min=10, mem_gb=1))
    jobs["via_submitit"] = rec["job"]

    def steps_logged(name: str) -> int:
        p = tmp_path / name / "metrics.jsonl"
        return len(p.read_text().splitlines()) if p.exists() else 0

    def log(name: str) -> str:
        files = [tmp_path / "template.out"] if name == "via_sbatch" else \
            sorted((tmp_path / name / "slurm" / jobs[name]).glob("*_log.*"))
        return "".join(p.read_text() for p in files if p.exists())

    deadline = time.time() + 2 * HANG_GUARD_S  # a hang guard only
    for name, how in (("via_sbatch", ["--signal=USR1", "--batch"]), ("via_submitit", ["--signal=USR2"])):
        while steps_logged(name) < 2:  # training, its handlers installed
            assert time.time() < deadline, log(name)[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", *how, jobs[name]], check=True, capture_output=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the jobs (one CPU each)
    try:
        reference = pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "uninterrupted", **long)))
    finally:
        torch.set_num_threads(threads)
    for name in jobs:
        status = tmp_path / name / "status.json"
        while json.loads(status.read_text() if status.exists() else "{}").get("state") != "complete":
            assert time.time() < deadline, log(name)[-3000:]
            time.sleep(1)
        starts = json.loads((tmp_path / name / "engine.json").read_text())["starts"]
        assert [s["slurm_restart"] for s in starts] == [0, 1], (name, log(name)[-3000:])
        step = starts[1]["start_step"]
        assert 2 <= step < 300 and f"(step {step})" in log(name)  # resumed from the step the signal saved
        assert [p.name for p in checkpoints(tmp_path / name)] == [f"step_{step:08d}", "step_00000300"]
        logged = [json.loads(x)["step"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert logged == list(range(1, 301))
        a, b = weights(reference), weights(tmp_path / name / "encoder.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_cli_sweep(owner, tmp_path, capsys):
    """`awenc sweep run|status|collect` through the CLI."""
    from dist_awenc.cli import main

    f0, secret = owner
    argv = ["sweep", "run", "--config", str(TINY), "--executor", "debug", f"encoder={f0}", f"secret={secret}",
            f"run.out_dir={tmp_path}", *SMALL_GRID]
    assert main(argv) == 0
    root = tmp_path / "sweep_tiny"
    assert len(rows_of(root / "sweep.csv")) == 8
    assert main(["sweep", "status", "--dir", str(root)]) == 0
    assert "8 done, 0 failed" in capsys.readouterr().out
    assert main(["sweep", "collect", "--config", str(TINY), f"encoder={f0}", f"secret={secret}",
                 f"run.out_dir={tmp_path}", *SMALL_GRID]) == 0
    capsys.readouterr()
    assert main(["sweep", "status", "--dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("awenc sweep: error:") and "not a sweep folder" in err and "\n" not in err


@pytest.mark.slurm
def test_slurm_timeout_requeues_pretraining_and_resumes_from_its_checkpoint(timeout_job):
    """A null-population pre-training task with a 1-minute limit: USR2 -> checkpoint() -> requeue -> it resumes."""
    sweep, tid, job, steps = timeout_job["sweep"], timeout_job["tid"], timeout_job["job"], timeout_job["steps"]
    run_dir, logs = timeout_job["run_dir"], timeout_job["logs"]

    def log() -> str:
        return "".join(p.read_text() for p in sorted(logs.glob(f"{job}_0_log.*"))) if logs.is_dir() else ""

    # once it has timed out and requeued with a checkpoint to resume from, give it the time to finish (as an
    # operator would): one timeout is the point, not one every 30 s
    deadline, extended = time.time() + 3 * HANG_GUARD_S, False  # ~65 s usually; a hang guard only
    while sw.task_states(sweep)[tid].state in ("pending", "running"):
        assert time.time() < deadline, log()[-3000:]
        if not extended and "Requeued job" in log() and any((run_dir / "checkpoints").glob("step_*")):
            subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], check=True, capture_output=True)
            extended = True
        time.sleep(1)
    assert sw.task_states(sweep)[tid].state == "done", sw.task_states(sweep)[tid]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    assert (run_dir / "encoder.safetensors").exists()
    text = log()
    assert "this job is timed-out" in text and "Requeued job" in text, text[-3000:]
    resumed = [int(line.rsplit("step ", 1)[1].rstrip(")")) for line in text.splitlines() if "resumed from" in line]
    assert resumed and resumed[-1] > 0, text[-3000:]  # it went on from a checkpoint, not from step 0
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == steps and min(logged) == 50  # one run folder, one schedule to the end
    info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    if info:  # still in slurmctld's memory
        assert "Restarts=0" not in info
