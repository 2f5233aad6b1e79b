"""Every ImageNet config runs (issue #31 item 7), dry, on a small image folder the test writes: the four pre-training
recipes, stage 1, stage 2, a calibration on imported encoders and an attacked copy, verification, and the FFCV
.beton recipe, each for a few steps at 32 px on the CPU, with the config's own method, optimiser, schedule and
scaling rules. Overridden only what the CPU and the tiny folder need: the folder, the image size, the splits, the
batch and step count, the loader workers, SyncBN (GPUs only), the plan's n and J, the ViT's width (ViT-Tiny for
ViT-B) and the heads' hidden width. And ``awenc plan-scale`` prints each recipe's lr, warm-up and checkpoint interval
for 8, 32 and 64 GPUs, by its rules."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import extra_or_skip
from dist_awenc.cli import main
from dist_awenc.config import EmbedConfig, PretrainConfig, load_config, to_dict
from dist_awenc.files import sha256_file

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny forwards: a second thread only contends on 2 shared cores
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET_SPLIT = 1_255_544  # the recipes' 98% of ImageNet-1k's 1,281,167 training images
SIZE = 32
SPLITS = "data.splits=[0.5,0.25,0.25]"  # 16 pre-training images, 8 hold-out, 8 for the pirate's task
PRETRAIN = {  # config -> the per-GPU batch plan-scale is checked at (each reaches its paper's batch at one count)
    "imagenet_resnet50_simclr.yaml": 128, "imagenet_resnet50_byol.yaml": 128, "imagenet_resnet50_moco_v2.yaml": 32,
    "imagenet_vit_b16_mocov3.yaml": 64}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """32 JPEGs in 2 classes (reddish, bluish), 48 x 36 px, and one 640 x 480 photo per class (the .beton caps it)."""
    root = tmp_path_factory.mktemp("imagenet_like") / "train"
    rng = np.random.default_rng(0)
    for c, name in enumerate(("n0001", "n0002")):
        (root / name).mkdir(parents=True)
        for i in range(16):
            w, h = (640, 480) if i == 0 else (48, 36)
            x = rng.integers(0, 120, (h, w, 3)).astype(np.uint8)
            x[..., 0 if c == 0 else 2] += 120
            Image.fromarray(x).save(root / name / f"{name}_{i}.JPEG", quality=90)
    return root


def _tiny(folder: Path, out: Path, name: str) -> list[str]:
    return [f"data.root={folder}", f"data.image_size={SIZE}", "data.num_workers=0", SPLITS, f"run.out_dir={out}",
            f"run.name={name}"]


def _run(*argv: str) -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert main(list(argv)) == 0, argv


# ------------------------------------------------------------------------------------------- awenc plan-scale


@pytest.mark.parametrize("name", sorted(PRETRAIN))
def test_plan_scale_prints_each_recipes_lr_warmup_and_checkpoint_for_8_32_64_gpus(name, capsys):
    path = CONFIGS / "pretrain" / name
    cfg = load_config(PretrainConfig, path)
    per_gpu = PRETRAIN[name]
    assert main(["plan-scale", "--config", str(path), "--images", str(IMAGENET_SPLIT), "--per-gpu-batch", str(per_gpu)]) == 0
    out = capsys.readouterr().out
    assert "lr_scaling=linear" in out
    rows = {int(r[0]): r for r in re.findall(r"^\| (\d+) \| (\d+) \| 1 \| (\d+) \| (\d+) \| (\d+) \| ([\d.e-]+) \| (\d+) \| (\d+) \|$",
                                               out, re.M)}
    assert sorted(rows) == [8, 32, 64]
    for gpus, (_, micro, batch, spe, steps, lr, warmup, ckpt) in rows.items():
        batch, spe = int(batch), int(spe)
        assert (int(micro), batch, spe) == (per_gpu, per_gpu * gpus, IMAGENET_SPLIT // batch)
        assert int(steps) == spe * cfg.train.epochs
        assert float(lr) == pytest.approx(cfg.optim.lr * batch / 256, rel=1e-5)  # the linear rule, printed to 6 digits
        assert int(warmup) == round((cfg.optim.warmup_epochs or 0) * spe)  # warm-up epochs, whatever the batch
        assert int(ckpt) == max(1, round(cfg.train.checkpoint_every_epochs * spe))
    paper = {r[2] for r in rows.values()}
    assert str(cfg.train.batch_size) in paper  # the paper's batch is one of the planned counts


def test_plan_scale_of_the_imagenet_embedding(capsys):
    path = CONFIGS / "embed" / "imagenet.yaml"
    cfg = load_config(EmbedConfig, path)
    assert main(["plan-scale", "--stage", "embed", "--config", str(path), "--images", str(IMAGENET_SPLIT)]) == 0
    out = capsys.readouterr().out
    assert "| 8 | 128 | 1 | 1024 | 1226 | 6130 | 0.12 | 613 | 306 |" in out
    assert cfg.train.epochs == 5 and cfg.optim.lr_scaling == "linear"


# ------------------------------------------------------------------------------------------- dry runs


@pytest.fixture(scope="module")
def runs(folder, tmp_path_factory) -> dict[str, Path]:
    """The four pre-training recipes, 2 steps each of 8 images: {config name: encoder.safetensors}."""
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for name in sorted(PRETRAIN):
        extra = ["encoder.arch=timm/vit_tiny_patch16_224"] if "vit" in name else []
        _run("pretrain", "--config", str(CONFIGS / "pretrain" / name), *_tiny(folder, out, Path(name).stem),
             "train.batch_size=8", "train.max_steps=2", "train.progress=false", "train.sync_bn=false",
             "encoder.proj_hidden_dim=64", "ssl.pred_hidden_dim=64", *extra)
        made[name] = out / Path(name).stem / "encoder.safetensors"
    return made


@pytest.mark.slow
def test_every_pretraining_recipe_dry_runs_with_its_own_rules(runs):
    for name, path in runs.items():
        cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / name)
        resolved = json.loads((path.parent / "resolved.json").read_text())
        card = json.loads(path.with_suffix(".json").read_text())
        assert path.exists() and card["method"] == cfg.ssl.method, name
        assert resolved["lr_scaling"] == "linear" and resolved["global_batch"] == 8 and resolved["total_steps"] == 2
        assert resolved["lr"] == pytest.approx(cfg.optim.lr * 8 / 256, rel=1e-12), name
        assert resolved["warmup_steps"] == round((cfg.optim.warmup_epochs or 0) * resolved["steps_per_epoch"])
        written = to_dict(cfg)  # the recipe's own optimiser, schedule, rule and views ran
        assert (card["config"]["optim"], card["config"]["views"]) == (written["optim"], written["views"]), name
    vit = json.loads(runs["imagenet_vit_b16_mocov3.yaml"].with_suffix(".json").read_text())["config"]["encoder"]
    assert (vit["proj_layers"], vit["freeze_patch_embed"]) == (3, True)
    from safetensors import safe_open

    with safe_open(str(runs["imagenet_vit_b16_mocov3.yaml"].parent / "method.safetensors"), framework="pt") as f:
        heads = {k for k in f.keys() if k.startswith("projector.") and k.endswith(".weight")}
    assert {"projector.net.0.weight", "projector.net.3.weight", "projector.net.6.weight"} <= heads  # 3 Linear layers


@pytest.fixture(scope="module")
def secret(runs, folder, tmp_path_factory) -> Path:
    """Stage 1 with configs/watermark/imagenet.yaml on the SimCLR f0: 2 steps, J = 3, n = 4 white-box images and 6 queries a black-box mode."""
    out = tmp_path_factory.mktemp("wm")
    _run("watermark", "--config", str(CONFIGS / "watermark" / "imagenet.yaml"), *_tiny(folder, out, "wm"),
         f"encoder={runs['imagenet_resnet50_simclr.yaml']}", "generation.steps=2", "generation.batch_size=4",
         "plan.alternatives=3", "plan.n_whitebox=4", "plan.n_score=6", "plan.n_label=6", "plan.n_collapse=6")
    return out / "wm" / "secret.safetensors"


@pytest.mark.slow
def test_stage_1_calibration_stage_2_and_verification_dry_run(runs, secret, folder, tmp_path):
    """In the owner's order: the secret, its calibration (sealed into the plan before release), the embedding, and a
    verification of the released encoder."""
    import torchvision
    from safetensors.torch import save_file

    f0 = runs["imagenet_resnet50_simclr.yaml"]
    header = json.loads(secret.with_suffix(".json").read_text())
    assert header["plan"]["alternatives"] == 3 and header["eps"] == pytest.approx(16 / 255, abs=1e-6)
    # the null population as the calibration config says to make it: `awenc import` of public ResNet-50 checkpoints
    # (random weights here) and `awenc attack` of one of them, listed as extra encoders
    extras = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        weights = tmp_path / f"public{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in torchvision.models.resnet50().state_dict().items()}, str(weights))
        assert main(["import", str(weights), "--arch", "resnet50", "--stem", "imagenet", "--input-size", str(SIZE),
                     "--out", str(tmp_path / "imports" / f"public{seed}")]) == 0
        extras.append(str(tmp_path / "imports" / f"public{seed}"))
    _run("attack", f"encoder={extras[0]}", "attack.name=prune_global", "attack.strength=0.5", "probe.epochs=2",
         *_tiny(folder, tmp_path / "attacks", "public0_prune50"))
    extras.append(str(tmp_path / "attacks" / "public0_prune50"))
    _run("calibrate", "--config", str(CONFIGS / "sweep" / "null" / "imagenet.yaml"), *_tiny(folder, tmp_path, "cal"),
         f"owner_encoder={f0}", f"secret={secret}", f"population.extra_encoders=[{','.join(extras)}]",
         "population.label_classes=[2]", "probe.epochs=2")
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert report["population"]["families"] == 2  # the attacked copy is its parent's family
    # stage 2, with its own optimiser, rule and budget, 2 steps
    _run("embed", "--config", str(CONFIGS / "embed" / "imagenet.yaml"), *_tiny(folder, tmp_path, "embed"),
         f"encoder={f0}", f"secret={secret}", "train.batch_size=8", "train.max_steps=2", "train.progress=false")
    resolved = json.loads((tmp_path / "embed" / "resolved.json").read_text())
    assert resolved["lr"] == pytest.approx(0.03 * 8 / 256) and resolved["lr_scaling"] == "linear"
    # verification of the released encoder, with the calibration the plan carries
    _run("verify", "--config", str(CONFIGS / "verify" / "imagenet.yaml"), *_tiny(folder, tmp_path, "verify"),
         f"suspect={tmp_path / 'embed' / 'encoder.safetensors'}", f"secret={secret}")
    verdict = json.loads((tmp_path / "verify" / "verdict.json").read_text())
    assert [t["mode"] for t in verdict["tests"]] == ["whitebox", "whitebox_permutation"]
    assert verdict["calibration_sha256"] == sha256_file(tmp_path / "cal" / "calibration.json")
    assert "after release" not in json.dumps(verdict["details"])


@pytest.mark.slow
def test_the_beton_recipe_writes_the_pretraining_split_at_its_own_resolution(folder, tmp_path):
    extra_or_skip("ffcv", "the .beton recipe needs FFCV (scripts/install_ffcv.sh)")
    cfg_path = CONFIGS / "data" / "imagenet_beton.yaml"
    out = tmp_path / "pre.beton"
    assert main(["data", "write-beton", "--config", str(cfg_path), f"data.root={folder}", f"data.image_size={SIZE}",
                 SPLITS, f"beton.out={out}", "beton.num_workers=1", "beton.progress=false"]) == 0
    from dist_awenc.data.ffcv import BetonConfig

    beton = load_config(BetonConfig, cfg_path).beton
    assert out.exists() and (beton.max_resolution, beton.original, beton.mode) == (512, True, "jpg")
