"""DeepSpeed ZeRO-2 with bf16 on CPU processes: every method and embedding run, frozen parts stay fp32, 2 processes
equal 1 (fp32: tightly; bf16: within bf16's own rounding), and ``loss.lambda_cl=0`` embeds on 2 DDP processes.

What is checked against what (engine/precision.py says how it works):

* the DeepSpeed checkpoint holds the online network in bf16 (the engine's cast) and the momentum encoders, MoCo's
  queue and f0 in fp32; f0 is bit-for-bit the file it was loaded from;
* the EMA changes (nearly) every momentum weight from one checkpoint to the next (a bf16 EMA with m = 0.99 would
  round most updates away);
* the released encoder is fp32 (DeepSpeed's fp32 master weights).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import extra_or_skip, spawn_launch, tiny_f0_and_secret, tiny_overrides, weights
from dist_awenc.config import EmbedConfig, PretrainConfig, load_config
from dist_awenc.engine.loop import Interrupted

extra_or_skip("deepspeed", "DeepSpeed is not installed (pip install -e '.[deepspeed]')")
extra_or_skip("transformers", "Accelerate's DeepSpeed plugin needs transformers")

from test_deepspeed import ZERO2, _fresh_deepspeed_groups, _fresh_state, _isolated_environment  # noqa: E402,F401  (the fixture is autouse)

METHODS = ["simclr", "moco_v2", "byol", "moco_v3"]

pytestmark = pytest.mark.numerics  # CI runs the whole module again on the AVX2 path (#30)


def _precision(mp: str) -> dict:
    return {} if mp == "fp32" else {"train.mixed_precision": mp}


def _pre_cfg(out, name, mp="bf16", **kw) -> PretrainConfig:
    return load_config(PretrainConfig, None, tiny_overrides(out, name, **{"train.deepspeed": ZERO2, **_precision(mp), **kw}))


def _module_state(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The module's state_dict as DeepSpeed saved it at ``step`` (the dtypes the engine trained with)."""
    path = run_dir / "checkpoints" / f"step_{step:08d}" / "pytorch_model" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rel(a: dict, b: dict) -> float:
    """Relative L2 distance over all floating tensors together."""
    keys = [k for k in a if a[k].is_floating_point()]
    num = math.sqrt(sum(float((a[k].double() - b[k].double()).norm()) ** 2 for k in keys))
    return num / math.sqrt(sum(float(a[k].double().norm()) ** 2 for k in keys))


def _as_launched_rank() -> None:
    """The debug launch sets no RANK; a launcher (torchrun, accelerate launch) would, and DeepSpeed reads it."""
    import torch.distributed as tdist

    r = tdist.get_rank()
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(tdist.get_world_size()))


