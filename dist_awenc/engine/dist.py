"""Every torch.distributed call of the project lives here.

Each helper has a single-process default (rank 0, world size 1, identity
gather), so losses and training code run unchanged on one CPU process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from dist_awenc import log


def is_dist() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


log.set_main_process(is_main)  # the floor's printing asks this module which process is the main one


class _Gather(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient and keeps the local slice.

    Written here rather than taken from ``torch.distributed.nn``: on gloo that
    one's backward permutes a non-contiguous incoming gradient (such as the
    gradient of ``a @ gathered.T`` in a contrastive loss) without an error.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.b = x.shape[0]
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        g = grad.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[rank() * ctx.b : (rank() + 1) * ctx.b]


def gather(x: torch.Tensor) -> torch.Tensor:
    """Differentiable all-gather along dim 0.

    Shape: (b, ...) on each rank -> (world_size * b, ...), rank-major. The
    backward pass sums the gradients of every rank's loss for the local slice,
    so with DDP's gradient averaging the result equals one process on the
    concatenated batch.
    """
    if not is_dist():
        return x
    return _Gather.apply(x)


@torch.no_grad()
def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 without gradient (MoCo keys, metrics)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (no gradient); identity on one process."""
    if not is_dist():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / world_size()


def sum_scalar(x: float) -> float:
    """A number summed over ranks (one small collective); ``x`` on one process."""
    if not is_dist():
        return float(x)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    y = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return float(y.item())


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` on one process)."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()


class AnyRank:
    """Whether any rank raised a flag, agreed by every rank at the same call, one call late.

    ``poll(flag)`` returns the OR over ranks of the flags given to the previous ``poll``: an all-reduce on a gloo
    group of its own runs asynchronously in between, so a GPU step never waits on it and no NCCL stream is touched.
    One process: ``flag`` itself, at once. Every rank must call ``poll`` equally often (once per optimiser step),
    and ``close`` at the end.
    """

    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo") if is_dist() else None
        self._buf: torch.Tensor | None = None
        self._work = None

    def poll(self, flag: bool) -> bool:
        if self._group is None:
            return flag
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._buf.item():  # every rank saw the same sum: none issues another reduce
                return True
        self._buf = torch.tensor([int(flag)], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return False

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
