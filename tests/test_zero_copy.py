"""A training step never waits on a host-to-device copy (#12, "a step that never waits").

On a CPU-only machine the device is the CPU, where no copy is visible. So the steps run with the model and the
batch on the ``meta`` device: every tensor the step creates on the host and takes to the device shows up at the
dispatcher as a CPU -> meta copy (``aten._to_copy`` / ``aten.copy_``), as ``torch.tensor(..., device=...)`` at the
torch-function level, or as an op mixing a CPU tensor with a meta one. A meta tensor also has no values, so a step
that read a device value on the host (``.item()``, ``nonzero`` for an index, ``if tensor:``) would fail here.

Each step (pre-training's views + forward + backward + optimiser step + momentum update; stage 2's inputs + the
same) starts from a batch and a draw already on the device and must make no host-to-device copy at all: the host half
of its inputs (:meth:`~dist_awenc.data.transfer.StepInputs.draw`) is taken over before the step, with the batch, by
:func:`~dist_awenc.data.transfer.move_step`, in two non-blocking copies (the images; everything else in one buffer,
pinned on CUDA). On the code before #12 (its ``make_inputs`` bodies in place of ``pretrain_inputs`` /
``embed_inputs``) the same counter saw 16 blocking copies in each pre-training step and 22 in the embedding step;
with the draws moved inside the step, one.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dist_awenc.data.transfer import move_step, to_device_once
from dist_awenc.data.views import ViewConfig, mild_view_config
from dist_awenc.encoders.io import build_encoder
from dist_awenc.engine.optim import build_optimizer
from dist_awenc.ssl.methods import build_method
from dist_awenc.ssl.pretrain import pretrain_inputs
from dist_awenc.watermark.embed import EmbedTask, embed_inputs
from dist_awenc.watermark.secret import Secret
from dist_awenc.watermark.transforms import TransformParams

META = torch.device("meta")
S = 16


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]


class HostToDevice(TorchDispatchMode):
    """Records host-to-device traffic at the dispatcher: ``copies`` (op, non_blocking, shape) of CPU tensors to
    another device, and ``mixed``: ops that take a CPU tensor of rank >= 1 together with a tensor elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, bool, tuple]] = []
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        ts = _tensors(args, kwargs)
        if name == "_to_copy" and ts[0].device.type == "cpu" and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.copies.append((name, bool(kwargs.get("non_blocking", False)), tuple(ts[0].shape)))
        elif name == "copy_" and ts[0].device.type != "cpu" and ts[1].device.type == "cpu":
            self.copies.append((name, bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False)),
                                tuple(ts[1].shape)))
        elif any(t.device.type != "cpu" for t in ts) and any(t.device.type == "cpu" and t.ndim > 0 for t in ts):
            self.mixed.append(name)
        return func(*args, **kwargs)


class DataToDevice(TorchFunctionMode):
    """``torch.tensor`` / ``as_tensor`` / ``asarray`` straight onto another device: a copy the dispatcher never sees."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and kwargs.get("device") is not None:
            if torch.device(kwargs["device"]).type != "cpu":
                self.calls.append(func.__name__)
        return func(*args, **kwargs)


def traffic(step) -> tuple[HostToDevice, DataToDevice]:
    h2d, data = HostToDevice(), DataToDevice()
    with data, h2d:
        step()
    return h2d, data


def assert_no_copy(step, steps: int = 2) -> None:
    """Runs ``step(i)`` for i < steps; none makes a host-to-device copy or mixes host and device tensors."""
    for i in range(steps):
        h2d, data = traffic(lambda: step(i))
        assert not h2d.copies, f"step {i}: {len(h2d.copies)} host-to-device copies inside the step: {h2d.copies}"
        assert not h2d.mixed, f"step {i}: ops mixing host and device tensors {h2d.mixed}"
        assert not data.calls, f"step {i}: tensors made from host data on the device {data.calls}"


def _moved(make_inputs, batch, i):
    """The loop's transfer before step i (outside the counted step): the batch and the step's draw on META."""
    draw = make_inputs.draw(len(batch[0]), i)
    return (*move_step(batch, draw, META), draw)


def _encoder():
    torch.manual_seed(0)
    return build_encoder("tiny", {"width": 8}, [0.5] * 3, [0.25] * 3, S)


def _train_step(model, optimizer, inputs) -> None:
    out = model(inputs)
    out["loss"].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.momentum_update(0.5)


@pytest.mark.parametrize("method,optim", [("simclr", "sgd"), ("simclr", "lars"), ("moco_v2", "sgd"), ("byol", "lars"),
                                          ("moco_v3", "sgd")])
def test_a_pretraining_step_makes_no_copy(method, optim):
    import dist_awenc.ssl.mocov3  # noqa: F401  (registers moco_v3)

    enc = _encoder()
    extra = {"queue_size": 32} if method == "moco_v2" else {}
    model = build_method(method, enc, enc.feature_dim, proj_hidden_dim=16, proj_dim=8, **extra).to(META)
    optimizer = build_optimizer(model, optim, lr=0.1, weight_decay=1e-4)
    make_inputs = pretrain_inputs(ViewConfig(blur_p=0.5, grayscale_p=0.5), seed=0, rank=1, world=2)
    batch = (torch.empty(6, 3, S, S, dtype=torch.uint8), torch.zeros(6, dtype=torch.long))
    moved = [_moved(make_inputs, batch, i) for i in range(2)]
    assert_no_copy(lambda i: _train_step(model, optimizer, make_inputs.apply(*moved[i])))


@pytest.mark.parametrize("with_shadow", [False, True], ids=["plain", "shadow"])
def test_an_embedding_step_makes_no_copy(with_shadow):
    """With ``shadow.weight`` > 0 too: the shadow student's two terms and their weight gradients stay on the device."""
    from dist_awenc.watermark.shadow import Shadow, build_shadow

    g = torch.Generator().manual_seed(0)
    secret = Secret(key=torch.rand(3, S, S, generator=g), delta=16 / 255 * torch.sign(torch.randn(3, S, S, generator=g)),
                    eps=16 / 255, control_seed=1)
    f0 = _encoder()
    f = copy.deepcopy(f0)
    card = {"arch": "tiny", "arch_kwargs": {"width": 8}}
    shadow = Shadow(build_shadow(f0, card, "", seed=0), 0, "", card) if with_shadow else None
    task = EmbedTask(build_method("byol", f, f.feature_dim, proj_hidden_dim=16, proj_dim=8), f0, secret,
                     shadow=shadow, lambda_shadow=1.0).to(META)
    task.train()
    optimizer = build_optimizer(task, "sgd", lr=0.1, weight_decay=1e-4)
    make_inputs = embed_inputs(ViewConfig(blur_p=0.5), mild_view_config(), secret.key.to(META), seed=0, rank=0,
                               world=1, robust=TransformParams())
    batch = (torch.empty(5, 3, S, S),)
    moved = [_moved(make_inputs, batch, i) for i in range(2)]
    assert_no_copy(lambda i: _train_step(task, optimizer, make_inputs.apply(*moved[i])))