def _assert_fp32_encoder(path: Path) -> None:
    w = weights(path)
    floats = [t for t in w.values() if t.is_floating_point()]  # BatchNorm's num_batches_tracked is an int
    assert floats and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in floats)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``one_process(method, mp)``: the run folder of a 1-process ZeRO-2 pre-training, made on first use and shared
    by the tests below (the same run is what every-method, resume and 2-vs-1 each compare against)."""
    from dist_awenc.ssl.pretrain import pretrain

    made: dict[tuple[str, str], Path] = {}

    def get(method: str, mp: str) -> Path:
        if (method, mp) not in made:
            root = tmp_path_factory.mktemp(f"one_{method}_{mp}")
            _fresh_state()
            _fresh_deepspeed_groups()
            pretrain(_pre_cfg(root, "run", mp, **{"ssl.method": method}))
            _fresh_state()
            made[method, mp] = root / "run"
        return made[method, mp]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_bf16_zero2_trains_every_method_with_fp32_momentum_encoders(one_process, method):
    run = one_process(method, "bf16")
    out = run / "encoder.safetensors"
    assert all(math.isfinite(x) for x in _losses(run))
    _assert_fp32_encoder(out)
    s3, s6 = _module_state(run, 3), _module_state(run, 6)
    online = [k for k in s6 if not k.startswith("momentum_") and s6[k].is_floating_point() and k != "queue"]
    frozen = [k for k in s6 if k.startswith("momentum_")] + (["queue"] if "queue" in s6 else [])
    assert online and all(s6[k].dtype == torch.bfloat16 for k in online)  # the engine trains in bf16
    assert all(s6[k].dtype == torch.float32 for k in frozen)
    if method == "simclr":
        assert not frozen
        return
    # steps 4-6 moved the online weights; the fp32 EMA carries (nearly) every one of those moves
    changed = sum(int((s3[k] != s6[k]).sum()) for k in frozen if k != "queue")
    total = sum(s6[k].numel() for k in frozen if k != "queue")
    assert changed / total > 0.9, f"EMA changed only {changed}/{total} momentum weights"


def test_bf16_zero2_resumes_exactly(one_process, tmp_path):
    """MoCo v2 (momentum encoder, queue): bf16 weights, fp32 master weights and the fp32 frozen parts resume bit for bit."""
    from dist_awenc.ssl.pretrain import pretrain

    full = one_process("moco_v2", "bf16") / "encoder.safetensors"
    with pytest.raises(Interrupted):
        pretrain(_pre_cfg(tmp_path, "cut", **{"ssl.method": "moco_v2"}), interrupt_at=3)
    _fresh_state()
    resumed = pretrain(_pre_cfg(tmp_path, "cut", **{"ssl.method": "moco_v2"}))
    for a, b in ((full, resumed), (full.with_name("method.safetensors"), resumed.with_name("method.safetensors"))):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _two_process_pretrain(out: str, method: str) -> None:
    """fp32 then bf16 (``two_fp32``, ``two_bf16``) in one launch: the ranks and their process group serve both."""
    from dist_awenc.ssl.pretrain import pretrain

    _as_launched_rank()
    for mp in ("fp32", "bf16"):
        _fresh_state()
        pretrain(_pre_cfg(Path(out), f"two_{mp}", mp, **{"ssl.method": method}))


# bf16's tolerance is what bf16 itself moves, measured in the same test on the same machine, never a constant read
# off one CPU (a fixed 1e-3 on the losses passed with AVX-512 and failed on an AVX2-only AMD EPYC: 1.6e-3, #30).
# The 2 bf16 processes compute what the 1 bf16 process computes, with the batch's reductions split in two: the
# rounding differs only where the split changes it, so the two runs stay within ONE bf16 rounding of each other,
# i.e. no further apart than bf16 is from fp32 on one process (weights: relative L2; losses: the largest per-step
# gap). Measured (2-vs-1 over bf16-vs-fp32, the 4 methods and embedding): weights 0.07-0.37 and losses 0.02-0.21 on
# an Intel Xeon with AVX-512; weights 0.19-0.43 and losses 0.04-0.47 on its emulated AVX2 path (ATEN_CPU_CAPABILITY=
# avx2 ONEDNN_MAX_CPU_ISA=AVX2, where SimCLR's losses differ by 1.65e-3 against 4.9e-3: the old fixed 1e-3 fails
# there as it did on the AMD machine). Two roundings drawn independently would sit about
# sqrt(2) times that distance apart; a bf16 defect on the 2-process path (no fp32 master weights, bf16 gradient
# reduction, an unsynchronised rank) moves it further.

@pytest.mark.parametrize("method", ["simclr", "moco_v2", "moco_v3", "byol"])
def test_two_processes_equal_one_under_zero2_fp32_and_bf16(one_process, tmp_path, method):
    runs = {f"one_{mp}": one_process(method, mp) for mp in ("fp32", "bf16")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    spawn_launch(_two_process_pretrain, (str(tmp_path), method), tmp_path)
    _compare({**runs, **{f"two_{mp}": tmp_path / f"two_{mp}" for mp in ("fp32", "bf16")}})


def _max_gap(a: list[float], b: list[float]) -> float:
    """The largest per-step relative difference of two loss curves of the same length."""
    assert len(a) == len(b) and a, (len(a), len(b))
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def _compare(runs: dict[str, Path]) -> None:
    """``runs``: the run folders one_fp32, two_fp32, one_bf16, two_bf16."""
    w = {n: weights(runs[n] / "encoder.safetensors") for n in ("one_fp32", "two_fp32", "one_bf16", "two_bf16")}
    for k in w["one_fp32"]:
        torch.testing.assert_close(w["one_fp32"][k], w["two_fp32"][k], rtol=1e-4, atol=1e-5, msg=k)
    between, own = _rel(w["one_bf16"], w["two_bf16"]), _rel(w["one_fp32"], w["one_bf16"])
    loss = {n: _losses(runs[n]) for n in w}
    loss_between, loss_own = _max_gap(loss["two_bf16"], loss["one_bf16"]), _max_gap(loss["one_bf16"], loss["one_fp32"])
    print(f"bf16 weights: 2 vs 1 processes {between:.2e}, bf16 vs fp32 on one {own:.2e} (ratio {between / own:.2f}); "
          f"losses: {loss_between:.2e} vs {loss_own:.2e} (ratio {loss_between / loss_own:.2f})")
    assert 0 < own and between <= own, ("weights", between, own)
    assert 0 < loss_own and loss_between <= loss_own, ("losses", loss_between, loss_own)


# ------------------------------------------------------------------ embedding


@pytest.fixture(scope="module")
def f0_and_secret(tmp_path_factory):
    return tiny_f0_and_secret(tmp_path_factory.mktemp("wm"), "generation.steps=4", "generation.batch_size=16")


def _embed_cfg(f0, secret, out, name, mp="bf16", deepspeed=True, **extra) -> EmbedConfig:
    over = {"run.out_dir": out, "run.name": name, "encoder": f0, "secret": secret, "data.image_size": 8,
            "train.batch_size": 32, "train.epochs": 1, "train.max_steps": 4, "train.checkpoint_every": 2,
            "train.log_every": 1, "train.progress": False, **({"train.deepspeed": ZERO2} if deepspeed else {}),
            **_precision(mp), **extra}
    return load_config(EmbedConfig, None, [f"{k}={v}" for k, v in over.items()])


def test_bf16_zero2_embedding_keeps_f0_and_the_secret_exact(f0_and_secret, tmp_path):
    """MoCo v2 as L_CL: f0, the momentum encoder, the queue, delta and the key image stay fp32; f0 is untouched."""
    from dist_awenc.watermark.embed import embed
    from dist_awenc.watermark.secret import load_secret

    _, f0, secret = f0_and_secret
    out = embed(_embed_cfg(f0, secret, tmp_path, "bf16", **{"ssl.method": "moco_v2"}))
    run = tmp_path / "bf16"
    assert all(math.isfinite(x) for x in _losses(run))
    _assert_fp32_encoder(out)
    state, f0_file, s = _module_state(run, 4), weights(f0), load_secret(secret)
    assert state["method.backbone.backbone.features.0.weight"].dtype == torch.bfloat16  # the engine's cast
    for k, v in f0_file.items():
        assert state[f"f0.{k}"].dtype == torch.float32 and torch.equal(state[f"f0.{k}"], v), k
    assert torch.equal(state["delta"], s.delta) and torch.equal(state["key"], s.key)
    assert all(state[k].dtype == torch.float32 for k in state if k.startswith("method.momentum_") or k == "method.queue")


def _two_process_embed(f0: str, secret: str, out: str, runs: list, deepspeed: bool, extra: dict) -> None:
    """Each (name, precision) of ``runs`` in turn, in one launch: the ranks and their process group serve all."""
    from dist_awenc.watermark.embed import embed

    _as_launched_rank()
    for name, mp in runs:
        _fresh_state()
        embed(_embed_cfg(f0, secret, out, name, mp, deepspeed, **extra))


def test_embedding_two_processes_equal_one_under_zero2_fp32_and_bf16(f0_and_secret, tmp_path):
    from dist_awenc.watermark.embed import embed

    _, f0, secret = f0_and_secret
    for mp in ("fp32", "bf16"):
        _fresh_state()
        _fresh_deepspeed_groups()
        embed(_embed_cfg(f0, secret, tmp_path, f"one_{mp}", mp))
    _fresh_state()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    runs = [("two_fp32", "fp32"), ("two_bf16", "bf16")]
    spawn_launch(_two_process_embed, (str(f0), str(secret), str(tmp_path), runs, True, {}), tmp_path)
    _compare({n: tmp_path / n for n in ("one_fp32", "two_fp32", "one_bf16", "two_bf16")})


def test_embedding_without_the_contrastive_term_on_two_ddp_processes(f0_and_secret, tmp_path):
    """loss.lambda_cl=0: the heads get no gradient; they are frozen, so DDP waits for none (no DeepSpeed here)."""
    from dist_awenc.watermark.embed import embed

    _, f0, secret = f0_and_secret
    extra = {"loss.lambda_cl": 0}
    one = embed(_embed_cfg(f0, secret, tmp_path, "one", "fp32", False, **extra))
    spawn_launch(_two_process_embed, (str(f0), str(secret), str(tmp_path), [("two", "fp32")], False, extra), tmp_path)
    a, b = weights(one), weights(tmp_path / "two" / "encoder.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(not torch.equal(a[k], v) for k, v in weights(f0).items())  # it trained
    for x, y in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        assert x == pytest.approx(y, rel=1e-4)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_bf16_zero2_trains_a_batchnorm_net_in_channels_last(tmp_path, method):
    """The ImageNet recipes' case: BatchNorm (its running statistics in the dtype of its bf16 weights, as the kernel
    needs; the momentum encoder's in fp32 with its fp32 weights) and channels_last (the inputs only: DeepSpeed views
    every weight as bytes to broadcast it, which a channels_last conv weight refuses)."""
    from dist_awenc.ssl.pretrain import pretrain

    out = pretrain(_pre_cfg(tmp_path, "bn", **{"ssl.method": method, "encoder.arch": "tiny_resnet",
                                               "encoder.norm": "batch", "train.channels_last": "true"}))
    assert all(math.isfinite(x) for x in _losses(tmp_path / "bn"))
    _assert_fp32_encoder(out)
    state = _module_state(tmp_path / "bn", 6)
    stats = [k for k in state if k.endswith("running_mean")]
    assert stats and all(state[k].dtype == (torch.float32 if k.startswith("momentum_") else torch.bfloat16)
                         for k in stats)
