"""DeepSpeed ZeRO through Accelerate's plugin, on CPU: the same loop, the same result, exact resume.

Skipped where DeepSpeed is not installed (`pip install -e '.[deepspeed]'`). The first
run JIT-compiles DeepSpeed's CPU shared-memory op (cached under TORCH_EXTENSIONS_DIR).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import extra_or_skip, tiny_overrides, weights
from dist_awenc.config import PretrainConfig, load_config
from dist_awenc.engine.loop import Interrupted

extra_or_skip("deepspeed", "DeepSpeed is not installed (pip install -e '.[deepspeed]')")
extra_or_skip("transformers", "Accelerate's DeepSpeed plugin needs transformers")

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
    _fresh_deepspeed_groups()
    yield
    if tdist.is_initialized():
        tdist.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ.clear()
    os.environ.update(saved)


def _fresh_deepspeed_groups() -> None:
    """DeepSpeed caches its process groups in module globals; an earlier DeepSpeed run (any test, in any order: it
    failed under pytest -n 2, where files run in another order) destroyed the group they name."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    ds_comm.cdb = None
    for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        setattr(groups, name, None)


def _fresh_state() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _cfg(out, name, **kw):
    return load_config(PretrainConfig, None, tiny_overrides(out, name, **{"train.deepspeed": ZERO2, **kw}))


@pytest.mark.numerics
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


def test_lars_under_zero_is_refused_before_the_run_folder_exists(tmp_path):
    """ZeRO hands the optimizer flat partitions across layers: LARS's per-layer trust ratios would be wrong."""
    from dist_awenc.errors import ConfigError
    from dist_awenc.ssl.pretrain import pretrain

    with pytest.raises(ConfigError, match=r"optim.name=lars cannot run under ZeRO stage 2 \(train.deepspeed=.*zero2.json\)"):
        pretrain(_cfg(tmp_path, "lars", **{"optim.name": "lars"}))
    assert not (tmp_path / "lars").exists()


def test_zero_stage_of_a_deepspeed_json(tmp_path):
    from dist_awenc.engine.loop import refuse_lars_under_zero, zero_stage
    from dist_awenc.errors import ConfigError

    assert zero_stage(ZERO2) == 2
    (tmp_path / "none.json").write_text('{"bf16": {"enabled": "auto"}}')
    assert zero_stage(tmp_path / "none.json") == 0
    refuse_lars_under_zero("lars", 0, "no ZeRO")  # plain data parallel: LARS sees whole layers
    refuse_lars_under_zero("sgd", 2, "ZeRO-2")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not a DeepSpeed JSON config"):
        zero_stage(tmp_path / "bad.json")
