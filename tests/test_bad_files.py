"""ImageNet's odd files and broken ones (#31): a PNG named .JPEG, CMYK, grayscale and progressive JPEGs are decoded by
PIL on every loader, with the views of a PIL decode of the same file and box; an unreadable file is replaced by the
split's next readable image and counted (``data.bad_files=skip``), or named before the first step (``refuse``)."""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REQUIRE_EXTRAS, spawn_launch, tiny_overrides
from PIL import Image

from dist_awenc.data import build_dataset
from dist_awenc.data.bad_files import Replacement, check_file
from dist_awenc.data.crops import CropSpec, crop_boxes, crop_key, crop_uniforms
from dist_awenc.data.decode_views import DecodeSource, DeviceDecodeSource, device_decodable
from dist_awenc.data.images import ImageDecodeError
from dist_awenc.data.sampler import GlobalBatchSampler, SamplerSource

needs_ffcv = pytest.mark.skipif(
    importlib.util.find_spec("ffcv") is None and not REQUIRE_EXTRAS,
    reason="FFCV is not installed (optional extra): run scripts/install_ffcv.sh to test the FFCV loader",
)
ODD = ("n02105855_2933.JPEG", "cmyk.JPEG", "gray.JPEG", "progressive.JPEG")  # ImageNet's kinds of odd file
BAD = ("empty.JPEG", "noscan.JPEG", "truncated.JPEG")  # empty; header and end marker only; cut in half
SPEC = CropSpec(size=16, n_views=2, seed=3, scale=(0.08, 1.0))


def _gradient(h: int, w: int, k: int) -> Image.Image:
    """Smooth, so that two resamplers agree within a few levels; the colour encodes the position."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full((h, w), 25 * k)], -1)
    return Image.fromarray(arr.astype(np.uint8))


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _folder(root: Path, bad: bool = False) -> Path:
    """6 plain JPEGs, the 4 odd files of ODD, and with ``bad`` the 3 unreadable ones of BAD, in 2 class folders."""
    for k in range(6):
        (root / f"n0{k % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"n0{k % 2}" / f"plain{k}.JPEG").write_bytes(_jpeg(_gradient(40 + 6 * k, 70 - 5 * k, k)))
    _gradient(44, 60, 6).save(root / "n01" / ODD[0], format="PNG")  # a PNG with a .JPEG name
    (root / "n00" / ODD[1]).write_bytes(_jpeg(_gradient(52, 48, 7).convert("CMYK")))
    (root / "n01" / ODD[2]).write_bytes(_jpeg(_gradient(50, 66, 8).convert("L")))
    (root / "n00" / ODD[3]).write_bytes(_jpeg(_gradient(58, 54, 9), progressive=True))
    if bad:
        good = _jpeg(_gradient(40, 40, 2))
        (root / "n00" / BAD[0]).write_bytes(b"")
        (root / "n01" / BAD[1]).write_bytes(good[: good.index(b"\xff\xda")] + b"\xff\xd9")
        (root / "n00" / BAD[2]).write_bytes(good[: len(good) // 2])
    return root


def _pil_views(path: str, boxes: np.ndarray, size: int) -> torch.Tensor:
    """The reference: PIL's decode of the file, each box cut and resized bilinear: uint8 (V, 3, size, size)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    views = [np.asarray(img.crop((j, i, j + w, i + h)).resize((size, size), Image.BILINEAR))
             for i, j, h, w in boxes.tolist()]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2)


