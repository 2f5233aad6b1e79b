"""Single-process tests of dist_awenc.ssl (losses, heads, methods, registry)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.encoders.heads import MLPHead
from dist_awenc.ssl import (
    BYOL,
    METHODS,
    MoCoV2,
    MoCoV3,
    SimCLR,
    SSLMethod,
    build_method,
    byol_momentum,
    byol_regression,
    moco_infonce,
    mocov3_infonce,
    nt_xent,
    register_method,
)

FEAT = 16
IMG = (3, 4, 4)


def tiny_backbone() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMG), FEAT))


def make(name: str, **kw) -> SSLMethod:
    torch.manual_seed(0)
    defaults = dict(proj_hidden_dim=32, proj_dim=8)
    if name == "moco_v2":
        defaults["queue_size"] = 64
    defaults.update(kw)
    return build_method(name, tiny_backbone(), FEAT, **defaults)


def views(b: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *IMG, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)]


# ----------------------------------------------------------------------------- references


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """Full 2N x 2N similarity matrix, explicit loop over anchors (float64)."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    sim = z @ z.T / t
    losses = []
    for i in range(n2):
        pos = (i + n) % n2
        denom = sum(torch.exp(sim[i, k]) for k in range(n2) if k != i)
        losses.append(-torch.log(torch.exp(sim[i, pos]) / denom))
    return torch.stack(losses).mean()


def ref_infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    q = q.double()
    k = k.detach().double()
    queue = queue.double()
    losses = []
    for i in range(q.shape[0]):
        qi = q[i] / q[i].norm()
        ki = k[i] / k[i].norm()
        logits = [qi @ ki] + [qi @ (queue[j] / queue[j].norm()) for j in range(queue.shape[0])]
        logits = torch.stack(logits) / t
        losses.append(-logits[0] + torch.logsumexp(logits, 0))
    return torch.stack(losses).mean()


def ref_byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    z = z.detach()
    vals = [2 - 2 * (p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(p.shape[0])]
    return torch.stack(vals).mean()


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_double_loop(t):
    torch.manual_seed(0)
    z1 = torch.randn(5, 7, requires_grad=True)
    z2 = torch.randn(5, 7, requires_grad=True)
    loss = nt_xent(z1, z2, temperature=t)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    a1 = z1.detach().double().requires_grad_()
    a2 = z2.detach().double().requires_grad_()
    ref = ref_nt_xent(a1, a2, t)
    r1, r2 = torch.autograd.grad(ref, (a1, a2))
    assert loss.shape == () and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g1.double(), r1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g2.double(), r2, atol=1e-5, rtol=1e-4)


def test_nt_xent_gather_is_identity_on_one_process_and_scale_invariant():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    a = nt_xent(z1, z2, gather=True)
    torch.testing.assert_close(a, nt_xent(z1, z2, gather=False))
    torch.testing.assert_close(a, nt_xent(3 * z1, 0.5 * z2))  # normalised inside


def test_nt_xent_half_precision_input():
    z1, z2 = torch.randn(4, 3).bfloat16(), torch.randn(4, 3).bfloat16()
    out = nt_xent(z1, z2)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize("t", [0.07, 0.2])
def test_moco_infonce_matches_explicit_logits(t):
    torch.manual_seed(0)
    q = torch.randn(4, 6, requires_grad=True)
    k = torch.randn(4, 6, requires_grad=True)
    queue = F.normalize(torch.randn(9, 6), dim=1)
    loss = moco_infonce(q, k, queue, temperature=t)
    loss.backward()
    a = q.detach().double().requires_grad_()
    ref = ref_infonce(a, k, queue, t)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad.double(), a.grad, atol=1e-5, rtol=1e-4)
    assert k.grad is None  # keys are detached


def test_byol_regression_matches_cosine_and_stops_gradient():
    torch.manual_seed(0)
    p = torch.randn(5, 4, requires_grad=True)
    z = torch.randn(5, 4, requires_grad=True)
    loss = byol_regression(p, z)
    loss.backward()
    a = p.detach().double().requires_grad_()
    ref = ref_byol(a, z.double())
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(p.grad.double(), a.grad, atol=1e-6, rtol=1e-5)
    assert z.grad is None
    assert byol_regression(z.detach(), z.detach()).abs() < 1e-6
    torch.testing.assert_close(byol_regression(z.detach(), -z.detach()), torch.tensor(4.0))


