"""What every suite shares: the run context, timing statistics, the JSON schema and the markdown table.

A suite file ``<out>/<suite>.json`` is::

    {"schema": "dist_awenc.benchmarks/1", "suite": "step", "device": "NVIDIA H100 80GB HBM3",
     "device_type": "cuda", "torch": "2.11.0", "cuda": "12.8", "quick": false,
     "created": "2026-11-27T06:00:00+00:00", "environment": {...},
     "rows": [{"name": ..., "status": "ok", "settings": {...},
               "images_per_s": {"median": ..., "min": ..., "max": ..., "n": ...},
               "reference_images_per_s": {...},   # step, e2e
               "ratio": 0.97,                     # step: median of per-block ratios; e2e: median / reference median
               "tflops": {...}, ...}]}

Rows with ``"kind": "aux"`` (e.g. the views alone in ``step``) carry only
``images_per_s``; the others carry their suite's fields (:data:`SUITE_REQUIRED`).
``health`` rows are checks: every row names its ``check`` (:data:`HEALTH_CHECKS`),
an ``ok`` row has a ``summary`` and may have no ``images_per_s``.
``status`` is ``ok`` or says why a row has no numbers (``skipped``,
``unsupported``, ``not installed``, ``failed``); a row that is not ``ok``
has ``null`` statistics and a ``note``. :func:`validate` checks a document.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

SCHEMA = "dist_awenc.benchmarks/1"
STATUSES = ("ok", "skipped", "unsupported", "not installed", "failed")
REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------- context


@dataclass
class Context:
    """How a suite runs: device, size profile, where results go, how long it may take."""

    device: torch.device
    quick: bool
    out_dir: Path
    threads: int
    max_seconds: Optional[float] = None  # per suite; rows past it are skipped
    started: float = field(default_factory=time.perf_counter)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and time.perf_counter() - self.started > self.max_seconds

    def restart_clock(self) -> None:
        self.started = time.perf_counter()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(device: torch.device) -> str:
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return slug(f"cpu {cpu_name()} {os.cpu_count()}c")


def environment(ctx: Context) -> dict[str, Any]:
    """What else shapes the numbers: library versions, threads, machine load."""
    import accelerate

    env = {
        "python": platform.python_version(),
        "accelerate": accelerate.__version__,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if ctx.on_gpu:
        env["cudnn"] = torch.backends.cudnn.version()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(ctx.device).total_memory / 2**30, 1)
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return env


# ----------------------------------------------------------------- statistics


def stats(values: Iterable[float]) -> Optional[dict[str, float]]:
    """``{"median", "min", "max", "n"}`` of repeated measurements (None if there are none)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def rates(seconds: Iterable[float], images: float) -> Optional[dict[str, float]]:
    """Images/s of each repetition (``images`` per repetition)."""
    return stats(images / s for s in seconds if s > 0)


