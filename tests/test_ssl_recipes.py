"""The methods' paper details (issue #31): the loss scale of a symmetrised loss (``ssl.loss_reduction``), MoCo v2's
one-direction loss (``ssl.symmetric=false``), and BatchNorm on the projector's output (``encoder.proj_out_norm``).
Every default computes what it computed before (the digits recipes' numbers do not move)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.config import EncoderSection, SSLSection
from dist_awenc.encoders.heads import MLPHead, ScaleBatchNorm1d
from dist_awenc.engine.optim import param_groups
from dist_awenc.errors import ConfigError
from dist_awenc.ssl import build_method, moco_infonce
from dist_awenc.ssl.pretrain import method_from_config


def _backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.ReLU())


def _views(b: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(b, 3, 4, 4, generator=g), torch.rand(b, 3, 4, 4, generator=g)]


def _pair(name: str, **kw):
    """The method built twice from the same seed: loss_reduction mean and sum (identical weights)."""
    out = []
    for reduction in ("mean", "sum"):
        torch.manual_seed(0)
        out.append(build_method(name, _backbone(), 16, proj_hidden_dim=8, proj_dim=4, loss_reduction=reduction, **kw))
    return out


@pytest.mark.parametrize("name, kw", [("simclr", {}), ("byol", {"pred_hidden_dim": 8}), ("moco_v3", {"pred_hidden_dim": 8}),
                                      ("moco_v2", {"queue_size": 16})])
def test_summed_directions_are_twice_the_mean_in_loss_and_gradient(name, kw):
    mean, total = _pair(name, **kw)
    views = _views()
    lm, ls = mean(views)["loss"], total(views)["loss"]
    assert torch.allclose(ls, 2 * lm, rtol=1e-6)
    lm.backward()
    ls.backward()
    for (n, a), (_, b) in zip(mean.named_parameters(), total.named_parameters()):
        if a.grad is not None:
            assert torch.allclose(b.grad, 2 * a.grad, rtol=1e-5, atol=1e-8), n


def test_the_default_is_the_mean_the_digits_recipes_were_tuned_at():
    assert SSLSection().loss_reduction == "mean" and SSLSection().symmetric is True
    assert EncoderSection().proj_out_norm == "none"
    m = build_method("byol", _backbone(), 16, proj_hidden_dim=8, proj_dim=4, pred_hidden_dim=8)
    assert m.loss_reduction == "mean"


def test_moco_v2_one_direction_is_the_papers_loss_and_enqueues_one_key_per_image():
    torch.manual_seed(0)
    m = build_method("moco_v2", _backbone(), 16, proj_hidden_dim=8, proj_dim=4, queue_size=32, symmetric=False)
    v1, v2 = _views()
    queue = m.queue.clone()
    calls = []
    m.backbone.register_forward_hook(lambda *a: calls.append("q"))
    m.momentum_backbone.register_forward_hook(lambda *a: calls.append("k"))
    loss = m([v1, v2])["loss"]
    assert calls == ["q", "k"]  # one pass of each encoder a step: half the symmetric loss's
    with torch.no_grad():
        q1 = m.projector(m.backbone(v1))
        k2 = F.normalize(m.momentum_projector(m.momentum_backbone(v2)), dim=1)
    assert torch.allclose(loss, moco_infonce(q1, k2, queue, 0.2), rtol=1e-6)
    assert int(m.queue_ptr) == 6 and torch.allclose(m.queue[:6], k2, atol=1e-6)


def test_one_direction_is_moco_v2s_setting_alone():
    with pytest.raises(ValueError, match="symmetric=False has one"):
        build_method("moco_v2", _backbone(), 16, proj_hidden_dim=8, proj_dim=4, symmetric=False, loss_reduction="sum")
    enc = EncoderSection(proj_hidden_dim=8, proj_dim=4)
    with pytest.raises(ConfigError, match="ssl.symmetric=false is MoCo v2's one-direction loss; simclr's"):
        method_from_config(SSLSection(method="simclr", symmetric=False), enc, _Encoder())
    with pytest.raises(ConfigError, match="ssl/encoder settings: .*loss_reduction must be one of mean, sum"):
        method_from_config(SSLSection(method="byol", loss_reduction="max"), enc, _Encoder())
    m = method_from_config(SSLSection(method="moco_v2", symmetric=False, queue_size=8), enc, _Encoder())
    assert m.symmetric is False


class _Encoder(nn.Sequential):
    feature_dim = 16

    def __init__(self) -> None:
        super().__init__(*_backbone())


def test_projector_output_batchnorm_scales_without_a_shift():
    head = MLPHead(16, 8, 4, norm="batch", out_norm="batch")
    last_linear, out_bn = head.net[-2], head.net[-1]
    assert isinstance(out_bn, ScaleBatchNorm1d) and last_linear.bias is None and not out_bn.bn.affine
    z = head(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(z.mean(0), torch.zeros(4), atol=1e-5)  # standardised over the batch (train mode)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(4), atol=1e-3)
    with torch.no_grad():
        out_bn.weight.mul_(3.0)
    assert torch.allclose(head(torch.randn(64, 16)).std(0, unbiased=False), torch.full((4,), 3.0), atol=3e-3)
    assert "out_norm='batch'" in repr(head) and "out_norm" not in repr(MLPHead(16, 8, 4))
    with pytest.raises(ValueError, match="out_norm must be one of none, batch"):
        MLPHead(16, 8, 4, out_norm="layer")


def test_simclr_with_output_batchnorm_keeps_its_scale_out_of_weight_decay_and_lars():
    torch.manual_seed(0)
    m = build_method("simclr", _backbone(), 16, proj_hidden_dim=8, proj_dim=4, head_norm="batch", proj_out_norm="batch")
    assert "projector.net.4.weight" in dict(m.named_parameters()) and "projector.net.3.bias" not in m.state_dict()
    assert "projector.net.4.bn.running_mean" in m.state_dict()
    no_decay = [g for g in param_groups(m, 1e-6) if not g["lars"]][0]["params"]
    assert any(p is m.projector.net[4].weight for p in no_decay)
    m(_views())["loss"].backward()


def test_embedding_reads_the_projectors_output_norm_from_f0s_card():
    from dist_awenc.config import EmbedConfig
    from dist_awenc.watermark.embed import _encoder_section_from_card

    card = {"config": {"encoder": {"proj_hidden_dim": 8, "proj_dim": 4, "head_norm": "batch", "proj_out_norm": "batch"}}}
    sec = _encoder_section_from_card(card, EmbedConfig())
    assert (sec.head_norm, sec.proj_out_norm) == ("batch", "batch")
    assert _encoder_section_from_card({"config": {"encoder": {"proj_dim": 4}}}, EmbedConfig()).proj_out_norm == "none"