@pytest.mark.parametrize("bad", [0, -0.1, float("nan"), True, "0.5"])
def test_loss_temperature_validation(bad):
    z = torch.randn(3, 2)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        moco_infonce(z, z, z, temperature=bad)


def test_loss_shape_validation():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(torch.randn(3, 2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="same shape"):
        byol_regression(torch.randn(3, 2, 1), torch.randn(3, 2, 1))
    with pytest.raises(ValueError, match="queue"):
        moco_infonce(torch.randn(3, 2), torch.randn(3, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="empty"):
        nt_xent(torch.randn(0, 2), torch.randn(0, 2))


# ----------------------------------------------------------------------------- heads


def test_mlp_head_structure():
    h = MLPHead(6, 10, 3, num_layers=3, norm="batch")
    kinds = [type(m) for m in h.net]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert h(torch.randn(4, 6)).shape == (4, 3)
    h = MLPHead(6, 10, 3)
    assert [type(m) for m in h.net] == [nn.Linear, nn.ReLU, nn.Linear]
    assert h.net[0].bias is not None
    h = MLPHead(6, 10, 3, num_layers=1)
    assert [type(m) for m in h.net] == [nn.Linear] and h.net[0].in_features == 6


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(norm="layer"), "norm"),
        (dict(num_layers=0), "num_layers"),
        (dict(in_dim=0), "in_dim"),
        (dict(out_dim=2.5), "out_dim"),
    ],
)
def test_mlp_head_validation(kw, match):
    args = dict(in_dim=4, hidden_dim=8, out_dim=2) | kw
    with pytest.raises(ValueError, match=match):
        MLPHead(**args)


# ----------------------------------------------------------------------------- registry


def test_registry_contents_and_build():
    assert list(METHODS) == ["simclr", "moco_v2", "byol", "moco_v3"]
    for name, cls in [("simclr", SimCLR), ("moco_v2", MoCoV2), ("byol", BYOL), ("moco_v3", MoCoV3)]:
        m = make(name)
        assert type(m) is cls and m.method_name == name
    m = make("moco_v2", temperature=0.1, queue_size=32, momentum=0.9)
    assert (m.temperature, m.queue_size, m.momentum) == (0.1, 32, 0.9)
    assert m.queue.shape == (32, 8)


def test_registry_errors():
    with pytest.raises(ValueError, match="simclr, moco_v2, byol"):
        build_method("swav", tiny_backbone(), FEAT)
    with pytest.raises(ValueError, match="already registered"):
        register_method("simclr")(SimCLR)
    assert METHODS["simclr"] is SimCLR
    with pytest.raises(TypeError):
        build_method("simclr", tiny_backbone(), FEAT, queue_size=3)  # not a SimCLR argument


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("simclr", dict(temperature=0), "temperature"),
        ("simclr", dict(head_norm="layer"), "head_norm"),
        ("simclr", dict(proj_dim=0), "proj_dim"),
        ("simclr", dict(proj_hidden_dim=-1), "proj_hidden_dim"),
        ("moco_v2", dict(temperature=-1.0), "temperature"),
        ("moco_v2", dict(queue_size=0), "queue_size"),
        ("moco_v2", dict(momentum=1.5), "momentum"),
        ("moco_v2", dict(queue_seed=0.5), "queue_seed"),
        ("byol", dict(momentum=-0.1), "momentum"),
        ("byol", dict(pred_hidden_dim=0), "pred_hidden_dim"),
        ("moco_v3", dict(temperature=0.0), "temperature"),
        ("moco_v3", dict(momentum=2.0), "momentum"),
        ("moco_v3", dict(pred_hidden_dim=0), "pred_hidden_dim"),
    ],
)
def test_method_hyperparameter_validation(name, kw, match):
    with pytest.raises(ValueError, match=match):
        make(name, **kw)


