"""A prepared sweep folder (:class:`Sweep`): its tasks, its config, where each task's files go, its submissions."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dist_awenc.errors import ConfigError
from dist_awenc.files import atomic_write_text
from dist_awenc.launch.cluster import checked_id, locked
from dist_awenc.launch.sweep.plan import SWEEP_FORMAT, SweepTask, _schema, check_task


class Sweep:
    """A sweep folder: its config, its tasks, and where each task's files go.

    Everything read from the folder is checked before it names a path: task
    ids, target and null-encoder names (``sweep.json``), task and job ids
    (``jobs.json``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        plan = self.root / "sweep.json"
        if not plan.is_file():
            raise ConfigError(f"'{self.root}' is not a sweep folder (no sweep.json); start one with `awenc sweep run`")
        try:
            data = json.loads(plan.read_text())
        except ValueError as e:
            raise ConfigError(f"{plan}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ConfigError(f"{plan}: unknown format {found!r}, expected {SWEEP_FORMAT}")
        self.cwd = data.get("cwd") or os.getcwd()  # where relative paths of the null population's config point
        self.tasks: dict[str, SweepTask] = {}
        for t in data.get("tasks") or []:
            try:
                t = dict(t)
                tid = t.pop("id")
                task = SweepTask(**t)
            except (TypeError, ValueError, KeyError):
                raise ConfigError(f"{plan}: a task entry is not a sweep task: {str(t)[:200]}") from None
            check_task(task, tid, plan)
            self.tasks[tid] = task
        self._config: Any = None

    @property
    def config(self) -> SweepConfig:
        """The sweep's config (imports the schemas, and with them torch)."""
        if self._config is None:
            from dist_awenc.config import load_config

            self._config = load_config(_schema(), self.root / "config.yaml")
        return self._config

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def targets(self) -> list[str]:
        """The watermarked encoders' names, in plan order."""
        return list(dict.fromkeys(t.target for t in self.tasks.values() if t.kind == "robustness"))

    def target_dir(self, target: str) -> Path:
        return self.root / "targets" / target

    def result_path(self, task_id: str) -> Path:
        task = self.tasks[task_id]
        if task.kind == "null":
            return self.root / "null" / f"{task.name}.json"
        # a robustness task's id is <target>.<the robustness task's id> (checked when the plan was read)
        return self.target_dir(task.target) / "tasks" / f"{task_id[len(task.target) + 1:]}.json"

    def error_path(self, task_id: str) -> Path:
        return self.root / "errors" / f"{checked_id(task_id, 'task id', self.root / 'errors')}.json"

    def done(self, task_id: str) -> bool:
        return self.result_path(task_id).exists()

    def submissions(self) -> list[dict]:
        p = self.root / "jobs.json"
        if not p.exists():
            return []
        try:
            subs = json.loads(p.read_text())["submissions"]
            for sub in subs:
                for job_id, ids in sub["jobs"].items():
                    checked_id(job_id, "job id", p)
                    for i in ids:
                        checked_id(i, "task id", p)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"{p}: not a list of submissions ({type(e).__name__}: {e})") from None
        return subs

    def record(self, submission: dict) -> None:
        """Append a submission to jobs.json; the read-modify-write holds jobs.json.lock (concurrent submitters)."""
        p = self.root / "jobs.json"
        with locked(p):
            subs = self.submissions() + [submission]
            atomic_write_text(p, json.dumps({"submissions": subs}, indent=1))

    def latest_jobs(self) -> dict[str, tuple[str, str]]:
        """Task id -> (job id, executor) of its latest submission."""
        out: dict[str, tuple[str, str]] = {}
        for sub in self.submissions():
            for job_id, ids in sub["jobs"].items():
                for i in ids:
                    out[i] = (job_id, sub["executor"])
        return out
