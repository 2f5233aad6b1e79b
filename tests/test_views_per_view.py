"""Per-view augmentations (issue #31): ``views.view2`` overrides the second view's settings, and BYOL's solarisation
runs on the device path after the blur. A config without either draws and applies exactly what it did before."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_awenc.config import PretrainConfig, load_config
from dist_awenc.data.color import solarize
from dist_awenc.data.views import PER_VIEW_FIELDS, ViewConfig, apply_params, draw_views, make_views, sample_params
from dist_awenc.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IDENTITY = dict(crop_scale_min=1.0, crop_scale_max=1.0, crop_ratio_min=1.0, crop_ratio_max=1.0, flip_p=0.0,
                jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def test_solarize_inverts_from_the_middle_up_like_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.tensor([0.0, 0.2, 0.4999, 0.5, 0.75, 1.0])
    assert torch.equal(solarize(x), torch.tensor([0.0, 0.2, 0.4999, 0.5, 0.25, 0.0]))
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(solarize(img), TF.solarize(img, threshold=0.5))


def test_solarize_p_one_applies_it_after_the_blur():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = apply_params(x, sample_params(ViewConfig(**IDENTITY, solarize_p=1.0), 4, torch.Generator().manual_seed(0)))
    assert torch.allclose(out, solarize(x), atol=1e-6)
    blur_then = ViewConfig(**{**IDENTITY, "blur_p": 1.0}, solarize_p=1.0)
    params = sample_params(blur_then, 4, torch.Generator().manual_seed(0))
    blurred = apply_params(x, {**params, "solarize": torch.zeros(4, dtype=torch.bool)})
    assert torch.allclose(apply_params(x, params), solarize(blurred), atol=1e-6)


def test_no_solarisation_draws_nothing_so_old_configs_draw_the_same_views():
    """13 draws of n values per view without solarisation (what every config drew before), 14 with it."""
    for p, calls in ((0.0, 13), (0.2, 14)):
        gen, ref = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        params = sample_params(ViewConfig(solarize_p=p), 6, gen)
        for _ in range(calls):
            torch.rand(6, generator=ref)
        assert torch.equal(gen.get_state(), ref.get_state())
        assert params["solarize"].dtype == torch.bool and (p > 0 or not params["solarize"].any())


def test_view2_overrides_the_second_view_only():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    cfg = ViewConfig(**IDENTITY, view2={"solarize_p": 1.0})
    v1, v2 = make_views(x, cfg, seed=0, step=3)
    assert torch.allclose(v1, x, atol=1e-5) and torch.allclose(v2, solarize(x), atol=1e-5)
    byol_like = ViewConfig(**{**IDENTITY, "blur_p": 1.0}, view2={"blur_p": 0.0})
    b1, b2 = make_views(x, byol_like, seed=0, step=3)
    assert not torch.allclose(b1, x, atol=1e-3) and torch.allclose(b2, x, atol=1e-5)
    d = draw_views(cfg, 3, seed=0, step=3)
    assert d.flags[0, :, 3].sum() == 0 and bool(d.flags[1, :, 3].all())  # (view, image, jitter/gray/blur/solarize)


def test_view2_applies_on_the_loaders_crops_too():
    """views.crop=decode: the loader cut the crops, the device flips and colours each view with its own settings."""
    x = torch.rand(2, 2, 3, 8, 8, generator=torch.Generator().manual_seed(3))  # (b, V, 3, S, S)
    cfg = ViewConfig(**IDENTITY, crop="decode", view2={"solarize_p": 1.0})
    draw = draw_views(cfg, 2, seed=1, step=0)
    v1, v2 = draw.apply(x, draw.packed)
    assert torch.allclose(v1, x[:, 0]) and torch.allclose(v2, solarize(x[:, 1]))


def test_solarisation_rate_follows_its_probability():
    flags = sample_params(ViewConfig(solarize_p=0.2), 20_000, torch.Generator().manual_seed(0))["solarize"]
    assert abs(flags.float().mean().item() - 0.2) < 0.015


def test_view2_keys_and_values_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"views.view2: 'crop_scale_min' cannot differ per view; valid keys: flip_p"):
        load_config(PretrainConfig, None, ["views.view2.crop_scale_min=0.5"])
    with pytest.raises(ConfigError, match=r"views.view2: .*solarize_p is a probability"):
        load_config(PretrainConfig, None, ["views.view2.solarize_p=2"])
    with pytest.raises(ConfigError, match="solarize_p is a probability"):
        load_config(PretrainConfig, None, ["views.solarize_p=-0.1"])
    assert "solarize_p" in PER_VIEW_FIELDS and "crop_scale_min" not in PER_VIEW_FIELDS


def test_imagenet_byol_config_has_the_papers_asymmetric_views():
    views = load_config(PretrainConfig, CONFIGS / "pretrain" / "imagenet_resnet50_byol.yaml").views
    first, second = views.for_view(0), views.for_view(1)
    assert (first.blur_p, first.solarize_p) == (1.0, 0.0) and (second.blur_p, second.solarize_p) == (0.1, 0.2)
    assert all(getattr(first, f) == getattr(second, f) for f in PER_VIEW_FIELDS if f not in ("blur_p", "solarize_p"))


def test_a_larger_second_view_sigma_widens_the_shared_kernel():
    cfg = ViewConfig(blur_p=1.0, blur_sigma_max=1.0, view2={"blur_sigma_max": 3.0})
    assert draw_views(cfg, 2, seed=0, step=0).radius == 9
    assert draw_views(ViewConfig(blur_p=1.0, blur_sigma_max=1.0), 2, seed=0, step=0).radius == 3