def test_method_feature_dim_and_backbone_validation():
    with pytest.raises(ValueError, match="feature_dim"):
        SimCLR(tiny_backbone(), 0)
    with pytest.raises(ValueError, match="backbone"):
        SimCLR(lambda x: x, FEAT)


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("name", ["simclr", "moco_v2", "byol", "moco_v3"])
def test_method_forward_backward(name):
    m = make(name)
    out = m(views())
    loss = out["loss"]
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    for p in m.backbone.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for p in m.projector.parameters():
        assert p.grad is not None
    for mod_name in ("momentum_backbone", "momentum_projector"):
        if hasattr(m, mod_name):
            for p in getattr(m, mod_name).parameters():
                assert not p.requires_grad and p.grad is None


@pytest.mark.parametrize("name", ["simclr", "moco_v2", "byol", "moco_v3"])
def test_method_rejects_bad_views_and_progress(name):
    m = make(name)
    v = views()
    with pytest.raises(ValueError, match="2 views"):
        m([v[0]])
    with pytest.raises(ValueError, match="2 views"):
        m(v + v[:1])
    with pytest.raises(ValueError, match="same shape"):
        m([v[0], v[1][:3]])
    with pytest.raises(ValueError, match="progress"):
        m.momentum_update(1.5)


def test_cl_loss_equals_forward_loss():
    for name in ("simclr", "byol", "moco_v3"):
        m = make(name)
        torch.testing.assert_close(m.cl_loss(views()), m(views())["loss"])
    m = make("moco_v2")
    twin = copy.deepcopy(m)
    torch.testing.assert_close(m.cl_loss(views()), twin(views())["loss"])
    torch.testing.assert_close(m.queue, twin.queue)


def test_simclr_loss_is_nt_xent_of_projections():
    m = make("simclr", temperature=0.3)
    v = views()
    z1, z2 = (m.projector(m.backbone(x)) for x in v)
    torch.testing.assert_close(m(v)["loss"], ref_nt_xent(z1, z2, 0.3).float(), atol=1e-5, rtol=1e-5)
    m.momentum_update(0.5)  # no-op, accepted


def test_state_dict_contents():
    simclr = set(make("simclr").state_dict())
    assert all(k.startswith(("backbone.", "projector.")) for k in simclr)
    moco = set(make("moco_v2").state_dict())
    assert {"queue", "queue_ptr"} <= moco
    assert any(k.startswith("momentum_backbone.") for k in moco)
    assert any(k.startswith("momentum_projector.") for k in moco)
    byol = set(make("byol").state_dict())
    assert any(k.startswith("predictor.") for k in byol)
    assert any(k.startswith("momentum_backbone.") for k in byol)
    mocov3 = set(make("moco_v3").state_dict())  # everything a resumed run needs; no queue
    assert {k.split(".")[0] for k in mocov3} == {"backbone", "projector", "predictor", "momentum_backbone",
                                                 "momentum_projector"}


def _perturb_online(m: SSLMethod) -> None:
    with torch.no_grad():
        for p in list(m.backbone.parameters()) + list(m.projector.parameters()):
            p.add_(torch.randn_like(p))


def test_moco_momentum_update_formula():
    m = make("moco_v2", momentum=0.9)
    for a, b in zip(m.momentum_backbone.parameters(), m.backbone.parameters()):
        torch.testing.assert_close(a, b)  # initialised as a copy
    _perturb_online(m)
    old_t = [p.clone() for p in list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())]
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    m.momentum_update(0.3)
    new_t = list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())
    for t_old, t_new, o in zip(old_t, new_t, online, strict=True):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * o)


def test_byol_momentum_schedule():
    assert byol_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert byol_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert byol_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert byol_momentum(0.9, 0.25) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_byol_momentum_update_formula(progress):
    m = make("byol", momentum=0.9)
    _perturb_online(m)
    old_t = [p.clone() for p in list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())]
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    m.momentum_update(progress)
    mom = 1 - 0.1 * (math.cos(math.pi * progress) + 1) / 2
    assert m.current_momentum == pytest.approx(mom)
    new_t = list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())
    for t_old, t_new, o in zip(old_t, new_t, online, strict=True):
        torch.testing.assert_close(t_new, mom * t_old + (1 - mom) * o)
    if progress == 1.0:
        for t_old, t_new in zip(old_t, new_t):
            torch.testing.assert_close(t_new, t_old)


