"""Two real gloo processes versus one process on the concatenated batch.

Two spawned CPU processes (accelerate's debug launch, see :func:`_launch`)
rendezvous through a file store (gloo, no port). Each rank takes its slice of
a deterministic global batch, runs the losses / DDP-wrapped methods and
writes its results with ``torch.save``; the parent process (where no process group exists, so every
``dist`` helper is the single-process identity) runs the same code on the
whole batch and compares.

Conventions checked:

* loss: the mean over ranks of the local loss equals the single-process loss;
* parameter gradients: averaged over ranks (``dist.all_reduce_mean`` or DDP)
  they equal the single-process gradients;
* input gradients: each rank's gradient w.r.t. its local inputs equals
  ``world_size`` times the single-process gradient of the same rows (the
  local loss is ``world_size`` times its share of the global mean; for
  ``nt_xent`` the gather's backward sums every rank's contribution).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_awenc.engine import dist
from dist_awenc.ssl import build_method, byol_regression, moco_infonce, nt_xent

pytestmark = pytest.mark.numerics  # CI runs the whole module again on the AVX2 path (#30)

WORLD = 2
B = 6  # global batch, 3 per rank
D = 5
IN = 7
IMG = (3, 4, 4)
FEAT = 16
QUEUE = 20  # global keys per step = 2 views * 6 = 12: the 2nd step wraps


# ----------------------------------------------------------------------------- shared code


def _loss_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "z1": torch.randn(B, D, generator=g),
        "z2": torch.randn(B, D, generator=g),
        "x1": torch.randn(B, IN, generator=g),
        "x2": torch.randn(B, IN, generator=g),
        "queue": torch.nn.functional.normalize(torch.randn(9, D, generator=g), dim=1),
    }


def _tiny_linear() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(IN, D)


LOSSES = {
    "nt_xent": lambda a, b, queue: nt_xent(a, b, temperature=0.3, gather=True),
    "moco_infonce": lambda a, b, queue: moco_infonce(a, b, queue, temperature=0.2),
    "byol_regression": lambda a, b, queue: byol_regression(a, b),
}


def _run_losses(sl: slice) -> dict[str, torch.Tensor]:
    """Every loss on rows ``sl``: on raw inputs and through a tiny linear model."""
    data = _loss_data()
    out: dict[str, torch.Tensor] = {}
    for name, fn in LOSSES.items():
        z1 = data["z1"][sl].clone().requires_grad_()
        z2 = data["z2"][sl].clone().requires_grad_()
        loss = fn(z1, z2, data["queue"])
        loss.backward()
        out[f"{name}/loss"] = loss.detach()
        out[f"{name}/grad_z1"] = z1.grad
        if name == "nt_xent":
            out[f"{name}/grad_z2"] = z2.grad  # the others stop the gradient of their 2nd input

        model = _tiny_linear()
        loss = fn(model(data["x1"][sl]), model(data["x2"][sl]), data["queue"])
        loss.backward()
        out[f"{name}/model_loss"] = dist.all_reduce_mean(loss.detach())
        for pname, p in model.named_parameters():
            out[f"{name}/model_grad_{pname}"] = dist.all_reduce_mean(p.grad)  # DDP-style averaging
    return out


def _run_gather_probe() -> dict[str, torch.Tensor]:
    """Gradient through a gather whose downstream gradient is non-contiguous."""
    x = (torch.arange(3 * 2, dtype=torch.float32).view(3, 2) + 10 * dist.rank()).requires_grad_()
    w = torch.arange(2 * 3 * WORLD, dtype=torch.float32).view(2, 3 * WORLD)
    out = {}
    (dist.gather(x).T * w).sum().backward()  # d/dgathered = w.T: a transposed, non-contiguous gradient
    out["probe/dist_gather"] = x.grad.clone()
    return out


def _method_data(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, *IMG, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)]


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMG), FEAT))
    kw = dict(proj_hidden_dim=12, proj_dim=D)
    if name == "moco_v2":
        kw |= dict(queue_size=QUEUE, momentum=0.9)
    if name == "byol":
        kw |= dict(momentum=0.9, pred_hidden_dim=12)
    return build_method(name, backbone, FEAT, **kw)


def _run_method(name: str, sl: slice, wrap=lambda m: m) -> dict[str, torch.Tensor]:
    """Two training steps (SGD + momentum update) of method ``name`` on rows ``sl``."""
    method = _build(name)
    model = wrap(method)  # DDP on 2 ranks (via Accelerator.prepare), identity on 1
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    out: dict[str, torch.Tensor] = {}
    for step in range(2):
        loss = model([v[sl] for v in _method_data(step)])["loss"]
        opt.zero_grad()
        loss.backward()
        out[f"loss{step}"] = dist.all_reduce_mean(loss.detach())
        if step == 0:
            for pname, p in method.named_parameters():
                if p.requires_grad:
                    out[f"grad/{pname}"] = p.grad.clone()
        opt.step()
        method.momentum_update((step + 1) / 2)
    for key, t in method.state_dict().items():
        out[f"state/{key}"] = t.clone()
    return out


def _worker(outdir: str, mode: str) -> None:
    """Body run in each of the 2 forked processes (module level, importable)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # the fork inherits accelerate's singletons if the parent made an Accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == WORLD and dist.world_size() == WORLD
    r = dist.rank()
    per = B // WORLD
    sl = slice(r * per, (r + 1) * per)
    if mode == "losses":
        result = _run_losses(sl)
        result |= _run_gather_probe()
    else:
        result = {name: _run_method(name, sl, wrap=accelerator.prepare) for name in ("simclr", "moco_v2", "byol")}
        result["ddp_wrapped"] = type(accelerator.prepare(_build("simclr"))).__name__
    torch.save(result, os.path.join(outdir, f"{mode}_rank{r}.pt"))
    dist.barrier()