def ratio(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
    if not a or not b or not b["median"]:
        return None
    return a["median"] / b["median"]


def scaled(s: Optional[dict], factor: float) -> Optional[dict]:
    if s is None:
        return None
    return {k: (v * factor if k != "n" else v) for k, v in s.items()}


class Clock:
    """Wall-clock seconds of a block, synchronising the device at both ends."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.seconds = 0.0

    def __enter__(self) -> "Clock":
        self.ctx.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.sync()
        self.seconds = time.perf_counter() - self.t0


def timed(ctx: Context, fn: Callable[[], Any]) -> float:
    with Clock(ctx) as c:
        fn()
    return c.seconds


# ----------------------------------------------------------------- rows and files


def row(name: str, settings: dict, *, status: str = "ok", note: str = "", **values: Any) -> dict:
    if status not in STATUSES:
        raise ValueError(f"unknown status {status!r}")
    out: dict[str, Any] = {"name": name, "status": status, "settings": settings, "images_per_s": None}
    if note:
        out["note"] = note
    out.update(values)
    return out


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


class SuiteWriter:
    """Collects a suite's rows and rewrites its JSON + markdown after every row (partial runs keep what they measured)."""

    def __init__(self, suite: str, ctx: Context, columns: list[tuple[str, str]], settings_keys: Optional[list[str]] = None) -> None:
        self.suite, self.ctx, self.columns, self.settings_keys = suite, ctx, columns, settings_keys
        self.rows: list[dict] = []
        self.doc = {
            "schema": SCHEMA,
            "suite": suite,
            "device": device_name(ctx.device),
            "device_type": ctx.device.type,
            "torch": torch.__version__,
            "cuda": torch.version.cuda if ctx.on_gpu else None,
            "quick": ctx.quick,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(ctx),
            "rows": self.rows,
        }

    @property
    def json_path(self) -> Path:
        return self.ctx.out_dir / f"{self.suite}.json"

    def add(self, r: dict) -> dict:
        self.rows.append(r)
        self.write()
        shown = {k: r.get(k) for k in ("images_per_s", "ratio") if r.get(k) is not None}
        median = (shown.get("images_per_s") or {}).get("median")
        extra = f" {median:,.1f} img/s" if median is not None else ""
        if shown.get("ratio") is not None:
            extra += f", ratio {shown['ratio']:.3f}"
        print(f"[{self.suite}] {r['name']}: {r['status']}{extra}{' (' + r['note'] + ')' if r.get('note') else ''}",
              file=sys.stderr, flush=True)
        return r

    def write(self) -> None:
        self.ctx.out_dir.mkdir(parents=True, exist_ok=True)
        self.doc["environment"]["load_avg_1m"] = environment(self.ctx)["load_avg_1m"]
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2) + "\n")
        os.replace(tmp, self.json_path)
        self.json_path.with_suffix(".md").write_text(markdown(self.doc, self.columns, self.settings_keys))


# ----------------------------------------------------------------- markdown


def fmt_num(x: Optional[float], digits: int = 1) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:,.{digits}f}"
    return f"{x:.3g}"


def fmt_stats(s: Optional[dict], digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{fmt_num(s['median'], digits)} ({fmt_num(s['min'], digits)}–{fmt_num(s['max'], digits)})"


def fmt_settings(settings: dict, keys: Optional[list[str]] = None) -> str:
    items = settings.items() if keys is None else ((k, settings[k]) for k in keys if k in settings)
    return ", ".join(f"{k}={v}" for k, v in items if v is not None and v != "")


def cell(r: dict, key: str, settings_keys: Optional[list[str]] = None) -> str:
    if key == "settings":
        return fmt_settings(r["settings"], settings_keys)
    v = r.get(key)
    if isinstance(v, dict) and "median" in v:
        return fmt_stats(v, 2 if key in ("tflops", "reference_tflops", "seconds", "cost_vs_simclr") else 1)
    if isinstance(v, float):
        return f"{v:.3f}" if key in ("ratio", "fraction") or "ratio" in key else fmt_num(v)
    if v is None:
        return "-"
    return str(v)


def markdown(doc: dict, columns: list[tuple[str, str]], settings_keys: Optional[list[str]] = None) -> str:
    env = doc.get("environment", {})
    head = [
        f"# `{doc['suite']}` benchmark{' (quick)' if doc['quick'] else ''}",
        "",
        f"- device: {doc['device']}",
        f"- torch {doc['torch']}, CUDA {doc['cuda'] or 'none'}, accelerate {env.get('accelerate', '?')}, "
        f"python {env.get('python', '?')}",
        f"- CPU: {env.get('cpu', '?')}, {env.get('cpu_count', '?')} cores, torch threads {env.get('torch_threads', '?')}, "
        f"load average (1 min) {env.get('load_avg_1m', '?')}",
        f"- created {doc['created']}; every number: median (min–max) over repetitions after warm-up",
        "",
    ]
    titles = [t for _, t in columns] + ["status"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for r in doc["rows"]:
        cells = [cell(r, k, settings_keys).replace("|", "\\|") for k, _ in columns]
        status = r["status"] + (f": {r['note']}" if r.get("note") else "")
        lines.append("| " + " | ".join(cells + [status.replace("|", "\\|")]) + " |")
    return "\n".join(head + lines) + "\n"


# ----------------------------------------------------------------- schema


def _is_stats(v: Any) -> bool:
    return (isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) for k in ("median", "min", "max"))
            and v["min"] <= v["median"] <= v["max"])