def _keys(m: MoCoV2, v: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [F.normalize(m.momentum_projector(m.momentum_backbone(x)), dim=1) for x in v]


def test_moco_queue_initialisation_is_seeded_and_normalised():
    a, b, c = make("moco_v2"), make("moco_v2"), make("moco_v2", queue_seed=1)
    torch.testing.assert_close(a.queue, b.queue)
    assert not torch.allclose(a.queue, c.queue)
    torch.testing.assert_close(a.queue.norm(dim=1), torch.ones(64))
    assert a.queue_ptr.dtype == torch.long and int(a.queue_ptr) == 0


def test_moco_loss_uses_queue_before_enqueue_then_enqueues():
    m = make("moco_v2", queue_size=10, temperature=0.2)
    v = views(b=3)
    q1, q2 = (m.projector(m.backbone(x)) for x in v)
    k1, k2 = _keys(m, v)
    queue0 = m.queue.clone()
    expected = 0.5 * (ref_infonce(q1, k2, queue0, 0.2) + ref_infonce(q2, k1, queue0, 0.2))
    loss = m(v)["loss"]
    torch.testing.assert_close(loss, expected.float(), atol=1e-5, rtol=1e-5)
    # 2 views x 3 keys written at 0..5, view-major; the rest untouched
    assert int(m.queue_ptr) == 6
    torch.testing.assert_close(m.queue[:6], torch.cat([k1, k2]))
    torch.testing.assert_close(m.queue[6:], queue0[6:])


def test_moco_queue_pointer_wraps():
    m = make("moco_v2", queue_size=10)
    v = views(b=3)
    m(v)
    assert int(m.queue_ptr) == 6
    before = m.queue.clone()
    k1, k2 = _keys(m, v)  # no optimiser step: same keys again
    m(v)
    assert int(m.queue_ptr) == 2  # 6 + 6 = 12 -> 2
    new = torch.cat([k1, k2])
    torch.testing.assert_close(m.queue[6:10], new[:4])
    torch.testing.assert_close(m.queue[0:2], new[4:6])
    torch.testing.assert_close(m.queue[2:6], before[2:6])


def test_moco_more_keys_than_queue_keeps_last():
    m = make("moco_v2", queue_size=4)
    v = views(b=3)
    k1, k2 = _keys(m, v)
    m(v)
    assert int(m.queue_ptr) == 0  # 4 keys written, (0 + 4) % 4
    torch.testing.assert_close(m.queue, torch.cat([k1, k2])[-4:])


def test_moco_eval_mode_does_not_enqueue():
    m = make("moco_v2").eval()
    before = m.queue.clone()
    m(views())
    assert int(m.queue_ptr) == 0
    torch.testing.assert_close(m.queue, before)


@pytest.mark.parametrize("name", ["simclr", "moco_v2", "byol", "moco_v3"])
def test_loss_goes_down(name):
    m = make(name, momentum=0.9) if name != "simclr" else make(name)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    steps = 40
    losses = []
    for step in range(steps):
        # fresh images every step: with a fixed small set, MoCo's queue would
        # fill with keys of the same images (false negatives) and plateau
        x = torch.randn(16, *IMG, generator=g)
        v = [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)]
        loss = m(v)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.momentum_update((step + 1) / steps)
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.9 * first, (name, losses)


# ----------------------------------------------------------------------------- MoCo v3


