"""MoCo v3's ViT recipe options (issue #31 item 7): a 3-layer projector (``encoder.proj_layers``) and a frozen random
patch embedding (``encoder.freeze_patch_embed``). Their defaults keep every existing run what it was: the same heads
(same state-dict keys), the same trained parameters, and run folders written before the fields existed reused."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_awenc.config import EncoderSection, PretrainConfig, SSLSection, load_config
from dist_awenc.encoders.heads import ScaleBatchNorm1d
from dist_awenc.engine.optim import build_optimizer
from dist_awenc.errors import ConfigError
from dist_awenc.ssl import build_method
from dist_awenc.ssl.pretrain import encoder_from_config, method_from_config

VIT = EncoderSection(arch="timm/vit_tiny_patch16_224", stem="patch4", proj_hidden_dim=16, proj_dim=8,
                     head_norm="batch", proj_out_norm="batch", proj_layers=3, freeze_patch_embed=True)


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())


def _linears(m: nn.Module) -> list[nn.Linear]:
    return [x for x in m.modules() if isinstance(x, nn.Linear)]


def test_a_three_layer_projector_has_three_linears_each_hidden_one_with_batchnorm():
    torch.manual_seed(0)
    m = build_method("moco_v3", _backbone(), 16, proj_hidden_dim=8, proj_dim=4, head_norm="batch", proj_out_norm="batch",
                     proj_layers=3, pred_hidden_dim=8)
    layers = list(m.projector.net)
    kinds = [type(x).__name__ for x in layers]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "ScaleBatchNorm1d"]
    assert [(x.in_features, x.out_features) for x in _linears(m.projector)] == [(16, 8), (8, 8), (8, 4)]
    assert all(x.bias is None for x in _linears(m.projector))  # each Linear is followed by a BatchNorm
    assert isinstance(layers[-1], ScaleBatchNorm1d)
    assert len(_linears(m.momentum_projector)) == 3 and len(_linears(m.predictor)) == 2  # the predictor stays 2-layer
    g = torch.Generator().manual_seed(1)
    m([torch.rand(6, 3, 4, 4, generator=g), torch.rand(6, 3, 4, 4, generator=g)])["loss"].backward()
    assert all(x.weight.grad is not None for x in _linears(m.projector))


@pytest.mark.parametrize("name, kw", [("simclr", {}), ("moco_v2", {"queue_size": 8}), ("byol", {"pred_hidden_dim": 8}),
                                      ("moco_v3", {"pred_hidden_dim": 8})])
def test_every_method_takes_the_projector_depth_and_the_default_keeps_its_heads(name, kw):
    torch.manual_seed(0)
    two = build_method(name, _backbone(), 16, proj_hidden_dim=8, proj_dim=4, **kw)
    three = build_method(name, _backbone(), 16, proj_hidden_dim=8, proj_dim=4, proj_layers=3, **kw)
    assert len(_linears(two.projector)) == 2 and len(_linears(three.projector)) == 3
    assert [k for k in two.state_dict() if k.startswith("projector.")] == [
        "projector.net.0.weight", "projector.net.0.bias", "projector.net.2.weight", "projector.net.2.bias"]
    cfg = method_from_config(SSLSection(method=name, queue_size=8, pred_hidden_dim=8),
                             EncoderSection(proj_hidden_dim=8, proj_dim=4, proj_layers=3), _Encoder())
    assert len(_linears(cfg.projector)) == 3


def test_other_projector_depths_are_one_line_errors():
    assert EncoderSection().proj_layers == 2 and EncoderSection().freeze_patch_embed is False
    with pytest.raises(ValueError, match="proj_layers must be one of 2, 3; got 4"):
        build_method("simclr", _backbone(), 16, proj_layers=4)
    with pytest.raises(ConfigError, match="ssl/encoder settings: .*proj_layers must be one of 2, 3; got 1") as e:
        method_from_config(SSLSection(), EncoderSection(proj_layers=1), _Encoder())
    assert "\n" not in str(e.value)


class _Encoder(nn.Sequential):
    feature_dim = 16

    def __init__(self) -> None:
        super().__init__(*_backbone())


def test_the_frozen_patch_embedding_gets_no_gradient_no_optimiser_slot_and_no_update():
    torch.manual_seed(0)
    encoder, _, _ = encoder_from_config(VIT, 16)
    embed = dict(encoder.backbone.patch_embed.named_parameters())
    assert set(embed) == {"proj.weight", "proj.bias"} and not any(p.requires_grad for p in embed.values())
    method = method_from_config(SSLSection(method="moco_v3", pred_hidden_dim=16), VIT, encoder)
    opt = build_optimizer(method, "adamw", 1e-2, 0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in embed.values())
    assert id(encoder.backbone.blocks[0].attn.qkv.weight) in in_opt  # the rest of the ViT trains
    before = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    method([torch.rand(4, 3, 16, 16, generator=g), torch.rand(4, 3, 16, 16, generator=g)])["loss"].backward()
    assert all(p.grad is None for p in embed.values())
    opt.step()
    method.momentum_update(0.5)
    after = method.backbone.state_dict()
    assert torch.equal(after["backbone.patch_embed.proj.weight"], before["backbone.patch_embed.proj.weight"])
    assert not torch.equal(after["backbone.blocks.0.attn.qkv.weight"], before["backbone.blocks.0.attn.qkv.weight"])
    momentum = method.momentum_backbone.state_dict()  # the key encoder's EMA of a frozen tensor is that tensor
    assert torch.equal(momentum["backbone.patch_embed.proj.weight"], after["backbone.patch_embed.proj.weight"])


@pytest.mark.parametrize("arch", ["tiny", "resnet18", "timm/convnext_atto"])
def test_freezing_a_patch_embedding_is_refused_for_an_arch_without_one(arch):
    enc = EncoderSection(arch=arch, freeze_patch_embed=True)
    with pytest.raises(ConfigError, match=f"freeze_patch_embed=true: {arch} has no patch embedding") as e:
        encoder_from_config(enc, 16)
    assert "\n" not in str(e.value)


def test_a_folder_from_before_these_fields_is_the_same_run_at_their_defaults(tmp_path):
    from test_runs import _folder_from_before

    from dist_awenc.runs import config_difference

    base = [f"run.out_dir={tmp_path}", "run.name=p"]
    cfg = load_config(PretrainConfig, None, base)
    _folder_from_before(tmp_path, "p", cfg, "encoder.proj_layers", "encoder.freeze_patch_embed")
    assert config_difference(tmp_path / "p", cfg) is None
    deeper = load_config(PretrainConfig, None, base + ["encoder.proj_layers=3"])
    assert config_difference(tmp_path / "p", deeper)[0] == "encoder.proj_layers"


def test_embedding_rebuilds_f0s_projector_depth_from_its_card():
    from dist_awenc.config import EmbedConfig
    from dist_awenc.watermark.embed import _encoder_section_from_card

    card = {"config": {"encoder": {"proj_hidden_dim": 8, "proj_dim": 4, "head_norm": "batch", "proj_layers": 3}}}
    assert _encoder_section_from_card(card, EmbedConfig()).proj_layers == 3
    assert _encoder_section_from_card({"config": {"encoder": {"proj_dim": 4}}}, EmbedConfig()).proj_layers == 2
