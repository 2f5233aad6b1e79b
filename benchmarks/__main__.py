"""``python -m benchmarks <suite|all> [--quick] [--out DIR]`` (run from the repository root).

Writes ``<out>/<suite>.json`` and ``<out>/<suite>.md`` per suite; ``<out>``
defaults to ``benchmarks/results/<device-slug>/`` (``<device-slug>-quick``
with ``--quick``, so a smoke run never overwrites measured results).
``python -m benchmarks validate DIR`` checks every suite file in DIR against
the schema (exit 1 on a problem); ``python -m benchmarks summary DIR...``
prints one markdown table of the headline numbers of every suite file in
the folders (the current table of docs/scale.md).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

from benchmarks import SUITES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suite", choices=[*SUITES, "all", "validate", "summary"],
                   help="a suite, all of them, validate DIR, or summary DIR...")
    p.add_argument("dirs", nargs="*", type=Path, help="validate / summary: folders of suite files")
    p.add_argument("--quick", action="store_true", help="tiny sizes, CPU-friendly: checks the suites run and the JSON schema")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device-slug>[-quick])")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --quick, else all cores)")
    p.add_argument("--max-seconds", type=float, help="per-suite time budget: rows past it are recorded as skipped")
    p.add_argument("--models", nargs="+", choices=["resnet18_cifar32", "resnet50_in224"], help="step/e2e: models to run")
    p.add_argument("--methods", nargs="+", choices=["simclr", "moco_v2", "byol", "embed"], help="step/e2e: methods to run")
    p.add_argument("--modes", nargs="+", choices=["fp32", "bf16_cl", "bf16_cl_compile"], help="step/e2e: precision modes")
    p.add_argument("--launchers", nargs="+", choices=["single", "ddp", "zero2"],
                   help="e2e: accelerate launch routes (default: all three on a GPU, single elsewhere)")
    p.add_argument("--scenarios", nargs="+", choices=["digits", "cifar10", "imagenet", "recipe"],
                   help="cost: scenarios to run (default: all; recipe: the embedding recipe's step costs at ResNet-50 "
                        "224 px and its ImageNet fraction, #27)")
    p.add_argument("--batch", type=int, help="step (cost: recipe): batch size (source images per step) for every model")
    p.add_argument("--steps", type=int, help="step (cost: recipe): timed steps per repetition")
    p.add_argument("--reps", type=int, help="step/e2e/verify: repetitions (cost: rounds)")
    p.add_argument("--warmup", type=int, help="step (cost: recipe): warm-up steps")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.suite == "validate":
        return max([validate_dir(d) for d in args.dirs or [Path(".")]])
    if args.suite == "summary":
        from benchmarks.summary import summary

        print(summary(args.dirs or [Path(".")]), end="")
        return 0
    warnings.filterwarnings("ignore", message=".*TF32.*")
    import torch

    from benchmarks.common import Context, device_slug, pick_device

    device = pick_device()
    threads = args.threads or (1 if args.quick else os.cpu_count() or 1)
    torch.set_num_threads(threads)
    out = args.out or Path(__file__).resolve().parent / "results" / (device_slug(device) + ("-quick" if args.quick else ""))
    suites = SUITES if args.suite == "all" else (args.suite,)
    t_all = time.perf_counter()
    failed = []
    for suite in suites:
        ctx = Context(device=device, quick=args.quick, out_dir=out, threads=threads, max_seconds=args.max_seconds)
        t = time.perf_counter()
        print(f"== {suite} ({'quick, ' if args.quick else ''}{device.type}, {threads} thread(s)) -> {out}", file=sys.stderr, flush=True)
        try:
            path = importlib.import_module(f"benchmarks.{suite}").run(ctx, args)
        except Exception as e:  # noqa: BLE001  (report, go on with the other suites, exit 1 at the end)
            import traceback

            traceback.print_exc()
            failed.append(f"{suite}: {type(e).__name__}: {e}")
            continue
        print(f"== {suite}: {time.perf_counter() - t:.1f} s -> {path} and {path.with_suffix('.md').name}", file=sys.stderr, flush=True)
    print(f"== done in {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    for f in failed:
        print(f"benchmarks: error: {f}", file=sys.stderr)
    return 1 if failed else 0


def validate_dir(folder: Path) -> int:
    from benchmarks.common import validate

    files = sorted(folder.glob("*.json"))
    if not files:
        print(f"no suite files in {folder}", file=sys.stderr)
        return 1
    bad = 0
    for f in files:
        errs = validate(json.loads(f.read_text()), f.stem)
        if not f.with_suffix(".md").exists():
            errs.append(f"{f.with_suffix('.md').name} is missing")
        for e in errs:
            print(f"{f}: {e}", file=sys.stderr)
        bad += bool(errs)
        print(f"{f}: {'ok' if not errs else 'INVALID'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