def ref_mocov3(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """Explicit loop: query i against every key, its own key the positive (float64)."""
    q, k = q.double(), k.detach().double()
    losses = []
    for i in range(q.shape[0]):
        logits = torch.stack([q[i] @ k[j] / (q[i].norm() * k[j].norm()) for j in range(k.shape[0])]) / t
        losses.append(-logits[i] + torch.logsumexp(logits, 0))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_mocov3_infonce_matches_explicit_logits(t):
    torch.manual_seed(0)
    q = torch.randn(5, 6, requires_grad=True)
    k = torch.randn(5, 6, requires_grad=True)
    loss = mocov3_infonce(q, k, temperature=t)
    loss.backward()
    a = q.detach().double().requires_grad_()
    ref = ref_mocov3(a, k, t)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad.double(), a.grad, atol=1e-5, rtol=1e-4)
    assert k.grad is None  # keys are the momentum encoder's: no gradient
    with pytest.raises(ValueError, match="temperature"):
        mocov3_infonce(q, k, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        mocov3_infonce(q, k[:3])


@pytest.mark.numerics
def test_mocov3_infonce_on_two_ranks_equals_one_process_on_the_whole_batch(monkeypatch):
    """Each rank's queries against the gathered keys, labelled rank * b + i: the mean over ranks of the loss (and the
    DDP-averaged gradient of each rank's queries) equals one process on the concatenated batch."""
    from dist_awenc.engine import dist

    torch.manual_seed(0)
    b, world = 3, 2
    q = torch.randn(world * b, 6)
    k = torch.randn(world * b, 6)
    whole = q.clone().requires_grad_()
    full = mocov3_infonce(whole, k, 0.2)
    full.backward()
    monkeypatch.setattr(dist, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: world)
    monkeypatch.setattr(dist, "gather_nograd", lambda x: F.normalize(k, dim=1))  # every rank's (normalised) keys
    losses = []
    for r in range(world):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        local = q[r * b:(r + 1) * b].clone().requires_grad_()
        loss = mocov3_infonce(local, k[r * b:(r + 1) * b], 0.2)
        loss.backward()
        losses.append(loss.detach())
        torch.testing.assert_close(local.grad / world, whole.grad[r * b:(r + 1) * b])  # DDP averages over ranks
    torch.testing.assert_close(torch.stack(losses).mean(), full.detach())
    monkeypatch.setattr(dist, "gather_nograd", lambda x: F.normalize(k[:4], dim=1))
    with pytest.raises(ValueError, match="same local batch size"):
        mocov3_infonce(q[:b], k[:b], 0.2)


def test_moco_v3_loss_is_symmetrised_infonce_of_predictions_against_momentum_keys():
    m = make("moco_v3", temperature=0.3)
    _perturb_online(m)  # the key encoder differs from the query encoder
    v = views()
    q1, q2 = (m.predictor(m.projector(m.backbone(x))) for x in v)
    with torch.no_grad():
        k1, k2 = (m.momentum_projector(m.momentum_backbone(x)) for x in v)
    expected = 0.5 * (ref_mocov3(q1, k2, 0.3) + ref_mocov3(q2, k1, 0.3))
    torch.testing.assert_close(m(v)["loss"].double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_moco_v3_momentum_update_follows_the_cosine_schedule(progress):
    m = make("moco_v3", momentum=0.9)
    _perturb_online(m)
    old_t = [p.clone() for p in list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())]
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    m.momentum_update(progress)
    mom = byol_momentum(0.9, progress)
    assert m.current_momentum == pytest.approx(mom)
    new_t = list(m.momentum_backbone.parameters()) + list(m.momentum_projector.parameters())
    for t_old, t_new, o in zip(old_t, new_t, online, strict=True):
        torch.testing.assert_close(t_new, mom * t_old + (1 - mom) * o)
    assert not any(p.requires_grad for p in m.momentum_backbone.parameters())


@pytest.mark.numerics
def test_moco_v3_pretrain_resumes_bit_for_bit(tmp_path):
    """`awenc pretrain` with ssl.method=moco_v3: a run killed after 3 steps and resumed ends with the same encoder,
    heads and momentum encoder as one that ran through (everything is in the method's state dict)."""
    from conftest import tiny_overrides, weights
    from dist_awenc.config import PretrainConfig, load_config
    from dist_awenc.engine.loop import Interrupted
    from dist_awenc.ssl.pretrain import pretrain

    def cfg(name):
        return load_config(PretrainConfig, None, tiny_overrides(tmp_path, name, **{"ssl.method": "moco_v3"}))

    full = pretrain(cfg("full"))
    with pytest.raises(Interrupted):
        pretrain(cfg("cut"), interrupt_at=3)
    resumed = pretrain(cfg("cut"))
    for name in ("encoder.safetensors", "method.safetensors"):
        a, b = weights(full.with_name(name)), weights(resumed.with_name(name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert any(k.startswith("momentum_backbone.") for k in weights(full.with_name("method.safetensors")))
