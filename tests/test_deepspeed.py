"""DeepSpeed ZeRO through Accelerate's plugin, on CPU: the same loop, the same result, exact resume.

Skipped where DeepSpeed is not installed (`pip install -e '.[deepspeed]'`). The first
run JIT-compiles DeepSpeed's CPU shared-memory op (cached under TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, weights
from dist_awenc.config import PretrainConfig, load_config
from dist_awenc.engine.loop import Interrupted

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')")
pytest.importorskip("transformers", reason="Accelerate's DeepSpeed plugin needs transformers")

ZERO2 = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json")


@pytest.fixture(autouse=True)
def _isolated_environment():
    """DeepSpeed runs leave RANK, MASTER_PORT and ACCELERATE_USE_DEEPSPEED in os.environ; later tests
    (and the SLURM jobs they submit, which inherit the environment) must not see them."""
    import os

    import torch.distributed as tdist
    from accelerate.state import AcceleratorState

    saved = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        os.environ.pop(k, None)
    yield
    if tdist.is_initialized():
        tdist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(saved)


def _fresh_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _cfg(out, name, **kw):
    return load_config(PretrainConfig, None, tiny_overrides(out, name, **{"train.deepspeed": ZERO2, **kw}))


def test_zero2_matches_plain_training_and_resumes_exactly(tmp_path):
    from dist_awenc.ssl.pretrain import pretrain

    plain = pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path, "plain")))
    _fresh_state()  # one stage per process in real use: the plain run's Accelerate state must not carry over
    zero = pretrain(_cfg(tmp_path, "zero"))
    assert (tmp_path / "zero" / "checkpoints" / "step_00000006" / "pytorch_model").is_dir()  # a DeepSpeed engine ran
    a, b = weights(plain), weights(zero)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    _fresh_state()
    with pytest.raises(Interrupted):
        pretrain(_cfg(tmp_path, "cut"), interrupt_at=3)
    _fresh_state()
    resumed = pretrain(_cfg(tmp_path, "cut"))
    c = weights(resumed)
    assert all(torch.equal(b[k], c[k]) for k in b)
