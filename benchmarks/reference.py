"""The reference: a plain hand-written PyTorch training step on views already on the device.

This is the step a pure-PyTorch SimCLR (MoCo v2, BYOL, embedding) loop would
run once its views are on the device: models built directly with torchvision
(ResNet with the CIFAR or ImageNet stem, ``fc`` removed) plus
``nn.Sequential`` heads; the SimCLR NT-Xent, MoCo v2 InfoNCE with a queue,
BYOL regression and the AWEncoder embedding loss written inline; momentum
encoders updated with ``torch._foreach_lerp_``; MoCo's queue pointer a Python
int and the queue written after the backward pass. The optimiser is the one
the project builds (``build_optimizer``).

Its inputs are a fixed pool of views (:func:`premade_pool`), made before any
clock starts by the project's own ``make_inputs`` (so the loss check compares
the same views) and already in the memory format the step wants; the loop
cycles through the pool. A reference step is therefore forward, backward,
optimiser step and momentum update, nothing else: the ratio of the project's
step to it shows everything the project adds, its view making included.

Parameter and buffer names mirror the project's modules once the wrappers are
dropped (``backbone.backbone.`` -> ``backbone.``, ``projector.net.`` ->
``projector.``): :func:`copy_project_state` loads a project state dict with
``strict=True``, which proves the architectures are the same, and the suites
then compare the two losses on the same views.
"""
from __future__ import annotations

import copy
import math
import re
from contextlib import nullcontext
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def resnet(arch: str, stem: str) -> tuple[nn.Module, int]:
    """torchvision ResNet with ``fc`` removed; the CIFAR stem is a 3x3 stride-1 conv without max-pool."""
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


class ScaleBN(nn.Module):
    """BatchNorm with a learned scale and no shift (SimCLR's projector output)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn, self.weight = nn.BatchNorm1d(dim, affine=False), nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.bn(x) * self.weight


def mlp(in_dim: int, hidden: int, out: int, norm: str, out_norm: str = "none") -> nn.Sequential:
    """Linear -> [BatchNorm1d] -> ReLU -> Linear [-> BatchNorm, scale only]."""
    bn = [nn.BatchNorm1d(hidden)] if norm == "batch" else []
    tail = [nn.Linear(hidden, out, bias=False), ScaleBN(out)] if out_norm == "batch" else [nn.Linear(hidden, out)]
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=norm == "none"), *bn, nn.ReLU(inplace=True), *tail)


def frozen(m: nn.Module) -> nn.Module:
    m = copy.deepcopy(m)
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class _Pixels(nn.Module):
    """Holds the input normalisation (not saved, like the project's Encoder)."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class RefSimCLR(_Pixels):
    def __init__(self, arch, stem, mean, std, hidden, out, head_norm, temperature, out_norm="none", scale=1.0) -> None:
        super().__init__(mean, std)
        self.backbone, dim = resnet(arch, stem)
        self.projector = mlp(dim, hidden, out, head_norm, out_norm)
        self.t, self.scale = temperature, scale  # scale 2: the two directions summed (ssl.loss_reduction=sum)

    def z(self, x):
        return self.projector(self.backbone(self.norm(x)))

    def forward(self, v1, v2):
        z = F.normalize(torch.cat([self.z(v1), self.z(v2)]).float(), dim=1)  # (2b, d)
        n = v1.shape[0]
        logits = (z @ z.T / self.t).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
        loss = F.cross_entropy(logits, target)
        return (loss if self.scale == 1.0 else self.scale * loss), None


class RefMoCo(_Pixels):
    def __init__(self, arch, stem, mean, std, hidden, out, head_norm, temperature, queue_size, momentum,
                 out_norm="none", scale=1.0, symmetric=True) -> None:
        super().__init__(mean, std)
        self.backbone, dim = resnet(arch, stem)
        self.projector = mlp(dim, hidden, out, head_norm, out_norm)
        self.scale, self.symmetric = scale, symmetric
        self.momentum_backbone, self.momentum_projector = frozen(self.backbone), frozen(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, out), dim=1))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))  # only so the state dicts match
        self.t, self.m, self.ptr = temperature, momentum, 0

    def forward(self, v1, v2):
        target = torch.zeros(v1.shape[0], dtype=torch.long, device=v1.device)

        def nce(q, k):
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], dim=1) / self.t
            return F.cross_entropy(logits, target)

        q1 = F.normalize(self.projector(self.backbone(self.norm(v1))).float(), dim=1)
        if not self.symmetric:  # MoCo v2's paper: query of view 1, key of view 2
            with torch.no_grad():
                k2 = F.normalize(self.momentum_projector(self.momentum_backbone(self.norm(v2))).float(), dim=1)
            return nce(q1, k2), k2
        q2 = F.normalize(self.projector(self.backbone(self.norm(v2))).float(), dim=1)
        with torch.no_grad():
            k1 = F.normalize(self.momentum_projector(self.momentum_backbone(self.norm(v1))).float(), dim=1)
            k2 = F.normalize(self.momentum_projector(self.momentum_backbone(self.norm(v2))).float(), dim=1)
        two = nce(q1, k2) + nce(q2, k1)
        return (0.5 * two if self.scale == 1.0 else two), torch.cat([k1, k2])

    @torch.no_grad()
    def after_step(self, aux, progress: float) -> None:
        """EMA of the key encoder, then the keys into the queue (after backward: the loss saw the old queue)."""
        torch._foreach_lerp_(list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters()),
                             list(self.backbone.parameters()) + list(self.projector.parameters()), 1 - self.m)
        keys = aux[-self.queue.shape[0]:]
        k, n = self.queue.shape[0], keys.shape[0]
        if self.ptr + n <= k:
            self.queue[self.ptr:self.ptr + n] = keys
        else:
            self.queue.index_copy_(0, (self.ptr + torch.arange(n, device=keys.device)) % k, keys)
        self.ptr = (self.ptr + n) % k


