"""Reading a sweep or run folder never unpickles anything (issue #14).

submitit leaves ``<job>_0_result.pkl`` beside each job's logs. Whoever can
write a shared sweep folder could plant one whose unpickling runs code as the
user who reads the folder; `awenc sweep status`, `collect` and `awenc submit
--wait` must derive job outcomes from text only: the task result and error
files, squeue/sacct states and the job's stderr log.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from dist_awenc.launch import sweep as sw

JOB = "999999999"  # a local job (its id is a PID) that no longer runs: above any pid_max
SLURM_JOB = "4242_0"
ROB = "main.prune_global__0.5__s0"
BASE = "main.none__0__s0"
NULL = "null.simclr_w8_group_s0"
LOG_ERR = """\
submitit INFO (2026-01-01 00:00:00,000) - Starting with JobEnvironment(job_id=999999999, hostname=n1)
submitit ERROR (2026-01-01 00:00:01,000) - Submitted job triggered an exception
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "/x/submitit/core/_submit.py", line 11, in <module>
    submitit_main()
RuntimeError: CUDA out of memory on the job's GPU
srun: error: n1: task 0: Exited with exit code 1
"""


class Plant:
    """Unpickling this creates ``path``: what a planted result pickle could do (run any code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def planted_pickle(marker: Path) -> bytes:
    return pickle.dumps(("error", Plant(marker)))


def test_the_planted_pickle_would_run_code(tmp_path):
    """The payload works: whoever unpickles it creates the file (so the tests below prove something)."""
    control = tmp_path / "control"
    status, f = pickle.loads(planted_pickle(control))
    f.close()
    assert status == "error" and control.exists()


def make_sweep(root: Path, marker: Path, executor: str = "local", job: str = JOB) -> sw.Sweep:
    """A sweep folder as `awenc sweep run` leaves it (no torch needed): one task done, one failed with its
    error file, two whose job ended without either; every job's log folder holds a planted result pickle."""
    tasks = [
        {"id": NULL, "kind": "null", "target": "", "attack": "", "strength": 0.0, "seed": 0, "name": "simclr_w8_group_s0"},
        {"id": BASE, "kind": "robustness", "target": "main", "attack": "none", "strength": 0.0, "seed": 0, "name": ""},
        {"id": ROB, "kind": "robustness", "target": "main", "attack": "prune_global", "strength": 0.5, "seed": 0, "name": ""},
    ]
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"format": sw.SWEEP_FORMAT, "cwd": str(root), "tasks": tasks}))
    (root / "targets" / "main" / "tasks").mkdir(parents=True)
    (root / "null").mkdir()
    (root / "null" / "simclr_w8_group_s0.json").write_text(json.dumps({"encoder": "/x/encoder.safetensors", "run_dir": "/x"}))
    (root / "errors").mkdir()
    (root / "errors" / f"{BASE}.json").write_text(json.dumps({"id": BASE, "error": "ValueError: bad strength", "job": job}))
    (root / "jobs.json").write_text(json.dumps({"submissions": [{"time": 0, "executor": executor,
                                                                  "jobs": {job: [NULL, BASE, ROB]}}]}))
    logs = root / "logs" / job
    logs.mkdir(parents=True)
    (logs / f"{job}_0_result.pkl").write_bytes(planted_pickle(marker))
    (logs / f"{job}_0_log.err").write_text(LOG_ERR)
    return sw.Sweep(root)


def test_sweep_status_and_collect_never_unpickle_a_result(tmp_path, capsys):
    marker = tmp_path / "pwned"
    sweep = make_sweep(tmp_path / "sweep", marker)
    states = sw.task_states(sweep)
    assert {t: s.state for t, s in states.items()} == {NULL: "done", BASE: "failed", ROB: "failed"}
    assert states[BASE].error == "ValueError: bad strength"  # the task's own error file
    # a job that ended without a result or error file: the exception line of its stderr log
    assert states[ROB].error == f"local job {JOB} ended without a result: RuntimeError: CUDA out of memory on the job's GPU"
    assert sw.sweep_command("status", directory=str(sweep.root)) == 1
    assert sw.sweep_command("collect", directory=str(sweep.root)) == 1
    out = capsys.readouterr().out
    assert f"failed {ROB}: local job {JOB} ended without a result: RuntimeError: CUDA out of memory" in out
    failures = {f["id"]: f["error"] for f in json.loads((sweep.root / "failures.json").read_text())}
    assert set(failures) == {BASE, ROB}
    assert json.loads((sweep.root / "summary.json").read_text())["null_encoders"] == {"simclr_w8_group_s0": "/x/encoder.safetensors"}
    assert not marker.exists()