def test_the_counter_sees_the_copies_it_must_see():
    """The checks above can fail: each kind of host-to-device traffic is caught."""
    x = torch.empty(3, device=META)
    h2d, data = traffic(lambda: (torch.ones(3).to(META), x.copy_(torch.ones(3)), torch.tensor([1.0], device=META),
                                 torch.zeros(3).to(META, non_blocking=True)))
    assert [c[1] for c in h2d.copies] == [False, False, True]
    assert data.calls == ["tensor"]
    with pytest.raises(AssertionError, match="1 host-to-device copies"):
        assert_no_copy(lambda i: torch.ones(2).to(META, non_blocking=True), steps=1)


def test_the_transfer_before_a_step_is_two_nonblocking_copies():
    """move_step: the images (pinned by the loader on CUDA) and one buffer for labels, index and the draw."""
    make_inputs = pretrain_inputs(ViewConfig(), seed=0, rank=0, world=1)
    batch = (torch.zeros(4, 3, S, S, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), torch.arange(4))
    draw = make_inputs.draw(4, 0)
    h2d, data = traffic(lambda: move_step(batch, draw, META))
    assert [c[1] for c in h2d.copies] == [True, True], h2d.copies
    assert h2d.copies[0][2] == (4, 3, S, S) and h2d.copies[1][2][0] % 16 == 0  # the images, then the packed buffer
    assert not data.calls
    (images, labels, index), moved = move_step(batch, draw, META)
    assert images.dtype == torch.float32 and labels.device == index.device == META and len(moved) == 1


def test_the_two_halves_make_what_one_call_makes():
    """On the CPU, ``apply(move_step(draw))`` gives the same views as ``make_inputs(batch, step)``, uint8 included."""
    make_inputs = pretrain_inputs(ViewConfig(blur_p=0.5), seed=3, rank=0, world=1)
    x8 = torch.randint(0, 256, (4, 3, S, S), dtype=torch.uint8)
    draw = make_inputs.draw(4, 7)
    halves = make_inputs.apply(*move_step((x8,), draw, "cpu"), draw)
    whole = make_inputs((x8.float() / 255,), 7)
    assert all(torch.equal(a, b) for a, b in zip(halves, whole))


def test_to_device_once_keeps_shapes_dtypes_and_values():
    parts = [torch.rand(3, 5), torch.arange(7), torch.tensor([True, False, True]), torch.rand(2, dtype=torch.float64),
             torch.empty(0, 4)]
    assert to_device_once(parts, "cpu") == parts  # the CPU: nothing moved
    moved = to_device_once(parts, META)
    assert [(t.device.type, t.dtype, t.shape) for t in moved] == [("meta", p.dtype, p.shape) for p in parts]
    if torch.cuda.is_available():
        back = to_device_once(parts, "cuda")
        assert all(torch.equal(a.cpu(), b) for a, b in zip(back, parts))
    with pytest.raises(ValueError, match="CPU tensors"):
        to_device_once([torch.empty(2, device=META)], META)
