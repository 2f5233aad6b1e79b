"""Suite ``verify``: seconds of an ownership check on CPU.

* white-box: :func:`dist_awenc.verify.core.verify_whitebox` on a ResNet-50
  (ImageNet stem, 224 px) with 256 images in memory (2 x 256 + 1 forward
  passes, then the margin sign test);
* black-box label: :func:`~dist_awenc.verify.core.verify_blackbox_label`
  with a budget of 100 queries (the key once + 49 marked/control pairs) to a
  downstream model (the ResNet-50 + a linear head);
* the stage, ``awenc verify --mode whitebox`` of a saved ResNet-50 on 256
  images of an on-disk ``imagefolder`` hold-out (generated 500 x 375 JPEGs,
  hard links to a few files), at two hold-out sizes, one 10x the other
  (1,000 and 10,000 files), each in a fresh process: its seconds and its peak
  resident memory (VmHWM), which must not grow with the hold-out
  (the stage indexes the hold-out and decodes only the n images it tests).

Weights are random and the images uniform noise (generated JPEGs for the
stage): the verdict means nothing, the seconds are what a real check costs. Always on
the CPU (a verifier's laptop), with the suite's torch threads; ``--quick`` uses
n = 2, 5 queries and hold-outs of 10 and 100 files.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import REPO, Context, SuiteWriter, row, short_error, stats, timed

COLUMNS = [("name", "case"), ("settings", "settings"), ("seconds", "seconds"), ("images_per_s", "images/s"),
           ("peak_rss_mib", "peak RSS (MiB)")]
TABLE_SETTINGS = ["model", "image_size", "n", "queries", "forward_images", "holdout", "threads"]
CHILD = "VERIFY_STAGE "  # the line a stage process reports on


def run(ctx: Context, args) -> Path:
    from dist_awenc.encoders.io import build_encoder
    from dist_awenc.evaluate.probe import DownstreamModel
    from dist_awenc.verify.core import images_for, verify_blackbox_label, verify_whitebox

    from benchmarks.project import random_secret

    cpu = Context(device=torch.device("cpu"), quick=ctx.quick, out_dir=ctx.out_dir, threads=ctx.threads,
                  max_seconds=ctx.max_seconds, started=ctx.started)
    out = SuiteWriter("verify", cpu, COLUMNS, TABLE_SETTINGS)
    size = 224
    n_wb, n_label = (2, 5) if ctx.quick else (256, 100)
    reps_wb, reps_label = (args.reps, args.reps) if args.reps else (2, 2 if ctx.quick else 3)
    torch.manual_seed(0)
    encoder = build_encoder("resnet50", {"stem": "imagenet", "norm": "batch"}, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], size).eval()
    secret = random_secret(size)
    holdout = torch.rand(max(n_wb, images_for("blackbox_label", n_label)), 3, size, size)
    model = DownstreamModel(encoder, encoder.feature_dim, 10).eval()
    with torch.no_grad():
        encoder(holdout[:1])  # warm-up (allocator, oneDNN primitives)
    base = {"model": "resnet50 (imagenet stem)", "image_size": size, "device": "cpu", "threads": torch.get_num_threads()}

    cases = [
        ("white-box ResNet-50", {"n": n_wb, "forward_images": 2 * n_wb + 1},
         lambda: verify_whitebox(encoder, secret, holdout[:n_wb]), 2 * n_wb + 1, reps_wb),
        ("black-box label, 100-query budget" if not ctx.quick else f"black-box label, {n_label}-query budget",
         {"n": images_for("blackbox_label", n_label), "queries": 2 * images_for("blackbox_label", n_label) + 1,
          "forward_images": 2 * images_for("blackbox_label", n_label) + 1},
         lambda: verify_blackbox_label(lambda b: model(b).argmax(1), secret, holdout[:images_for("blackbox_label", n_label)]),
         2 * images_for("blackbox_label", n_label) + 1, reps_label),
    ]
    for name, extra, fn, n_images, reps in cases:
        settings = {**base, **extra, "reps": reps}
        if cpu.out_of_time():
            out.add(row(name, settings, status="skipped", note="suite time budget (--max-seconds) used up"))
            continue
        try:
            with torch.no_grad():
                secs = [timed(cpu, fn) for _ in range(reps)]
        except Exception as e:  # noqa: BLE001
            out.add(row(name, settings, status="failed", note=short_error(e)))
            continue
        out.add(row(name, settings, seconds=stats(secs), images_per_s=_per_s(stats(secs), n_images)))
    stage_rows(cpu, out, base, n_wb, args.reps or (1 if ctx.quick else 2))
    return out.json_path


def _per_s(s: dict, n_images: int) -> dict:
    return {"median": n_images / s["median"], "min": n_images / s["max"], "max": n_images / s["min"], "n": s["n"]}


def stage_rows(ctx: Context, out: SuiteWriter, base: dict, n: int, reps: int) -> None:
    """``awenc verify --mode whitebox`` on two image-folder hold-outs, one 10x the other, each run in a fresh process."""
    from benchmarks.data import write_jpegs

    sizes, size_px = ((10, 100) if ctx.quick else (1_000, 10_000)), base["image_size"]
    got: dict[int, list[dict]] = {size: [] for size in sizes}
    errors: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        root = Path(tmp)
        written = write_jpegs(root / "source", 8, classes=1)  # 500 x 375, hard-linked below into each hold-out
        sources = sorted((root / "source").rglob("*.jpg"))
        encoder = _save_resnet50(root / "encoder", size_px)
        folders = {size: _holdout_folder(root / f"holdout_{size}", sources, size) for size in sizes}
        secrets = {size: _planned_secret(root / f"secret_{size}", size, size_px, n) for size in sizes}
        for rep in range(reps):  # the sizes alternate, so a change of machine load hits both
            for size in sizes:
                if size in errors or ctx.out_of_time():
                    continue
                argv = ["verify", "--mode", "whitebox", f"suspect={encoder}", f"secret={secrets[size]}",
                        "data.name=imagefolder", f"data.root={folders[size]}", "data.splits=[0,1,0]",
                        f"data.image_size={size_px}", f"run.out_dir={root / 'runs'}", f"run.name=holdout_{size}_{rep}"]
                try:
                    got[size].append(_run_stage(ctx, argv))
                except RuntimeError as e:
                    errors[size] = short_error(e)
    for size in sizes:
        name = f"awenc verify white-box ResNet-50, hold-out of {size:,} files"
        settings = {**base, "n": n, "forward_images": 2 * n + 1, "holdout": size, "reps": reps,
                    "images": f"{written['width']} x {written['height']} JPEG",
                    "path": "awenc verify: build_dataset(imagefolder), the hold-out's first n images decoded"}
        if size in errors:
            out.add(row(name, settings, status="failed", note=errors[size]))
        elif not got[size]:
            out.add(row(name, settings, status="skipped", note="suite time budget (--max-seconds) used up"))
        else:
            secs = stats(r["seconds"] for r in got[size])
            out.add(row(name, settings, seconds=secs, images_per_s=_per_s(secs, 2 * n + 1),
                        peak_rss_mib=stats(r["peak_rss_mib"] for r in got[size]),
                        rss_before_verify_mib=stats(r["rss_before_mib"] for r in got[size])))


def _save_resnet50(path: Path, size: int) -> Path:
    from dist_awenc.encoders.io import build_encoder, card_for, save_encoder

    torch.manual_seed(0)
    kw = {"stem": "imagenet", "norm": "batch"}
    enc = build_encoder("resnet50", kw, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], size)
    save_encoder(enc, path, card_for(enc, arch="resnet50", arch_kwargs=kw, method="simclr", stage="pretrain", parent=None))
    return path.with_suffix(".safetensors")


def _holdout_folder(root: Path, sources: list[Path], files: int) -> Path:
    """``files`` JPEGs in 10 class folders: hard links to ``sources`` in turn (symbolic links where that fails)."""
    for i in range(files):
        d = root / f"class_{i % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        target = d / f"{i:06d}.jpg"
        try:
            os.link(sources[i % len(sources)], target)
        except OSError:
            target.symlink_to(sources[i % len(sources)])
    return root


def _planned_secret(path: Path, files: int, size: int, n: int) -> Path:
    """A secret whose plan names the folder's hold-out (every file: data.splits=[0, 1, 0]) and n white-box images."""
    from dataclasses import replace

    from dist_awenc.data import splits_for
    from dist_awenc.verify.plan import make_plan
    from dist_awenc.watermark.secret import save_secret

    from benchmarks.project import random_secret

    plan = make_plan(dataset="imagefolder", dataset_size=files, image_size=size, split_seed=0,
                     holdout_indices=splits_for(files, 0, [0, 1, 0], "verify", "holdout")["holdout"],
                     n={"whitebox": n, "blackbox_score": 100, "blackbox_label": 100, "blackbox_collapse": 100},
                     alpha=1e-3, alternatives=0, alternatives_sha256=None, primary_mode="whitebox")
    save_secret(replace(random_secret(size), plan=plan), path)
    return path.with_suffix(".safetensors")


def _run_stage(ctx: Context, argv: list[str]) -> dict:
    """One ``awenc <argv>`` in a fresh process; its seconds and peak RSS (:func:`child` reports them)."""
    spec = {"threads": ctx.threads, "argv": argv}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.verify", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD)]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"awenc verify exited with {proc.returncode}: {tail}")
    return json.loads(lines[-1][len(CHILD):])


def _maxrss_mib() -> float:
    """This process's peak resident memory in MiB: VmHWM on Linux (ru_maxrss would include the parent's RSS at
    the fork that started it), ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def child(spec: dict) -> None:
    """In the fresh process: import, then time ``awenc verify``; print seconds and peak RSS on one line."""
    torch.set_num_threads(spec["threads"])
    import dist_awenc.verify.run  # noqa: F401  (imported before the clock: the seconds are the stage's own)
    from dist_awenc.cli import main

    before = _maxrss_mib()
    t0 = time.perf_counter()
    rc = main(spec["argv"])
    seconds = time.perf_counter() - t0
    if rc:
        sys.exit(rc)
    print(CHILD + json.dumps({"seconds": seconds, "peak_rss_mib": _maxrss_mib(), "rss_before_mib": before}), flush=True)


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