def test_without_a_log_the_failure_points_at_the_logs(tmp_path):
    marker = tmp_path / "pwned"
    sweep = make_sweep(tmp_path / "sweep", marker)
    (sweep.logs / JOB / f"{JOB}_0_log.err").unlink()
    err = sw.task_states(sweep)[ROB].error
    assert err.startswith(f"local job {JOB} ended without a result (killed, cancelled, out of memory or time?); see ")
    assert not marker.exists()


def test_slurm_job_states_come_from_the_scheduler_not_the_pickle(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    sweep = make_sweep(tmp_path / "sweep", marker, executor="slurm", job=SLURM_JOB)
    (sweep.logs / SLURM_JOB / f"{SLURM_JOB}_0_log.err").unlink()
    monkeypatch.setattr(sw.report, "scheduler_states", lambda ids: {SLURM_JOB: "OUT_OF_MEMORY"})
    err = sw.task_states(sweep)[ROB].error
    assert err.startswith(f"job {SLURM_JOB} ended OUT_OF_MEMORY without a result")
    monkeypatch.setattr(sw.report, "scheduler_states", lambda ids: {SLURM_JOB: "RUNNING"})
    assert sw.task_states(sweep)[ROB].state == "running"
    assert not marker.exists()


def test_submit_wait_never_unpickles_a_result(tmp_path):
    """`awenc submit --wait` (wait_stage / stage_state): the run folder's status.json and the job's log, as text."""
    from dist_awenc.launch.submit import stage_state, wait_stage

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "f0"
    logs = run_dir / "slurm" / JOB
    logs.mkdir(parents=True)
    (run_dir / "slurm" / "jobs.json").write_text(json.dumps({"submissions": [{"executor": "local", "job": JOB}]}))
    (logs / f"{JOB}_0_result.pkl").write_bytes(planted_pickle(marker))
    (run_dir / "status.json").write_text(json.dumps({"stage": "pretrain", "state": "failed", "error": "ConfigError: no data"}))
    assert stage_state(run_dir) == {"state": "failed", "job": JOB, "error": "ConfigError: no data"}
    (logs / f"{JOB}_0_log.err").write_text(LOG_ERR)
    st = wait_stage(run_dir, poll_s=0.01, timeout_s=5)
    assert st == {"state": "failed", "job": JOB, "error": "RuntimeError: CUDA out of memory on the job's GPU"}
    (run_dir / "status.json").write_text(json.dumps({"stage": "pretrain", "state": "complete"}))
    assert stage_state(run_dir)["state"] == "done"
    assert not marker.exists()


@pytest.mark.parametrize("log, outcome", [
    (LOG_ERR, ("error", "RuntimeError: CUDA out of memory on the job's GPU")),
    ("submitit INFO - Job completed successfully\nsubmitit INFO - Exiting after successful completion\n", ("success", "")),
    # a requeued job's log holds the earlier attempt's failure, then the success: the last word counts
    (LOG_ERR + "submitit INFO - Job completed successfully\n", ("success", "")),
    ("submitit ERROR - Submitted job triggered an exception\n", ("error", "submitit ERROR - Submitted job triggered an exception")),
    ("some output\n", None),
])
def test_outcome_from_the_stderr_log(tmp_path, log, outcome):
    from dist_awenc.launch.cluster import submitit_outcome

    (tmp_path / JOB).mkdir()
    (tmp_path / JOB / f"{JOB}_0_log.err").write_text(log)
    assert submitit_outcome(tmp_path, JOB) == outcome
    assert submitit_outcome(tmp_path, "../" + JOB) is None  # never a path outside the log folder