class RefBYOL(_Pixels):
    def __init__(self, arch, stem, mean, std, hidden, out, head_norm, pred_hidden, momentum, out_norm="none",
                 scale=1.0) -> None:
        super().__init__(mean, std)
        self.backbone, dim = resnet(arch, stem)
        self.projector = mlp(dim, hidden, out, head_norm, out_norm)
        self.scale = scale
        self.predictor = mlp(out, pred_hidden, out, head_norm)
        self.momentum_backbone, self.momentum_projector = frozen(self.backbone), frozen(self.projector)
        self.m0 = momentum

    def forward(self, v1, v2):
        p1 = self.predictor(self.projector(self.backbone(self.norm(v1))))
        p2 = self.predictor(self.projector(self.backbone(self.norm(v2))))
        with torch.no_grad():
            t1 = self.momentum_projector(self.momentum_backbone(self.norm(v1)))
            t2 = self.momentum_projector(self.momentum_backbone(self.norm(v2)))

        def reg(p, t):
            return (2 - 2 * F.cosine_similarity(p.float(), t.float(), dim=1)).mean()

        two = reg(p1, t2) + reg(p2, t1)
        return (0.5 * two if self.scale == 1.0 else two), None

    @torch.no_grad()
    def after_step(self, aux, progress: float) -> None:
        m = 1 - (1 - self.m0) * (math.cos(math.pi * progress) + 1) / 2
        torch._foreach_lerp_(list(self.momentum_backbone.parameters()) + list(self.momentum_projector.parameters()),
                             list(self.backbone.parameters()) + list(self.projector.parameters()), 1 - m)


class RefEmbed(nn.Module):
    """Stage 2: L = cl + wm + 0.5 dev + key + keep on a SimCLR method (weights as given)."""

    def __init__(self, method: RefSimCLR, f0: nn.Module, delta, key, weights: dict[str, float], freeze_bn: bool = True) -> None:
        super().__init__()
        self.method = method
        self.f0 = frozen(f0).eval()
        self.register_buffer("delta", delta.clone())
        self.register_buffer("key", key.clone())
        self.w, self.freeze_bn = weights, freeze_bn

    def train(self, mode: bool = True):
        super().train(mode)
        self.f0.eval()
        if self.freeze_bn:
            for m in self.method.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, v1, v2, aug, clean, key_aug):
        norm, b = self.method.norm, aug.shape[0]
        marked = (aug + self.delta).clamp(0, 1)
        feats = self.method.backbone(norm(torch.cat([marked, aug, clean, self.key[None], key_aug])))
        f_m, f_a, f_c, f_k, f_ka = feats[:b], feats[b:2 * b], feats[2 * b:3 * b], feats[3 * b:3 * b + 1], feats[3 * b + 1:]
        with torch.no_grad():
            f0_out = self.f0(norm(torch.cat([clean, self.key[None]])))
        cos = F.cosine_similarity
        loss = (self.w["cl"] * self.method(v1, v2)[0]
                + self.w["wm"] * (1 - cos(f_m, f_k.expand_as(f_m), dim=1)).mean()
                + self.w["dev"] * cos(f_m, f_a.detach(), dim=1).mean()
                + self.w["key"] * (1 - cos(f_ka, f0_out[-1:], dim=1)).mean()
                + self.w["keep"] * (1 - cos(f_c, f0_out[:-1], dim=1)).mean())
        return loss, None


# ----------------------------------------------------------------- building from the project's config sections


