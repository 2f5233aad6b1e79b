"""The ``health`` suite's SyncBN check: SyncBatchNorm under DDP on N processes against one BatchNorm over the
global batch.

Every rank builds the same small network (BatchNorm2d -> ReLU -> pool -> Linear -> BatchNorm1d), converts it to
SyncBatchNorm (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, what ``dist_awenc.engine.loop.prepare_model`` does
for ``train.sync_bn``), wraps it in DDP and feeds it its shard of a global batch; the reference is an unconverted
copy, in the same process, fed the whole global batch. The shards are drawn with different means and scales
(shard r: x * (1 + r) + 2r), so a BatchNorm that used its shard's statistics alone would be far off. Over
``ITERS`` forward + backward passes, with DDP's buffer broadcast off (so that the agreement is SyncBN's own: with
Accelerate's default DDP copies rank 0's buffers every forward), each rank compares:

* its outputs with the reference's rows of its shard (both BatchNorm layers);
* the input gradient of its shard, and N x its DDP-averaged parameter gradients (the global loss is the sum of
  the ranks' losses), with the reference's;
* its running means and variances with the reference's, and with every other rank's (all-gathered).

Errors are relative: max |a - b| / max |b|, fp32 with TF32 off; the check passes at ``TOL``. Two numbers show the
tolerance means something: the same network as plain BatchNorm on the shard alone (what SyncBN prevents) is far
off, and the fp32 reference itself differs from a float64 one by the arithmetic's own error, far below ``TOL``.

:func:`run_check` starts the ranks with ``torch.multiprocessing`` (spawn) and returns their merged result;
``sync=False`` runs the same harness on plain BatchNorm (the control: it must find the disagreement).
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from torch import nn

TOL = 1e-4  # fp32 BatchNorm statistics over ~10^3-10^4 elements differ by ~1e-6 between reduction orders
ITERS = 3
SHARD, CHANNELS, SIDE, FEATURES = 8, 16, 6, 12  # per rank: (8, 16, 6, 6) images, 12 features into BatchNorm1d


class Net(nn.Module):
    """BatchNorm2d on images and BatchNorm1d on features: the two kinds the recipe's encoder and heads use."""

    def __init__(self) -> None:
        super().__init__()
        self.bn2 = nn.BatchNorm2d(CHANNELS)
        self.fc = nn.Linear(CHANNELS, FEATURES)
        self.bn1 = nn.BatchNorm1d(FEATURES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.bn2(x)  # (b, C, S, S)
        return y, self.bn1(self.fc(torch.relu(y).mean(dim=(2, 3))))  # (b, C, S, S), (b, F)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _global_batch(world: int, it: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iteration ``it``'s global batch (shard r: mean 2r, scale 1 + r) and the loss weights of both outputs."""
    g = torch.Generator().manual_seed(1000 + it)
    x = torch.randn(world, SHARD, CHANNELS, SIDE, SIDE, generator=g)
    x = x * (1 + torch.arange(world).view(-1, 1, 1, 1, 1)) + 2 * torch.arange(world).view(-1, 1, 1, 1, 1)
    wy = torch.randn(world * SHARD, CHANNELS, SIDE, SIDE, generator=g)
    wz = torch.randn(world * SHARD, FEATURES, generator=g)
    return x.reshape(world * SHARD, CHANNELS, SIDE, SIDE), wy, wz


def compare(rank: int, world: int, device: torch.device, sync: bool) -> dict:
    """This rank's errors against the single-process reference (runs inside an initialised process group)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = Net()
    ref, local = copy.deepcopy(net).to(device), copy.deepcopy(net).to(device)
    model = (nn.SyncBatchNorm.convert_sync_batchnorm(net) if sync else net).to(device)
    with warnings.catch_warnings():  # torch 2.14 deprecates the argument; the GPU machine's 2.11 has no successor
        warnings.simplefilter("ignore", FutureWarning)
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    rows = slice(rank * SHARD, (rank + 1) * SHARD)
    err: dict[str, float] = {}

    def worst(key: str, value: float) -> None:
        err[key] = max(err.get(key, 0.0), value)

    for it in range(ITERS):
        x, wy, wz = (t.to(device) for t in _global_batch(world, it))
        xf, xr = x.clone().requires_grad_(), x[rows].clone().requires_grad_()
        y_ref, z_ref = ref(xf)
        ((y_ref * wy).sum() + (z_ref * wz).sum()).backward()
        y, z = ddp(xr)
        ((y * wy[rows]).sum() + (z * wz[rows]).sum()).backward()
        worst("output", max(_rel(y, y_ref[rows]), _rel(z, z_ref[rows])))
        worst("input_grad", _rel(xr.grad, xf.grad[rows]))
        for p, q in zip(model.parameters(), ref.parameters()):
            worst("param_grad", _rel(world * p.grad, q.grad))
        if it == 0:
            with torch.no_grad():
                y_loc, z_loc = local(x[rows])  # plain BatchNorm on the shard alone: what SyncBN prevents
                worst("local_bn_output", max(_rel(y_loc, y_ref[rows]), _rel(z_loc, z_ref[rows])))
                y64, z64 = copy.deepcopy(ref).double()(x.double())  # the arithmetic's own error (ref.train(): same stats)
                worst("reference_fp32_vs_fp64", max(_rel(y_ref, y64), _rel(z_ref, z64)))
        ref.zero_grad(set_to_none=True)
        ddp.zero_grad(set_to_none=True)
    stats = {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    ref_stats = {k: v for k, v in ref.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    for k, v in stats.items():
        worst("running_stats", _rel(v, ref_stats[k]))
    mine = torch.cat([v.flatten() for v in stats.values()]).double()
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    err["running_stats_across_ranks"] = max(_rel(o, every[0]) for o in every)
    dist.barrier()  # every rank has what it needs from the others before any exits
    return err


def _worker(rank: int, world: int, init: str, backend: str, device_type: str, sync: bool, out: str) -> None:
    """One rank: set up the device and process group, compare, write ``rank<r>.json`` (errors as text, not raised)."""
    import torch.distributed as dist

    from benchmarks.common import short_error

    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        device = torch.device("cpu")
        if device_type == "cuda":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        result["errors"] = compare(rank, world, device, sync)
    except ValueError as e:  # SyncBatchNorm refusing the device
        result["unsupported" if "SyncBatchNorm" in str(e) else "error"] = short_error(e)
    except Exception as e:  # noqa: BLE001  (reported by the parent as the row's note)
        result["error"] = short_error(e)
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        # no destroy_process_group and no interpreter teardown: gloo's threads, torn down at exit, sometimes abort
        # the process ("terminate called without an active exception", 1 run in 3 here); the result is written
        os._exit(0)


def cpu_support() -> Optional[str]:
    """None if this torch's SyncBatchNorm runs on CPU tensors under a process group, else torch's own reason.

    Probed in this process on a one-rank gloo group (torch checks the device before it looks at the world size).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    with tempfile.TemporaryDirectory(prefix="awenc_syncbn_probe_") as d:
        dist.init_process_group("gloo", init_method=f"file://{d}/store", rank=0, world_size=1)
        try:
            nn.SyncBatchNorm(2).train()(torch.randn(4, 2, 3, 3))
            return None
        except ValueError as e:
            return f"{type(e).__name__}: {e}"
        finally:
            dist.destroy_process_group()


def run_check(world: int, device_type: str, *, sync: bool = True, timeout: float = 240.0) -> dict:
    """Start ``world`` ranks (NCCL on GPUs, gloo on CPU), wait, merge their results.

    Returns ``{"errors": {key: worst over ranks}, "seconds": ...}``, or ``{"unsupported": ...}`` /
    ``{"error": ...}`` with the first rank's reason.
    """
    import torch.multiprocessing as mp

    backend = "nccl" if device_type == "cuda" else "gloo"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="awenc_syncbn_") as d:
        init = f"file://{d}/store"
        procs = mp.start_processes(_worker, args=(world, init, backend, device_type, sync, d), nprocs=world, join=False,
                                   start_method="spawn")
        try:
            while not procs.join(timeout=2):
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"the {world} SyncBN ranks still running after {timeout:.0f} s: killed")
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for r in range(world):
            f = Path(d, f"rank{r}.json")
            results.append(json.loads(f.read_text()) if f.exists() else {"rank": r, "error": "wrote no result"})
    for key in ("unsupported", "error"):
        bad = [r for r in results if key in r]
        if bad:
            return {key: f"rank {bad[0]['rank']}: {bad[0][key]}", "seconds": time.perf_counter() - t0}
    keys = results[0]["errors"].keys()
    merged = {k: max(r["errors"][k] for r in results) for k in keys}
    return {"errors": merged, "seconds": time.perf_counter() - t0, "backend": backend}


CHECKED = ("output", "input_grad", "param_grad", "running_stats", "running_stats_across_ranks")


def verdict(errors: dict[str, float]) -> tuple[bool, str]:
    """Whether the merged errors pass at ``TOL`` (and the control shows the check can tell), and a one-line summary."""
    over = [k for k in CHECKED if not errors[k] <= TOL]
    blind = not errors["local_bn_output"] > 100 * TOL
    text = (", ".join(f"{k} {errors[k]:.1e}" for k in CHECKED) + f" (tolerance {TOL:g}); plain BatchNorm on a shard: "
            f"{errors['local_bn_output']:.2g}; fp32 reference vs float64: {errors['reference_fp32_vs_fp64']:.1e}")
    if blind:
        text += "; the shards' statistics are too close for the check to tell"
    return not over and not blind, text


if __name__ == "__main__":  # pragma: no cover  (by hand: python -m benchmarks.health_syncbn [ranks])
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(run_check(n, "cuda" if torch.cuda.is_available() else "cpu", sync=os.environ.get("SYNC", "1") == "1"))