def _reference(ds, sampler: GlobalBatchSampler, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """PIL's views of ``index`` (the images a loader says it delivered) at the boxes of the epoch's positions."""
    sampler.set_epoch(epoch)
    positions = sampler.epoch_positions().numpy()
    u = crop_uniforms(crop_key(SPEC.seed, epoch), positions, SPEC.n_views)
    out = []
    for k, i in enumerate(index.tolist()):
        path = ds.samples[i][0]
        with Image.open(path) as img:
            h, w = img.height, img.width
        out.append(_pil_views(path, crop_boxes(u[k : k + 1], np.array([h]), np.array([w]), SPEC.scale,
                                                   SPEC.ratio)[0], SPEC.size))
    return torch.stack(out)


def _stand_in(i: int, bad: set[int], repl: Replacement) -> int:
    """The image a skipping loader delivers for dataset index ``i``."""
    while i in bad:
        i = repl.next(i)
    return i


def _epoch(source, epoch: int):
    batches = list(source.iterate(epoch, 0))
    return batches, torch.cat([b.images for b in batches]), torch.cat([b.index for b in batches])


def _names(ds, index: torch.Tensor) -> list[str]:
    return [Path(ds.samples[i][0]).name for i in index.tolist()]


def test_odd_files_are_decoded_by_pil_on_every_torch_loader(tmp_path):
    """views.crop=decode with data.decode=cpu and =device (2 workers: the device path's workers hand the odd files
    to PIL and send their views beside the other files' bytes), and the plain loader: the odd files' views are
    exactly PIL's at the same boxes; the plain JPEGs, decoded only as finely as their boxes need (data.decode=cpu)
    or on the device, are within resampling differences."""
    ds = build_dataset("imagefolder", root=_folder(tmp_path / "img"), image_size=16)
    odd = [k for k, (p, _) in enumerate(ds.samples) if Path(p).name in ODD]
    assert len(odd) == 4 and len(ds) == 10
    decodable = {Path(p).name: device_decodable(Path(p).read_bytes()) is not None for p, _ in ds.samples}
    assert {n for n, ok in decodable.items() if not ok} == {ODD[0], ODD[1], ODD[2]}  # progressive: nvjpeg's

    sampler = GlobalBatchSampler(len(ds), 5, seed=SPEC.seed)
    for epoch in (0, 1):
        batches, cpu, index = _epoch(DecodeSource(ds, sampler, SPEC), epoch)
        assert [tuple(b.images.shape) for b in batches] == [(5, 2, 3, 16, 16)] * 2
        ref, odd_rows = _reference(ds, sampler, epoch, index), torch.tensor([n in ODD for n in _names(ds, index)])
        assert torch.equal(cpu[odd_rows], ref[odd_rows])  # the progressive JPEG too: PIL's full decode
        assert (cpu[~odd_rows].float() - ref[~odd_rows].float()).abs().mean() < 3.0  # DCT-scaled decodes
        _, full, _ = _epoch(DecodeSource(ds, sampler, dataclasses.replace(SPEC, full_decode=True)), epoch)
        assert torch.equal(full, ref)
    source = DeviceDecodeSource(ds, GlobalBatchSampler(len(ds), 5, seed=SPEC.seed), SPEC, "cpu", num_workers=2)
    for epoch in (0, 1):
        batches, dev, dindex = _epoch(source, epoch)
        ref = _reference(ds, sampler, epoch, dindex)
        assert [tuple(b.images.shape) for b in batches] == [(5, 2, 3, 16, 16)] * 2
        assert batches[0].images.dtype == torch.uint8 and sorted(dindex.tolist()) == list(range(10))
        pil_rows = torch.tensor([not decodable[n] for n in _names(ds, dindex)])
        assert torch.equal(dev[pil_rows], ref[pil_rows])
        assert (dev[~pil_rows].float() - ref[~pil_rows].float()).abs().mean() < 3.0  # torch's vs PIL's bilinear
    assert source.bad_file_log.replaced == 0

    plain = list(SamplerSource(ds, GlobalBatchSampler(len(ds), 5, seed=0), uint8=True).iterate(0, 0))
    images, pindex = torch.cat([b.images for b in plain]), torch.cat([b.index for b in plain])
    for img, i in zip(images, pindex.tolist()):
        with Image.open(ds.samples[i][0]) as ref:
            want = torch.from_numpy(np.array(ref.convert("RGB").resize((16, 16), Image.BILINEAR))).permute(2, 0, 1)
        assert torch.equal(img, want)
    from dist_awenc.data.stream import IndexedImages, batches

    streamed = torch.cat(list(batches(IndexedImages(ds, torch.tensor(odd), num_workers=0), 2)))
    assert torch.equal(streamed, ds.get_batch_uint8(torch.tensor(odd))[0].float() / 255)


def test_unreadable_files_are_replaced_by_the_splits_next_image_and_counted(tmp_path, capsys):
    """data.bad_files=skip on the three torch loaders, 2 workers: every batch keeps its size, each unreadable file's
    sample holds the split's next readable image (its label and index) cut at the sample's own boxes, each file
    is logged once per source over two epochs, and the count of replaced samples is kept."""
    ds = build_dataset("imagefolder", root=_folder(tmp_path / "img", bad=True), image_size=16)
    names = [Path(p).name for p, _ in ds.samples]
    split = torch.tensor([k for k in range(len(ds)) if k != names.index("plain5.JPEG")])  # 12 of the 13 files
    bad = {k for k, n in enumerate(names) if n in BAD}
    assert len(bad) == 3 and all(check_file(ds.samples[k][0]) is not None for k in bad)
    assert all(check_file(p) is None for p, _ in ds.samples if Path(p).name in ODD)
    repl = Replacement(split)
    for make in (lambda s: DecodeSource(ds, s, SPEC, num_workers=2),
                 lambda s: DeviceDecodeSource(ds, s, SPEC, "cpu", num_workers=2),
                 lambda s: SamplerSource(ds, s, num_workers=2, uint8=True)):
        sampler = GlobalBatchSampler(split, 4, seed=SPEC.seed)
        source = make(sampler)
        for epoch in (0, 1):
            batches = list(source.iterate(epoch, 0))
            assert [len(b.index) for b in batches] == [4, 4, 4]
            index, labels = torch.cat([b.index for b in batches]), torch.cat([b.labels for b in batches])
            want = torch.tensor([_stand_in(int(i), bad, repl) for i in sampler.epoch_order()])
            assert torch.equal(index, want) and torch.equal(labels, ds.labels[want])
            assert not bad & set(index.tolist())
            if batches[0].images.dim() == 5:  # decode-time views: the stand-in cut at the sample's boxes
                views, ref = torch.cat([b.images for b in batches]), _reference(ds, sampler, epoch, index)
                assert (views.float() - ref.float()).abs().mean() < 3.0
                if isinstance(source, DecodeSource) and not isinstance(source, DeviceDecodeSource):
                    odd_rows = torch.tensor([n in ODD for n in _names(ds, index)])
                    assert torch.equal(views[odd_rows], ref[odd_rows])
            else:
                assert torch.equal(torch.cat([b.images for b in batches]), ds.get_batch_uint8(index)[0])
        assert source.bad_file_log.replaced == 6 and len(source.bad_file_log.seen) == 3
        err = capsys.readouterr().err
        for name in BAD:
            assert sum(name in line for line in err.splitlines() if "warning:" in line) == 1, (name, err)
        assert "epoch 1: 3 sample(s) replaced" in err


def test_refuse_names_the_first_bad_file_before_the_first_step(tmp_path):
    from dist_awenc.config import DataSection
    from dist_awenc.data.ffcv import build_source, source_options
    from dist_awenc.errors import ConfigError

    ds = build_dataset("imagefolder", root=_folder(tmp_path / "img", bad=True), image_size=16)
    names = [Path(p).name for p, _ in ds.samples]
    opts = source_options(DataSection(name="imagefolder", image_size=16, bad_files="refuse"))
    sampler = GlobalBatchSampler(len(ds), 4, seed=0)
    with pytest.raises(ImageDecodeError) as info:
        build_source(ds, torch.arange(len(ds)), sampler, **opts)
    msg = str(info.value)
    assert "\n" not in msg and f"{os.sep}{BAD[0]}'" in msg and "2 more bad file(s)" in msg, msg
    good = torch.tensor([k for k, n in enumerate(names) if n not in BAD])
    source = build_source(ds, good, GlobalBatchSampler(good, 4, seed=0), **{**opts, "crops": SPEC, "decode": "device"})
    assert isinstance(source, DeviceDecodeSource) and source.replacement is None
    with pytest.raises(ConfigError, match="data.bad_files must be one of skip, refuse; got 'ignore'"):
        build_source(ds, good, GlobalBatchSampler(good, 4, seed=0), **{**opts, "bad_files": "ignore"})


def _two_ranks(root: str, out: str) -> None:
    """Each of 2 gloo ranks: the refusal scan of its half (joined), then a skipping source over its batches."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from dist_awenc.data.bad_files import replaced_samples
    from dist_awenc.data.ffcv import build_source
    from dist_awenc.engine import dist

    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    ds = build_dataset("imagefolder", root=root, image_size=16)
    split = torch.arange(len(ds))
    sampler = GlobalBatchSampler(split, 4, seed=0, rank=rank, world_size=world)
    try:
        build_source(ds, split, sampler, image_size=16, bad_files="refuse", gather=dist.gather_objects)
        refused = ""
    except ImageDecodeError as err:
        refused = str(err)
    source = build_source(ds, split, sampler, image_size=16, crops=SPEC)
    shapes = [tuple(b.images.shape) for b in source.iterate(0, 0)]
    total = replaced_samples(source, dist.sum_scalar)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"refused": refused, "shapes": shapes, "total": total,
                                                         "mine": source.bad_file_log.replaced}))
    dist.barrier()


def test_two_ranks_refuse_together_and_sum_their_replacements(tmp_path):
    """Under refuse each rank scans half the files and both stop with the same line (none waits on the other);
    under skip both keep full batches and the run's metric sums their replacements."""
    root = _folder(tmp_path / "img", bad=True)
    spawn_launch(_two_ranks, (str(root), str(tmp_path)), tmp_path)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert got[0]["refused"] == got[1]["refused"] and BAD[0] in got[0]["refused"]
    assert got[0]["shapes"] == got[1]["shapes"] == [[2, 2, 3, 16, 16]] * 3
    names = [p.name for c in sorted(root.iterdir()) for p in sorted(c.iterdir())]
    order = GlobalBatchSampler(len(names), 4, seed=0).epoch_order().tolist()
    assert got[0]["total"] == got[1]["total"] == {"bad_files": got[0]["mine"] + got[1]["mine"]}
    assert got[0]["mine"] + got[1]["mine"] == sum(names[i] in BAD for i in order) > 0


def test_device_decoder_failures_fall_back_to_the_host(tmp_path, monkeypatch):
    """A file the device decoder refuses is decoded on the host from its bytes (the same views as PIL's), and one
    PIL cannot decode either is replaced there as in the workers: the batch keeps its shape and order."""
    import torchvision.io

    ds = build_dataset("imagefolder", root=_folder(tmp_path / "img", bad=True), image_size=16)
    names = [Path(p).name for p, _ in ds.samples]
    progressive = Path(ds.samples[names.index(ODD[3])][0]).read_bytes()
    real = torchvision.io.decode_jpeg

    def picky(files, *args, **kw):  # a decoder that cannot read progressive JPEGs, as some hardware decoders
        if any(bytes(f.numpy()) == progressive for f in files):
            raise RuntimeError("unsupported JPEG")
        return real(files, *args, **kw)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    # noscan.JPEG stays: its header and end marker pass the worker's checks
    keep = torch.tensor([k for k, n in enumerate(names) if n not in (BAD[0], BAD[2], "plain5.JPEG")])
    sampler = GlobalBatchSampler(keep, 5, seed=SPEC.seed)
    source = DeviceDecodeSource(ds, sampler, SPEC, "cpu")
    batches, views, index = _epoch(source, 0)
    assert [tuple(b.images.shape) for b in batches] == [(5, 2, 3, 16, 16)] * 2
    ref = _reference(ds, sampler, 0, index)
    row = _names(ds, index).index(ODD[3])
    assert torch.equal(views[row], ref[row])
    assert BAD[1] not in _names(ds, index) and source.bad_file_log.replaced == 1
    assert (views.float() - ref.float()).abs().mean() < 3.0


def test_pretraining_over_a_bad_file_records_it_in_the_metrics(tmp_path):
    """awenc pretrain on a folder with an unreadable file (views.crop=decode, data.decode=device on the CPU): it
    runs to the end and metrics.jsonl says how many samples were replaced."""
    from accelerate.state import AcceleratorState

    from dist_awenc.config import PretrainConfig, load_config
    from dist_awenc.ssl.pretrain import pretrain

    root = _folder(tmp_path / "img")
    (root / "n00" / BAD[2]).write_bytes(_jpeg(_gradient(40, 40, 2))[:300])
    extra = {"data.name": "imagefolder", "data.root": str(root), "data.splits": "[1.0,0.0,0.0]", "data.image_size": 16,
             "views.crop": "decode", "data.decode": "device", "train.batch_size": 11, "train.epochs": 2,
             "train.max_steps": 2}
    AcceleratorState._reset_state(reset_partial_state=True)
    run = pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "bad", **extra))).parent
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["bad_files"] for m in lines if "bad_files" in m] == [1.0, 2.0]