def build_reference(kind: str, enc, ssl, *, embed: Optional[dict] = None) -> nn.Module:
    """The reference module of ``kind`` (simclr, moco_v2, byol, embed) from the project's config sections.

    ``embed`` (for kind ``embed``): ``{"delta", "key", "weights", "freeze_bn"}``.
    """
    if enc.arch not in ("resnet18", "resnet34", "resnet50") or enc.norm != "batch":
        raise ValueError(f"the reference has torchvision ResNets with BatchNorm only, not {enc.arch}/{enc.norm}")
    # the recipe options of checkouts that have them (issue #31): projector output BN, summed directions, MoCo v2's
    # one-direction loss
    common = dict(arch=enc.arch, stem=enc.stem or "cifar", mean=enc.mean, std=enc.std, hidden=enc.proj_hidden_dim,
                  out=enc.proj_dim, head_norm=enc.head_norm, out_norm=getattr(enc, "proj_out_norm", "none"),
                  scale=2.0 if getattr(ssl, "loss_reduction", "mean") == "sum" else 1.0)
    if kind == "simclr":
        return RefSimCLR(**common, temperature=ssl.temperature if ssl.temperature is not None else 0.5)
    if kind == "moco_v2":
        return RefMoCo(**common, temperature=ssl.temperature if ssl.temperature is not None else 0.2,
                       queue_size=ssl.queue_size, momentum=ssl.momentum, symmetric=getattr(ssl, "symmetric", True))
    if kind == "byol":
        return RefBYOL(**common, pred_hidden=ssl.pred_hidden_dim, momentum=ssl.momentum)
    if kind == "embed":
        method = RefSimCLR(**common, temperature=ssl.temperature if ssl.temperature is not None else 0.5)
        return RefEmbed(method, method.backbone, embed["delta"], embed["key"], embed["weights"], embed["freeze_bn"])
    raise ValueError(f"unknown reference kind {kind!r}")


def reference_key(k: str) -> str:
    """A project state-dict key -> the reference's (drop the Encoder and MLPHead wrappers)."""
    k = re.sub(r"(^|\.)((?:momentum_)?backbone|f0)\.backbone\.", r"\1\2.", k)
    return re.sub(r"(^|\.)((?:momentum_)?projector|predictor)\.net\.", r"\1\2.", k)


def copy_project_state(reference: nn.Module, project: nn.Module) -> None:
    """Load the project's weights and buffers into the reference (strict: same architecture or an error)."""
    state = {reference_key(k): v for k, v in project.state_dict().items()}
    reference.load_state_dict(state, strict=True)


# ----------------------------------------------------------------- the reference loop


class ReferenceLoop:
    """The hand-written training step, run ``n`` steps at a time on a pool of premade inputs.

    Args:
        module: a reference module (forward(*inputs) -> (loss, aux)).
        optimizer: built on ``module`` with the project's ``build_optimizer``.
        pool: input lists already on the device (:func:`premade_pool`); step ``i`` uses ``pool[i % len(pool)]``.
        total_steps: schedule length (cosine learning rate, BYOL momentum).
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, pool: list[list[torch.Tensor]],
                 *, device: torch.device, mixed_precision: str, channels_last: bool, compile: bool, total_steps: int) -> None:
        if not pool:
            raise ValueError("ReferenceLoop needs at least one premade input list")
        self.module, self.optimizer, self.pool = module, optimizer, pool
        self.device, self.total = device, total_steps
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mixed_precision == "bf16" else nullcontext
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        module.to(device)
        if channels_last:
            module.to(memory_format=torch.channels_last)
        module.train()
        self.forward = torch.compile(module) if compile else module
        self.i = 0

    def step(self) -> torch.Tensor:
        inputs = self.pool[self.i % len(self.pool)]
        mult = 0.5 * (1 + math.cos(math.pi * min(1.0, self.i / max(1, self.total))))
        for g in self.optimizer.param_groups:
            g["lr"] = g["initial_lr"] * mult
        with self.autocast():
            loss, aux = self.forward(*inputs)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.i += 1
        if hasattr(self.module, "after_step"):
            self.module.after_step(aux, min(1.0, self.i / max(1, self.total)))
        return loss

    def run(self, n: int) -> None:
        for _ in range(n):
            self.step()


def premade_pool(make_inputs: Callable[[tuple, int], Any], batch: tuple, size: int, *, channels_last: bool,
                 first_step: int = 10**7) -> list[list[torch.Tensor]]:
    """``size`` input lists for the reference, made now (before any clock) by the project's ``make_inputs``.

    ``batch`` is on the device, so the views are too; with ``channels_last`` the 4-d ones are stored in that
    memory format, as a plain loop would have them after its host-to-device copy.
    """
    pool = []
    with torch.no_grad():
        for j in range(size):
            inputs = unpack_inputs(make_inputs(batch, first_step + j))
            if channels_last:
                inputs = [x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in inputs]
            pool.append([x.detach() for x in inputs])
    return pool


def count_flops(build: Callable[[], nn.Module], input_shapes: list[tuple[int, ...]]) -> Optional[int]:
    """FLOPs of one forward + backward of a reference module, counted on the meta device (costs no compute).

    Returns None when an operator has no meta kernel.
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            module = build()
            module.train()
            inputs = [torch.rand(s) for s in input_shapes]
        counter = FlopCounterMode(display=False)
        with counter:
            loss, _ = module(*inputs)
            loss.backward()
        return int(counter.get_total_flops())
    except Exception:  # noqa: BLE001  (an op without a meta kernel: no FLOP count, not a failure)
        return None


def unpack_inputs(inputs: Any) -> list[torch.Tensor]:
    """The project's forward input (a list of views, or the embedding dict) as the reference's argument list."""
    if isinstance(inputs, dict):
        return [*inputs["views"], inputs["aug"], inputs["clean"], inputs["key_aug"]]
    return list(inputs)
