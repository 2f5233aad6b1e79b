"""The EMA of the momentum encoders and LARS run as ``torch._foreach_*`` ops; here they are checked against the
per-parameter loops they replaced (kept below as the reference), value for value, over several steps."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_awenc.engine.optim import LARS, build_optimizer, param_groups
from dist_awenc.ssl.methods import _ema_


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5), nn.LayerNorm(5))


@torch.no_grad()
def _ema_loop(target: nn.Module, online: nn.Module, momentum: float) -> None:
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.lerp_(p_o.detach(), 1.0 - momentum)


def _lars_loop(opt: LARS, state: dict) -> None:
    """The per-parameter LARS step as it was written before the foreach version (state: param index -> buffer)."""
    with torch.no_grad():
        k = 0
        for g in opt.param_groups:
            for p in g["params"]:
                k += 1
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if g["lars"]:
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(trust)
                buf = state.get(k)
                if buf is None:
                    buf = state[k] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


@pytest.mark.parametrize("momentum", [0.0, 0.9, 0.996, 1.0])
def test_foreach_ema_equals_the_per_parameter_lerp(momentum):
    online, target = _net(0), _net(1)
    ref = copy.deepcopy(target)
    for step in range(4):
        with torch.no_grad():
            for p in online.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        _ema_(target, online, momentum)
        _ema_loop(ref, online, momentum)
        for a, b in zip(target.parameters(), ref.parameters()):
            assert torch.equal(a, b), step


def test_ema_refuses_networks_of_different_parameter_counts():
    with pytest.raises(ValueError, match="EMA"):
        _ema_(nn.Linear(2, 2), nn.Linear(2, 2, bias=False), 0.9)


@pytest.mark.parametrize("weight_decay", [0.0, 1e-4])
def test_foreach_lars_equals_the_per_parameter_loop(weight_decay):
    net = _net(0)
    ref = copy.deepcopy(net)
    opt = build_optimizer(net, "lars", lr=0.3, weight_decay=weight_decay)
    ref_opt = LARS(param_groups(ref, weight_decay), lr=0.3, momentum=0.9)  # only its groups are used
    assert [g["lars"] for g in opt.param_groups] == [True, False]  # weights of rank >= 2 vs biases and norms
    ref_state: dict = {}
    torch.manual_seed(5)
    for step in range(5):
        x = torch.randn(6, 3, 8, 8)
        for model in (net, ref):
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
        if step == 2:  # a parameter without a gradient is skipped (its buffer untouched)
            net[3].bias.grad = None
            ref[3].bias.grad = None
        for g in opt.param_groups + ref_opt.param_groups:
            g["lr"] = 0.3 * (step + 1) / 5
        opt.step()
        _lars_loop(ref_opt, ref_state)
        for a, b in zip(net.parameters(), ref.parameters()):
            assert torch.equal(a, b), step
    bufs = [opt.state[p]["momentum_buffer"] for g in opt.param_groups for p in g["params"]]  # the reference's order
    assert all(torch.equal(a, b) for a, b in zip(bufs, [ref_state[k] for k in sorted(ref_state)]))


def test_lars_trust_ratio_is_one_on_zero_weights_and_skipped_on_biases_and_norms():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
    b0 = lin.bias.detach().clone()
    opt = LARS(param_groups(lin, 0.0), lr=1.0, momentum=0.0, eta=1e-3)
    lin.weight.grad = torch.ones_like(lin.weight)
    lin.bias.grad = torch.full_like(lin.bias, 2.0)
    opt.step()
    assert torch.equal(lin.weight.detach(), -torch.ones(2, 3))  # |w| = 0: trust 1, a plain SGD step
    assert torch.equal(lin.bias.detach(), b0 - 2.0)  # a 1-d parameter: no trust ratio
    opt.step()  # |w| = |d| = sqrt(6): the step is eta * d
    assert torch.allclose(lin.weight.detach(), torch.full((2, 3), -1.0 - 1e-3))
    assert torch.equal(lin.bias.detach(), b0 - 4.0)
