"""Transform robustness (robust.transforms): the differentiable transform family, its seeding, and stages 1 and 2."""
from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_f0_and_secret
from dist_awenc.config import DemoConfig, EmbedConfig, WatermarkConfig, load_config
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import build_encoder, load_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.watermark.transforms import (IDENTITY, TRANSFORMS, TransformParams, apply_drawn, apply_transforms,
                                             draws_for_rank, jpeg, make_transform, sample_transforms)

ALL = TransformParams(transforms=TRANSFORMS)


def _images(n: int = 6, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _only(name: str, **ranges) -> TransformParams:
    return TransformParams(transforms=(name,), p_identity=0.0, **ranges)


# ranges that keep every draw away from the identity
STRONG = {"jpeg": {}, "resize": {"resize_scale": (0.5, 0.75)}, "crop": {"crop_area": (0.6, 0.8)},
          "noise": {"noise_std": (0.02, 0.05)}, "blur": {"blur_sigma": (0.5, 1.0)}}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_each_transform_keeps_shape_dtype_and_range_and_changes_the_images(name):
    x = _images()
    y = apply_transforms(x, _only(name, **STRONG[name]), torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert (y - x).abs().flatten(1).max(1).values.min() > 1e-3  # every image changed


@pytest.mark.parametrize("name, ranges", [("resize", {"resize_scale": (1.0, 1.0)}), ("crop", {"crop_area": (1.0, 1.0)}),
                                          ("noise", {"noise_std": (0.0, 0.0)}), ("blur", {"blur_sigma": (0.0, 0.0)})])
def test_each_transform_at_its_neutral_setting_is_the_identity(name, ranges):
    x = _images()
    torch.testing.assert_close(apply_transforms(x, _only(name, **ranges), torch.Generator().manual_seed(1)), x,
                               atol=1e-5, rtol=0)


def test_draws_are_determined_by_the_generator_alone():
    x = _images(12)
    a = apply_transforms(x, ALL, torch.Generator().manual_seed(5))
    b = apply_transforms(x, ALL, torch.Generator().manual_seed(5))
    c = apply_transforms(x, ALL, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(apply_transforms(x, ALL, torch.Generator().manual_seed(5)), a)


def test_identity_probability_and_uniform_choice_among_the_listed_transforms():
    n = 20000
    op = sample_transforms(ALL, n, torch.Generator().manual_seed(0))["op"]
    assert abs(float((op == IDENTITY).float().mean()) - 0.2) < 0.015
    for code in range(len(TRANSFORMS)):  # each of the five gets (1 - 0.2) / 5 = 0.16
        assert abs(float((op == code).float().mean()) - 0.16) < 0.015
    x = _images()
    assert torch.equal(apply_transforms(x, TransformParams(transforms=TRANSFORMS, p_identity=1.0),
                                        torch.Generator().manual_seed(0)), x)
    assert not (sample_transforms(TransformParams(transforms=("jpeg", "blur"), p_identity=0.0), 500,
                                  torch.Generator().manual_seed(0))["op"] == IDENTITY).any()
    assert make_transform(TransformParams()) is None  # off: stage 1 gets no transform at all


@pytest.mark.parametrize("name", TRANSFORMS)
def test_gradients_flow_through_every_transform(name):
    x = _images().requires_grad_(True)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    (apply_transforms(x, _only(name, **STRONG[name]), torch.Generator().manual_seed(1)) * w).sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0


def _pil_jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "JPEG", quality=quality)
        out.append(torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1))
    return torch.stack(out).float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


@pytest.mark.parametrize("quality", [50, 90])
def test_differentiable_jpeg_is_close_to_pil_jpeg(quality):
    """Ours vs PIL's libjpeg (default settings: 4:2:0 chroma) on digits, marked digits and uniform noise.

    Measured PSNR of ours vs PIL (16 px q50, q90; 32 px q50, q90): digits 54.1, 53.7, 51.9, 54.8 dB; digits +
    a +-16/255 sign pattern (what stage 1 transforms) 56.2, 47.2, 47.9, 44.8 (40.4 the lowest over 10 patterns);
    uniform noise, the worst case for a block code (a coefficient near a rounding boundary flips a whole
    quantisation step), 35.8, 42.8, 40.3, 42.6 (30.7 the lowest over 10 noise seeds). What is left is
    libjpeg's fixed-point DCT and colour conversion and its 8-bit decoded samples. Bounds, below every
    measured case: 38 dB for digits (RMS 3.2 / 255), 30 dB for noise; and ours must be at least 6 dB closer
    to PIL's output than the original image is (measured: 8.5 to 31 dB closer), i.e. it reproduces JPEG's
    error rather than passing the image through.
    """
    q = lambda t: (t.clamp(0, 1) * 255).round() / 255  # noqa: E731  (8-bit images, as PIL sees them)
    for size in (16, 32):
        ds = build_dataset("digits", image_size=size, seed=0)
        digits, _ = ds.get_batch(torch.arange(6))
        sign = (16 / 255) * torch.sign(torch.randn(3, size, size, generator=torch.Generator().manual_seed(1)))
        for images, bound in ((q(digits), 38), (q(digits + sign), 38), (q(_images(3, size)), 30)):
            ours, pil = jpeg(images, torch.full((len(images),), quality)), _pil_jpeg(images, quality)
            assert _psnr(ours, pil) > bound
            assert _psnr(ours, pil) > _psnr(images, pil) + 6


def test_rank_slices_of_the_draws_equal_the_one_process_draws():
    """What makes stage 2 with transforms independent of the number of processes."""
    x = _images(8)
    one = draws_for_rank(ALL, 8, seed=3, step=7)
    for world in (2, 4):
        parts = [draws_for_rank(ALL, 8 // world, seed=3, step=7, rank=r, world_size=world) for r in range(world)]
        for k, v in one.items():
            assert torch.equal(torch.cat([p[k] for p in parts]), v), k
        out = torch.cat([apply_drawn(x[r * 8 // world : (r + 1) * 8 // world], p) for r, p in enumerate(parts)])
        torch.testing.assert_close(out, apply_drawn(x, one), atol=1e-6, rtol=0)
    assert not torch.equal(draws_for_rank(ALL, 8, seed=3, step=8)["op"], one["op"])  # another step, other draws


def test_robust_config_errors_name_the_field_and_what_it_expects():
    cases = {"robust.transforms=[jpeg,rotate]": r"robust.transforms.*'rotate'.*valid: jpeg, resize, crop, noise, blur",
             "robust.jpeg_quality=[40,101]": r"robust.jpeg_quality.*1 <= low <= high <= 100",
             "robust.crop_area=[0.9,0.8]": r"robust.crop_area.*0.0 < low <= high <= 1.0; got \[0.9, 0.8\]",
             "robust.resize_scale=[0,1]": r"robust.resize_scale",
             "robust.noise_std=[0.1]": r"robust.noise_std must be \[low, high\]",
             "robust.blur_sigma=[-1,1]": r"robust.blur_sigma",
             "robust.p_identity=1.5": r"robust.p_identity.*\[0, 1\]"}
    for override, pattern in cases.items():
        for schema in (WatermarkConfig, EmbedConfig, DemoConfig):
            with pytest.raises(ConfigError, match=pattern) as e:
                load_config(schema, None, [override])
            assert "\n" not in str(e.value)
    for schema in (WatermarkConfig, EmbedConfig):  # off by default in the stages (the demo embeds its recipe: #27)
        assert load_config(schema, None, []).robust.transforms == []
    with pytest.raises(ConfigError, match="robust.transforms"):
        TransformParams(transforms=("jpg",))


def _encoder():
    torch.manual_seed(0)
    return build_encoder("tiny", {"width": 4, "norm": "group"}, [0.5] * 3, [0.5] * 3, 8)


def test_stage_one_with_transforms_each_secret_depends_on_its_own_seed_only():
    """K secrets generated together with transforms are each what generating it alone gives (as without)."""
    from dist_awenc.watermark.generate import generate_delta, generate_deltas

    enc, t = _encoder(), make_transform(ALL)
    g = torch.Generator().manual_seed(1)
    pool, keys = torch.rand(40, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    together, hist = generate_deltas(enc, pool, keys, [11, 22, 33], steps=4, batch_size=8, progress=False, transform=t)
    alone, h = generate_delta(enc, pool, keys[1], steps=4, batch_size=8, seed=22, progress=False, transform=t)
    torch.testing.assert_close(together[1], alone, atol=1e-6, rtol=0)
    assert h == pytest.approx(hist[1], rel=1e-5)
    plain, _ = generate_delta(enc, pool, keys[1], steps=4, batch_size=8, seed=22, progress=False)
    assert not torch.equal(plain, alone)  # the transform took part
    # any (images, generator) callable works; the RandomTransform's one-pass path gives the same secrets
    generic, _ = generate_deltas(enc, pool, keys, [11, 22, 33], steps=4, batch_size=8, progress=False,
                                 transform=lambda images, g: t(images, g))
    torch.testing.assert_close(generic, together, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ stage runs

ON = "robust.transforms=[jpeg,resize,crop,noise,blur]"


@pytest.fixture(scope="module")
def robust_secret(tmp_path_factory):
    return tiny_f0_and_secret(tmp_path_factory.mktemp("robust"), "generation.steps=6", "generation.batch_size=16",
                              "plan.alternatives=2", ON)


def test_watermark_with_transforms_records_them_and_makes_the_alternatives_the_same_way(robust_secret):
    from dist_awenc.watermark.generate import candidate_seeds, generate_delta
    from dist_awenc.watermark.draw import check_owner_draw
    from dist_awenc.watermark.secret import load_alternatives, load_secret

    root, _, secret_path = robust_secret
    secret = load_secret(secret_path)
    assert secret.meta["robust"] == ALL.record()
    assert json.loads(Path(secret_path).with_suffix(".json").read_text())["robust"]["transforms"] == list(TRANSFORMS)
    assert json.loads((root / "wm" / "generation.json").read_text())["robust"] == ALL.record()
    # each alternative is exactly what the owner's procedure, transforms included, gives with its seed
    enc, _ = load_encoder(root / "f0")
    ds = build_dataset("digits", image_size=8, seed=0)
    pool, _ = ds.get_batch(make_splits(len(ds), 0)["pretrain"])
    alt = load_alternatives(Path(secret_path).with_name("alternatives.safetensors"))
    assert sorted([secret.meta["seed"], *alt.seeds]) == sorted(candidate_seeds(0, 2))  # the owner's drawn among 3
    check_owner_draw(secret, alt)
    kw = dict(steps=6, batch_size=16, progress=False)
    again, _ = generate_delta(enc, pool, alt.keys[1], seed=alt.seeds[1], transform=make_transform(ALL), **kw)
    torch.testing.assert_close(alt.deltas[1], again, atol=1e-6, rtol=0)
    owner, _ = generate_delta(enc, pool, secret.key, seed=secret.meta["seed"], transform=make_transform(ALL), **kw)
    torch.testing.assert_close(secret.delta, owner, atol=1e-6, rtol=0)
    assert not torch.equal(generate_delta(enc, pool, alt.keys[1], seed=alt.seeds[1], **kw)[0], alt.deltas[1])


def test_embedding_with_transforms_runs_and_records_them(robust_secret, tmp_path):
    from dist_awenc.watermark.embed import embed

    root, f0, secret = robust_secret
    over = {"run.out_dir": tmp_path, "run.name": "embed", "encoder": f0, "secret": secret, "data.image_size": 8,
            "train.batch_size": 32, "train.epochs": 1, "train.max_steps": 3, "train.progress": False}
    out = embed(load_config(EmbedConfig, None, [f"{k}={v}" for k, v in over.items()] + [ON]))
    _, card = load_encoder(out)
    assert card["config"]["robust"]["transforms"] == list(TRANSFORMS)
    rows = [json.loads(x) for x in (tmp_path / "embed" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_wm"]) and np.isfinite(r["loss_dev"]) for r in rows)


def test_embed_task_applies_the_draws_to_the_marked_images_only(robust_secret):
    from dist_awenc.ssl.methods import build_method
    from dist_awenc.watermark.embed import EmbedTask
    from dist_awenc.watermark.secret import load_secret

    _, f0_path, secret_path = robust_secret
    f0, _ = load_encoder(f0_path)
    enc = copy.deepcopy(f0)
    task = EmbedTask(build_method("simclr", enc, enc.feature_dim, proj_hidden_dim=16, proj_dim=8), f0,
                     load_secret(secret_path))
    x = _images(6, 8)
    inputs = {"views": [x, x.flip(-1)], "aug": x, "clean": x, "key_aug": x[:1]}
    plain = task(inputs)
    robust = task({**inputs, "robust": draws_for_rank(TransformParams(TRANSFORMS, p_identity=0.0), 6, seed=0, step=0)})
    for k in ("loss_cl", "loss_key", "loss_keep"):
        assert robust[k].item() == plain[k].item(), k
    assert robust["loss_wm"].item() != plain["loss_wm"].item() and robust["loss_dev"].item() != plain["loss_dev"].item()


def test_the_demo_passes_robust_to_its_watermark_and_embed_stages(monkeypatch, tmp_path):
    import dist_awenc.stages.demo as demo_module

    seen = []

    class Enough(Exception):
        pass

    def record(cfg, fn, output):
        seen.append(cfg)
        if isinstance(cfg, EmbedConfig):
            raise Enough
        return tmp_path / output

    monkeypatch.setattr(demo_module, "reuse_or_run", record)
    cfg = load_config(DemoConfig, None, [f"run.out_dir={tmp_path}", ON])
    with pytest.raises(Enough):
        demo_module.demo(cfg)
    stages = {type(c).__name__: c for c in seen}
    assert stages["WatermarkConfig"].robust == cfg.robust == stages["EmbedConfig"].robust
    assert cfg.robust.transforms == list(TRANSFORMS)