def _launch(tmp_path: Path, mode: str) -> list[dict]:
    """``accelerate.debug_launcher`` with ``spawn`` instead of ``fork``.

    ``debug_launcher`` forks; once the (pytest) parent has run a multi-threaded
    OpenMP/MKL kernel, a forked child's first parallel GEMM deadlocks in
    libgomp (``gomp_team_barrier_wait_end``). Spawned children start clean;
    the gloo group is still set up by accelerate's ``PrepareForLaunch(debug=True)``
    through a file store (no TCP port to pick).
    """
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    from dist_awenc.engine.loop import _free_port

    rdv_file = tmp_path / f"{mode}.rdv"
    with patch_environment(
        world_size=WORLD,
        master_addr="127.0.0.1",
        master_port=str(_free_port()),  # a free one: two test processes (pytest -n 2) never share it
        accelerate_mixed_precision="no",
        accelerate_debug_rdv_file=str(rdv_file),
        accelerate_use_cpu="yes",
        gloo_socket_ifname="lo",
        omp_num_threads="1",
    ):
        launcher = PrepareForLaunch(_worker, debug=True)
        start_processes(launcher, args=(str(tmp_path), mode), nprocs=WORLD, start_method="spawn")
    return [torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def loss_results(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ssl_losses"), "losses")


@pytest.fixture(scope="module")
def method_results(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("ssl_methods"), "methods")


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_two_processes_equal_one_process(loss_results, name):
    assert not dist.is_dist()  # the parent is a single process
    ref = _run_losses(slice(None))
    per = B // WORLD
    # loss: the global mean
    close(sum(r[f"{name}/loss"] for r in loss_results) / WORLD, ref[f"{name}/loss"])
    # input gradients: world_size x the single-process rows
    grad_keys = [k for k in ref if k.startswith(f"{name}/grad_")]
    assert grad_keys
    for key in grad_keys:
        for rank, res in enumerate(loss_results):
            close(res[key] / WORLD, ref[key][rank * per : (rank + 1) * per])
    # a tiny linear model: loss and DDP-averaged parameter gradients
    for key in [k for k in ref if k.startswith(f"{name}/model_")]:
        for res in loss_results:
            close(res[key], ref[key])


def test_nt_xent_negatives_really_cross_ranks(loss_results):
    """Without the gather the 2-rank mean would differ from the global loss."""
    data = _loss_data()
    per = B // WORLD
    local_only = sum(
        nt_xent(data["z1"][r * per : (r + 1) * per], data["z2"][r * per : (r + 1) * per], 0.3, gather=False)
        for r in range(WORLD)
    ) / WORLD
    glob = nt_xent(data["z1"], data["z2"], 0.3)
    assert not torch.allclose(local_only, glob, atol=1e-3)
    close(sum(r["nt_xent/loss"] for r in loss_results) / WORLD, glob)


@pytest.mark.parametrize("name", ["simclr", "moco_v2", "byol"])
def test_ddp_method_two_processes_equal_one_process(method_results, name):
    assert method_results[0]["ddp_wrapped"] == "DistributedDataParallel"
    ref = _run_method(name, slice(None))
    for res in method_results:
        got = res[name]
        assert set(got) == set(ref)
        for key in ref:
            # losses of both steps, step-0 gradients, and the state after two
            # steps: online/momentum weights, MoCo's queue and queue_ptr
            close(got[key], ref[key]) if ref[key].is_floating_point() else torch.testing.assert_close(
                got[key], ref[key]
            )


def test_moco_queue_identical_on_ranks_and_wrapped(method_results):
    q0 = method_results[0]["moco_v2"]["state/queue"]
    q1 = method_results[1]["moco_v2"]["state/queue"]
    torch.testing.assert_close(q0, q1, atol=0, rtol=0)
    # 2 steps x 12 global keys into a ring of 20: pointer wrapped to 4
    assert int(method_results[0]["moco_v2"]["state/queue_ptr"]) == (2 * 2 * B) % QUEUE


def _probe_expected(rank: int) -> torch.Tensor:
    # every rank's loss contributes w.T for the rank's rows: sum over ranks
    w = torch.arange(2 * 3 * WORLD, dtype=torch.float32).view(2, 3 * WORLD)
    return WORLD * w.T[rank * 3 : (rank + 1) * 3]


def test_engine_dist_gather_with_non_contiguous_gradient(loss_results):
    for rank, res in enumerate(loss_results):
        torch.testing.assert_close(res["probe/dist_gather"], _probe_expected(rank))