@needs_ffcv
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba's finalizers, as test_ffcv.py
def test_ffcv_writes_odd_files_as_rgb_and_replaces_or_refuses_bad_ones(tmp_path):
    """write_beton (original files, raw and jpg): the odd files are stored as PIL decodes them, so FFCV's decoder
    cuts the views of a PIL decode of the same file and box (within the two resamplers' differences); an
    unreadable file is replaced (skip: the item keeps its index, holds the next readable image) or stops the write
    naming it (refuse), leaving no file."""
    from dist_awenc.data import ffcv as ffcv_mod

    ds = build_dataset("imagefolder", root=_folder(tmp_path / "img", bad=True), image_size=16)
    names = [Path(p).name for p, _ in ds.samples]
    split = torch.tensor([k for k in range(len(ds)) if names[k] != "plain5.JPEG"])
    with pytest.raises(ImageDecodeError, match=f"{BAD[0]}'"):
        ffcv_mod.write_beton(ds, tmp_path / "refused.beton", indices=split, original=True, progress=False)
    assert not (tmp_path / "refused.beton").exists()
    for mode in ("raw", "jpg"):
        beton = ffcv_mod.write_beton(ds, tmp_path / f"{mode}.beton", indices=split, original=True, mode=mode,
                                     num_workers=2, progress=False, bad_files="skip")
        source = ffcv_mod.FFCVSource(beton, image_size=16, global_batch_size=4, seed=SPEC.seed, crops=SPEC)
        batches = [(b.images.clone(), b.index.clone()) for b in source.iterate(0, 0)]
        views, index = torch.cat([v for v, _ in batches]), torch.cat([i for _, i in batches])
        assert views.shape == (12, 2, 3, 16, 16)
        assert torch.equal(index.sort().values, split)  # the items keep their own index: the file matches its split
        sampler = GlobalBatchSampler(len(split), 4, seed=SPEC.seed)
        bad, repl = {k for k, n in enumerate(names) if n in BAD}, Replacement(split)
        held = torch.tensor([_stand_in(i, bad, repl) for i in index.tolist()])
        ref = _reference(ds, sampler, 0, held)
        odd = torch.tensor([n in ODD for n in _names(ds, held)])
        limit = 3.0 if mode == "raw" else 5.0  # INTER_AREA vs PIL's bilinear (and the JPEG re-encoding)
        assert (views[odd].float() - ref[odd].float()).abs().mean() < limit
        assert (views.float() - ref.float()).abs().mean() < limit
