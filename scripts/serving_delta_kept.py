"""How much of the owner's watermark a JPEG step leaves in the demo's queries (results/serving/README.md).

For the first 49 hold-out images x at the secret's resolution (8-bit, as sent), the marked query m = x + delta and the
clean one c = x: the share of delta's projection that survives a transform T, <T(m) - T(c), m - c> / |m - c|^2, and
the RMS change T makes to m. T is awenc serve's --jpeg-quality step (PIL defaults, 4:2:0 chroma) at several
qualities, and the verifier's own JPEG queries (the adapter's encoding, 4:4:4).

    .venv/bin/python scripts/serving_delta_kept.py [runs/demo]
"""
from __future__ import annotations

import io
import sys

import numpy as np
import torch
from PIL import Image

from dist_awenc.data import build_dataset, splits_for
from dist_awenc.server.requests import serving_path
from dist_awenc.verify.adapter import Adapter
from dist_awenc.watermark.secret import load_secret


def _decoded(wires: list[bytes]) -> torch.Tensor:
    imgs = [np.asarray(Image.open(io.BytesIO(w)).convert("RGB")) for w in wires]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255


def main(demo: str = "runs/demo") -> None:
    secret = load_secret(f"{demo}/watermark")
    size = secret.image_size
    ds = build_dataset("digits", image_size=size, seed=0)
    x = ds.get_batch(splits_for(len(ds), 0, [0.5, 0.2, 0.3], "delta kept", "holdout")["holdout"][:49])[0]
    q8 = lambda t: (t * 255).round() / 255  # noqa: E731  (what a PNG query carries)
    m, c = q8(secret.mark(x)), q8(x)
    transforms = {"none (PNG)": lambda t: t}
    for q in (95, 90, 75, 50, 30):
        transforms[f"awenc serve --jpeg-quality {q}"] = lambda t, q=q: serving_path(t, size, q)
    for q in (90, 95):
        a = Adapter(name="j", format="raw", batch=False, encoding="jpeg", jpeg_quality=q)
        transforms[f"the verifier's JPEG queries, quality {q}"] = lambda t, a=a: _decoded(a.wire(t))
    print("| transform | share of delta's projection kept | RMS change of the marked query (/255) |")
    print("|---|---|---|")
    for name, t in transforms.items():
        kept = float(((t(m) - t(c)) * (m - c)).sum() / ((m - c) ** 2).sum())
        rms = float((t(m) - m).pow(2).mean().sqrt() * 255)
        print(f"| {name} | {kept:.3f} | {rms:.1f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
