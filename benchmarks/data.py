"""Generated JPEG files: an ``imagefolder`` tree (``root/<class>/<i>.jpg``) that decodes like photographs.

Each image is a smooth random colour field (a few random colours upsampled
bicubically) with mild noise, saved at quality 90: file sizes and decode
times close to natural photographs of the same size, unlike white noise
(which JPEG compresses badly and decodes slowly).
"""
from __future__ import annotations

import os
from multiprocessing import get_context
from pathlib import Path

import numpy as np


def _write_one(args: tuple[str, int, int, int, int]) -> int:
    from PIL import Image

    path, w, h, seed, quality = args
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    img = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=quality)
    return os.path.getsize(path)


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 10, seed: int = 0,
                processes: int | None = None) -> dict:
    """Write ``n`` JPEGs of ``size`` (width, height) into ``root/<class>/``; returns what was written."""
    root = Path(root)
    jobs = []
    for i in range(n):
        d = root / f"class_{i % classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((str(d / f"{i:06d}.jpg"), size[0], size[1], seed * 1_000_003 + i, 90))
    procs = max(1, min(processes or os.cpu_count() or 1, 16, n // 64 or 1))
    if procs == 1:
        sizes = [_write_one(j) for j in jobs]
    else:
        with get_context("spawn").Pool(procs) as pool:
            sizes = pool.map(_write_one, jobs, chunksize=64)
    return {"root": str(root), "images": n, "width": size[0], "height": size[1], "classes": classes,
            "mean_kib": round(sum(sizes) / len(sizes) / 1024, 1)}
