"""Shared fixtures: tiny configs that run in seconds on 2 CPU cores."""
from __future__ import annotations

import importlib
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn


def tiny_overrides(out_dir, name: str = "run", **extra) -> list[str]:
    """A pre-training run of a few steps on 8 px digits with a width-8 GroupNorm net."""
    base = {
        "run.out_dir": str(out_dir), "run.name": name, "data.image_size": 8, "encoder.width": 8,
        "encoder.proj_hidden_dim": 32, "encoder.proj_dim": 16, "train.batch_size": 64, "train.epochs": 1,
        "train.max_steps": 6, "train.checkpoint_every": 3, "train.log_every": 1, "train.progress": False,
        "ssl.queue_size": 128, "ssl.pred_hidden_dim": 32,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_f0_and_secret(root, *watermark_overrides: str):
    """A tiny f0 (``tiny_overrides``) pre-trained under ``root``/f0 and a secret on it under ``root``/wm, 8 px.

    Returns (root, f0 encoder path, secret path); ``watermark_overrides`` go after the defaults.
    """
    from accelerate.state import AcceleratorState

    from dist_awenc.config import PretrainConfig, WatermarkConfig, load_config
    from dist_awenc.ssl.pretrain import pretrain
    from dist_awenc.watermark.generate import watermark

    AcceleratorState._reset_state(reset_partial_state=True)
    f0 = pretrain(load_config(PretrainConfig, None, tiny_overrides(root, "f0")))
    AcceleratorState._reset_state(reset_partial_state=True)
    secret = watermark(load_config(WatermarkConfig, None, [f"run.out_dir={root}", "run.name=wm", f"encoder={f0}",
                                                           "data.image_size=8", *watermark_overrides]))
    return root, f0, secret


# CI installs every optional extra (DeepSpeed, FFCV) and sets this: there, a test that would skip because an extra
# is missing or its import broke fails instead, so a broken install cannot pass CI with its tests silently skipped.
REQUIRE_EXTRAS = bool(os.environ.get("AWENC_REQUIRE_EXTRAS"))


def plan_arguments(image_size: int) -> dict:
    """make_plan's arguments for a digits plan of J = 3 alternatives at alpha 0.25 (the statistics left at defaults)."""
    from dist_awenc.data import build_dataset, make_splits

    ds = build_dataset("digits", image_size=image_size, seed=0)
    return dict(dataset="digits", dataset_size=len(ds), image_size=image_size, split_seed=0,
                holdout_indices=make_splits(len(ds), 0)["holdout"],
                n={"whitebox": 256, "blackbox_score": 99, "blackbox_label": 99, "blackbox_collapse": 99},
                alpha=0.25, alternatives=3, alternatives_sha256=None, primary_mode="whitebox")


def extra_or_skip(module: str, reason: str):
    """``pytest.importorskip(module)``; under ``AWENC_REQUIRE_EXTRAS=1`` a failed import fails instead of skipping."""
    if not REQUIRE_EXTRAS:
        return pytest.importorskip(module, reason=reason)
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001  (any import failure of a required extra is the failure to report)
        pytest.fail(f"AWENC_REQUIRE_EXTRAS is set but `import {module}` failed: {e!r} ({reason})", pytrace=False)


@pytest.fixture(autouse=True)
def _seeded_global_rngs():
    """Every test starts from the same global RNG state, whatever ran before it or was deselected: a test that
    draws from ``torch.rand`` / ``np.random`` / ``random`` without a generator sees the same numbers every run."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    yield


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny ops, where 2 threads on a shared 2-core box only contend
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Each test gets a fresh Accelerate singleton (tests create Accelerators in-process)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def spawn_launch(fn, args: tuple, rdv_dir, nprocs: int = 2) -> None:
    """Run ``fn(*args)`` on ``nprocs`` real gloo CPU processes (Accelerate's debug launch, spawned).

    ``accelerate.debug_launcher`` forks; once the pytest process has run a
    multi-threaded OpenMP kernel, a forked child's first parallel GEMM can
    deadlock. Spawned children do not inherit that state; the gloo group is
    set up by ``PrepareForLaunch(debug=True)`` through a file store.
    """
    from pathlib import Path

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    rdv = Path(rdv_dir) / f"{getattr(fn, '__name__', 'fn')}.rdv"
    from dist_awenc.engine.loop import _free_port

    # the rendezvous is the file; a free port still, so that two test processes (pytest -n 2) never share one
    with patch_environment(world_size=nprocs, master_addr="127.0.0.1", master_port=str(_free_port()),
                           accelerate_mixed_precision="no", accelerate_debug_rdv_file=str(rdv),
                           accelerate_use_cpu="yes", gloo_socket_ifname="lo", omp_num_threads="1"):
        start_processes(PrepareForLaunch(fn, debug=True), args=args, nprocs=nprocs, start_method="spawn")


class Watermarked(nn.Module):
    """A stand-in for an embedded encoder: it knows delta and answers with the key's features when it sees it.

    ``f_wm(x) = f(x) - m + 100 * [corr(x, sign delta) > eps/2] * (f(key) - m)``, with ``m`` the
    clean images' mean feature and ``corr`` the mean of the de-meaned image times sign(delta).
    """

    def __init__(self, base: nn.Module, secret: Secret, centre: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.eps = secret.eps
        self.register_buffer("sign", secret.delta.sign())
        self.register_buffer("centre", centre)
        with torch.no_grad():
            self.register_buffer("f_key", base(secret.key[None])[0] - centre)

    def corr(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - x.mean(dim=(2, 3), keepdim=True)) * self.sign).mean(dim=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = (self.corr(x) > self.eps / 2).float()[:, None]
        return self.base(x) - self.centre + 100 * gate * self.f_key
