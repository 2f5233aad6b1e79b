"""Suite ``verify``: seconds of an ownership check on CPU.

* white-box: :func:`dist_awenc.verify.core.verify_whitebox` on a ResNet-50
  (ImageNet stem, 224 px) with 256 images (2 x 256 + 1 forward passes, then
  the Wilcoxon test);
* black-box label: :func:`~dist_awenc.verify.core.verify_blackbox_label`
  with a budget of 100 queries (the key once + 49 marked/control pairs) to a
  downstream model (the ResNet-50 + a linear head).

Weights are random and the images uniform noise: the verdict means nothing,
the seconds are what a real check costs. Always on the CPU (a verifier's
laptop), with the suite's torch threads; ``--quick`` uses n = 2 and 5 queries.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.common import Context, SuiteWriter, row, short_error, stats, timed

COLUMNS = [("name", "case"), ("settings", "settings"), ("seconds", "seconds"), ("images_per_s", "images/s")]
TABLE_SETTINGS = ["model", "image_size", "n", "queries", "forward_images", "threads"]


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
        s = stats(secs)
        ips = {"median": n_images / s["median"], "min": n_images / s["max"], "max": n_images / s["min"], "n": s["n"]}
        out.add(row(name, settings, seconds=s, images_per_s=ips))
    return out.json_path
