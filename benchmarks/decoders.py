"""The ``decode only`` rows of the ``loader`` suite: what each JPEG library costs per image, on the suite's files.

They chose the library of the decode-only-the-boxes path (:mod:`dist_awenc.data.box_decode`) and let anyone check
the choice again on another machine. One core, no resizing, the file's bytes already in memory:

* full decode, and decode at 1/2 and 1/4 (libjpeg-turbo's DCT scaling), by Pillow (``Image.draft``), simplejpeg
  (wheels bundle libjpeg-turbo) and PyTurboJPEG (ctypes over the system's libturbojpeg, where installed);
* "region": the two views' boxes asked for as regions, which the libturbojpeg these bindings reach (Debian's 2.1)
  only offers as a lossless crop (``tjTransform``, as FFCV 1.0.2's ``imdecode`` and PyTurboJPEG's ``crop``): every
  coefficient entropy-decoded, the region re-encoded, then decoded; where it costs more than the whole decode, the
  region is not worth asking for.
"""
from __future__ import annotations

import importlib.util
import io
import time
from typing import Callable, Iterator

import numpy as np

from benchmarks.common import rates, row, scaled, short_error


def _files(root: str) -> list[bytes]:
    from pathlib import Path

    return [p.read_bytes() for p in sorted(Path(root).rglob("*.jpg"))]


def _pil(k: int) -> Callable[[bytes], object]:
    from PIL import Image

    def decode(data: bytes):
        with Image.open(io.BytesIO(data)) as img:
            if k > 1:
                img.draft("RGB", (img.width // k, img.height // k))
            return np.asarray(img.convert("RGB"))

    return decode


def _simplejpeg(k: int) -> Callable[[bytes], object]:
    import simplejpeg

    def decode(data: bytes):
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        return simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // k) if k > 1 else 0,
                                      min_width=-(-w // k) if k > 1 else 0)

    return decode


def _turbojpeg(k: int, region: bool = False) -> Callable[[bytes], object]:
    from turbojpeg import TJPF_RGB, TurboJPEG

    tj = TurboJPEG()
    if not region:
        return lambda data: tj.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, k) if k > 1 else None)
    from dist_awenc.data.crops import crop_boxes, crop_uniforms

    def decode(data: bytes):
        w, h, _, _ = tj.decode_header(data)
        boxes = crop_boxes(crop_uniforms(len(data), np.zeros(1), 2), np.array([h]), np.array([w]), (0.08, 1.0),
                           (3 / 4, 4 / 3))[0]
        regions = [(j // 16 * 16, i // 16 * 16, j + bw - j // 16 * 16, i + bh - i // 16 * 16)
                   for i, j, bh, bw in boxes.tolist()]  # MCU-aligned (x, y, w, h), as a lossless crop requires
        return [tj.decode(c, pixel_format=TJPF_RGB) for c in tj.crop_multiple(data, regions)]

    return decode


def decoder_rows(root: str, reps: int, base: dict, out_of_time: Callable[[], bool]) -> Iterator[dict]:
    """One ``kind: aux`` row per (library, scale) on the ``.jpg`` files under ``root``."""
    files = _files(root)
    cases: list[tuple[str, str, Callable[[], Callable[[bytes], object]]]] = []
    for k in (1, 2, 4):
        scale = "full" if k == 1 else f"1/{k}"
        cases += [(f"decode only, Pillow {'' if k == 1 else 'draft '}{scale}", "pillow", lambda k=k: _pil(k)),
                  (f"decode only, simplejpeg {scale}", "simplejpeg", lambda k=k: _simplejpeg(k)),
                  (f"decode only, PyTurboJPEG {scale}", "turbojpeg", lambda k=k: _turbojpeg(k))]
    cases.append(("decode only, PyTurboJPEG region of each of the 2 boxes (lossless crop + decode)", "turbojpeg",
                  lambda: _turbojpeg(1, region=True)))
    for name, module, make in cases:
        settings = {**base, "num_workers": 0, "cores": 1, "library": module}
        if out_of_time():
            yield row(name, settings, status="skipped", note="suite time budget (--max-seconds) used up", kind="aux")
            continue
        if importlib.util.find_spec("PIL" if module == "pillow" else module) is None:
            yield row(name, settings, status="not installed", note=f"{module} is not installed here", kind="aux")
            continue
        try:
            decode = make()
        except Exception as e:  # noqa: BLE001  (PyTurboJPEG without the system's libturbojpeg, or a wrong one)
            yield row(name, settings, status="not installed", note=short_error(e), kind="aux")
            continue
        try:
            for data in files[:4]:  # warm-up
                decode(data)
            secs = []
            for _ in range(reps):
                t = time.perf_counter()
                for data in files:
                    decode(data)
                secs.append(time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001  (a library that cannot run here: say why, go on)
            yield row(name, settings, status="failed", note=short_error(e), kind="aux")
            continue
        ips = rates(secs, len(files))
        yield row(name, settings, images_per_s=ips, images_per_s_per_core=scaled(ips, 1.0), kind="aux")