SUITE_REQUIRED: dict[str, tuple[str, ...]] = {
    "step": ("reference_images_per_s", "ratio", "tflops"),
    "e2e": ("reference_images_per_s", "ratio"),
    "loader": ("images_per_s_per_core",),
    "verify": ("seconds",),
    "cost": ("device_seconds", "fraction"),
    "health": ("check", "summary"),
}
HEALTH_CHECKS = ("memory", "sync_bn", "loss")
RATE_OPTIONAL = ("health",)  # suites whose ok rows may have no images_per_s (a check, not a speed)


def validate(doc: Any, suite: Optional[str] = None) -> list[str]:
    """Problems of a suite document against the schema (empty: valid). Never looks at speeds."""
    errs: list[str] = []
    if not isinstance(doc, dict):
        return ["document is not a JSON object"]
    for k, t in (("schema", str), ("suite", str), ("device", str), ("torch", str), ("quick", bool),
                 ("created", str), ("rows", list)):
        if not isinstance(doc.get(k), t):
            errs.append(f"top-level '{k}' missing or not {t.__name__}")
    if "cuda" not in doc or not (doc["cuda"] is None or isinstance(doc["cuda"], str)):
        errs.append("top-level 'cuda' missing (null on CPU)")
    if errs:
        return errs
    if doc["schema"] != SCHEMA:
        errs.append(f"schema is {doc['schema']!r}, expected {SCHEMA!r}")
    if suite is not None and doc["suite"] != suite:
        errs.append(f"suite is {doc['suite']!r}, expected {suite!r}")
    try:
        datetime.fromisoformat(doc["created"])
    except ValueError:
        errs.append(f"'created' is not an ISO time: {doc['created']!r}")
    if not doc["rows"]:
        errs.append("no rows")
    extra = SUITE_REQUIRED.get(doc["suite"], ())
    for i, r in enumerate(doc["rows"]):
        where = f"rows[{i}] ({r.get('name', '?') if isinstance(r, dict) else '?'})"
        if not isinstance(r, dict):
            errs.append(f"{where}: not an object")
            continue
        if not isinstance(r.get("name"), str) or not r["name"]:
            errs.append(f"{where}: 'name' missing")
        if r.get("status") not in STATUSES:
            errs.append(f"{where}: status {r.get('status')!r} not one of {STATUSES}")
        if not isinstance(r.get("settings"), dict):
            errs.append(f"{where}: 'settings' missing or not an object")
        if "images_per_s" not in r:
            errs.append(f"{where}: 'images_per_s' missing")
        if doc["suite"] == "health" and r.get("check") not in HEALTH_CHECKS:
            errs.append(f"{where}: 'check' is {r.get('check')!r}, not one of {HEALTH_CHECKS}")
        if r.get("status") == "ok":
            rate = r.get("images_per_s")
            if not _is_stats(rate) and not (rate is None and doc["suite"] in RATE_OPTIONAL):
                errs.append(f"{where}: 'images_per_s' is not {{median, min, max}} with min <= median <= max")
            for k in extra if r.get("kind") != "aux" else ():
                v = r.get(k)
                if k in ("ratio", "fraction"):
                    if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                        errs.append(f"{where}: '{k}' missing or not a positive number")
                elif k in ("check", "summary"):
                    if not isinstance(v, str) or not v:
                        errs.append(f"{where}: '{k}' missing or not a string")
                elif k == "device_seconds":
                    if not isinstance(v, dict) or not all(isinstance(x, (int, float)) for x in v.values()):
                        errs.append(f"{where}: 'device_seconds' missing or not numbers")
                elif not _is_stats(v):
                    errs.append(f"{where}: '{k}' is not {{median, min, max}}")
        else:
            if not r.get("note"):
                errs.append(f"{where}: status {r.get('status')!r} without a 'note' saying why")
    return errs
