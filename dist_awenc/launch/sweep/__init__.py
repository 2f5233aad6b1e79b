"""``awenc sweep``: the robustness grid and the null population as SLURM job arrays (submitit).

    awenc sweep run     --config configs/sweep/<name>.yaml [key=value ...] [--executor slurm|local|debug] [--wait]
    awenc sweep status  --config ... | --dir runs/<name>
    awenc sweep collect --config ... | --dir runs/<name>
    awenc sweep resume  --config ... | --dir runs/<name> [--executor ...] [--wait]

A task is one robustness :class:`~dist_awenc.stages.robustness.Task` of one
watermarked encoder (a *target*): attack x strength x seed, verified in every
mode (the modes share the attacked encoder and the pirate's head, the costly
part), or one null-population encoder to pre-train for ``awenc calibrate``.
Jobs receive the sweep folder's path and task ids only; they read everything
else from the folder. Each task writes its own result file atomically; a
failing task writes ``errors/<id>.json`` from inside the job. Jobs are
checkpointable: at a timeout or preemption they requeue with the tasks that
have no result yet, and a pre-training task resumes from its last checkpoint.

The sweep folder (``<run.out_dir>/<run.name>/``)::

    config.yaml            the resolved sweep config (absolute paths); jobs read this, not the caller's file
    sweep.json             the expanded task list
    null.yaml              the null population's calibrate config, as written (relative to sweep.json's cwd)
    jobs.json              every submission (executor, job ids, each job's task ids), written right after it
    targets/<t>/tasks/<task>.json            robustness results (robustness.run_task)
    targets/<t>/robustness.{csv,json,png}    per-target collection, the same files `awenc robustness` writes
    null/<name>.json       a finished null encoder (its path; the run folder is the calibration's population/)
    errors/<id>.json       the error of a failed task
    logs/<job id>/         submitit's sbatch scripts, pickles and stdout/stderr
    sweep.csv, sweep.parquet, failures.json, summary.json    written by `collect`

Without SLURM the same folder is filled through submitit's local executor
(``array_parallelism`` processes at once) or, with ``--executor debug``, in
this process.

``status`` and ``collect`` read the folder without importing torch or
submitit: this module imports them (and the config schemas, which import
torch) only inside the functions that submit or run tasks, and
:class:`SweepConfig` is defined on first use. Task states come from the files
the tasks write (results, ``errors/<id>.json``), ``squeue``/``sacct`` and the
jobs' stderr logs; submitit's result pickles are never read. Task and job ids
read from the folder are checked before they become paths.

The package, one module per responsibility (none imports torch at import time)::

    plan.py     SweepConfig (defined on first use), targets, the task list, prepare()
    folder.py   Sweep: a prepared folder, its tasks and where their files go
    job.py      inside a job: run_tasks, errors/<id>.json; `python -m dist_awenc.launch.sweep work`
    submit.py   submission to SLURM arrays, local processes or this process
    report.py   task states, status, wait, collect
    command.py  `awenc sweep run|status|collect|resume`
"""
from __future__ import annotations

from typing import Any

from dist_awenc.launch.sweep.command import RUN_KEYS, RUN_OUT_DIR, folder_of_config, resume, run, sweep_command
from dist_awenc.launch.sweep.folder import Sweep
from dist_awenc.launch.sweep.job import FAIL_ENV, SweepTaskError, main, record_job_failure, run_tasks, work
from dist_awenc.launch.sweep.plan import (DEFAULT_NAME, MAIN_TARGET, SECTIONS, SWEEP_FORMAT, SweepTask, check_task,
                                          expand, null_config, null_pretrain_configs, prepare, resolved,
                                          robustness_config, sweep_dir_of, targets_of)
from dist_awenc.launch.sweep.report import STATES, TaskState, collect, counts, status, task_states, typed_columns, wait
from dist_awenc.launch.sweep.submit import submit

__all__ = ["DEFAULT_NAME", "FAIL_ENV", "MAIN_TARGET", "RUN_KEYS", "RUN_OUT_DIR", "SECTIONS", "STATES", "SWEEP_FORMAT",
           "Sweep", "SweepConfig", "SweepTask", "SweepTaskError", "TaskState", "check_task", "collect", "counts",
           "expand", "folder_of_config", "main", "null_config", "null_pretrain_configs", "prepare",
           "record_job_failure", "resolved", "resume", "robustness_config", "run", "run_tasks", "status", "submit",
           "sweep_command", "sweep_dir_of", "targets_of", "task_states", "typed_columns", "wait", "work"]


def __getattr__(name: str) -> Any:  # PEP 562: `sweep.SweepConfig` defines the schema (and imports torch) on first use
    if name == "SweepConfig":
        from dist_awenc.launch.sweep.plan import _schema

        return _schema()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
