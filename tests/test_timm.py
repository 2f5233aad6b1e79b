"""timm as a backbone source (#13): `timm/<model name>` in the encoder registry, a pirate's timm ViT imported and
verified white-box like the project's own file, and a ViT-Tiny pre-trained with MoCo v3 on digits."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm  # a hard dependency (pyproject.toml): its absence is a failure, not a skip
import torch
from safetensors.torch import save_file
from torch import nn

from dist_awenc.cli import main
from dist_awenc.encoders.io import build_encoder, card_for, load_encoder, save_encoder, sha256_file
from dist_awenc.encoders.registry import ENCODERS, build_backbone, resolve_arch_kwargs
from dist_awenc.encoders.thirdparty import import_weights, load_suspect
from dist_awenc.errors import ConfigError
from dist_awenc.verify.core import verify_whitebox
from dist_awenc.watermark.secret import Secret, load_secret, save_secret

SIZE = 16
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.247, 0.243, 0.261]
VIT = "timm/vit_tiny_patch16_224"
VIT_KWARGS = {"stem": "patch4", "img_size": SIZE}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network (a socket connection, a name lookup, the Hugging Face hub) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import huggingface_hub

    for name in ("hf_hub_download", "snapshot_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", refuse, raising=False)


def _images(n: int = 4, seed: int = 3, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _normalised(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- the registry


def test_timm_names_resolve_without_being_listed(no_network):
    assert not any(name.startswith("timm/") for name in ENCODERS)
    assert resolve_arch_kwargs(VIT) == {"stem": "imagenet", "img_size": None}
    assert resolve_arch_kwargs(VIT, **VIT_KWARGS) == VIT_KWARGS
    assert resolve_arch_kwargs("timm/deit_tiny_patch16_224", img_size=32) == {"stem": "imagenet", "img_size": 32}
    assert resolve_arch_kwargs("timm/resnet18") == {"stem": "imagenet"}
    assert resolve_arch_kwargs("timm/convnext_atto", stem="cifar") == {"stem": "cifar"}
    assert resolve_arch_kwargs("timm/efficientnet_b0") == {}  # any other timm model: timm's, as it is


@pytest.mark.parametrize("arch,kwargs,size,feature_dim", [
    (VIT, VIT_KWARGS, SIZE, 192),
    ("timm/resnet18", {"stem": "cifar"}, SIZE, 512),
    ("timm/convnext_atto", {"stem": "cifar"}, SIZE, 320),
    ("timm/resnet18", {"stem": "imagenet"}, 32, 512),
    ("timm/mobilenetv3_small_050", {}, 32, 1024),  # its pooled features are its head's hidden layer, not num_features
], ids=["vit-patch4", "resnet18-cifar", "convnext-cifar", "resnet18-imagenet", "mobilenetv3"])
def test_timm_backbone_gives_pooled_features_and_trains(no_network, arch, kwargs, size, feature_dim):
    torch.manual_seed(0)
    enc = build_encoder(arch, kwargs, MEAN, STD, size)
    x = _images(2, size=size)
    out = enc(x)
    assert enc.feature_dim == feature_dim and out.shape == (2, feature_dim) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)
    assert not any(k.startswith(("head.fc.", "fc.", "classifier.")) for k in enc.backbone.state_dict())


def test_timm_features_are_timms_own_model_without_its_classifier(no_network):
    """The backbone is timm's model: loaded with the same weights, a 10-class timm model's pre-logits are ours."""
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, num_classes=10).eval()
    ours = build_backbone(VIT, **VIT_KWARGS).eval()
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.startswith("head.")})
    x = _normalised(_images())
    with torch.no_grad():
        assert torch.equal(ours(x), theirs.forward_head(theirs.forward_features(x), pre_logits=True))


def test_cifar_stem_is_a_3x3_stride_1_adapter():
    resnet = build_backbone("timm/resnet18", stem="cifar")
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1) and isinstance(resnet.maxpool, nn.Identity)
    assert build_backbone("timm/resnet18").conv1.kernel_size == (7, 7)
    convnext = build_backbone("timm/convnext_atto", stem="cifar")
    assert convnext.stem[0].kernel_size == (3, 3) and convnext.stem[0].stride == (1, 1)
    assert build_backbone("timm/convnext_atto").stem[0].kernel_size == (4, 4)
    assert build_backbone(VIT, **VIT_KWARGS).patch_embed.proj.kernel_size == (4, 4)


def test_bad_timm_names_and_arguments_are_one_line_config_errors():
    cases = [
        (("timm/vit_tiny_patch16_22", {}), "unknown timm model 'vit_tiny_patch16_22'; close: timm/vit_tiny_patch16_224"),
        (("timm/vit_tiny_patch16_224.augreg_in21k", {}), "without its pretrained tag"),
        (("timm/resnet18", {"img_size": 16}), "'timm/resnet18' takes no argument 'img_size' .it takes: stem."),
        ((VIT, {"norm": "batch"}), "takes no argument 'norm' .it takes: stem, img_size."),
        ((VIT, {"stem": "cifar"}), "unknown stem 'cifar' for timm/vit_tiny_patch16_224; valid: imagenet .*patch<N>"),
        ((VIT, {"stem": "patch5", "img_size": 16}), "img_size 16 is not a multiple of the patch size 5"),
        ((VIT, {"img_size": 0}), "img_size must be a positive number"),
        (("timm/resnet18", {"stem": "vit"}), "unknown stem 'vit' for timm/resnet18; valid: cifar, imagenet"),
        (("timm/resnet18d", {"stem": "cifar"}), "single-convolution stem"),
        (("timm/", {}), "unknown encoder 'timm/'; valid: .*tiny.*timm/<model name>"),
    ]
    for (arch, kwargs), match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            build_backbone(arch, **kwargs)
        assert "\n" not in str(e.value)


def test_pretrain_encoder_section_builds_a_timm_vit_for_the_image_size():
    """`encoder.norm` left at its default is not passed to a timm model (set, it is an error naming what it takes);
    a ViT's img_size is the data's image size, recorded with every other argument."""
    from dist_awenc.config import EncoderSection
    from dist_awenc.ssl.pretrain import encoder_from_config

    enc, arch, kwargs = encoder_from_config(EncoderSection(arch=VIT, stem="patch4"), SIZE)
    assert (arch, kwargs, enc.feature_dim, enc.input_size) == (VIT, VIT_KWARGS, 192, SIZE)
    assert encoder_from_config(EncoderSection(arch="timm/resnet18", stem="cifar"), SIZE)[2] == {"stem": "cifar"}
    with pytest.raises(ConfigError, match="takes no argument 'norm'"):
        encoder_from_config(EncoderSection(arch=VIT, stem="patch4", norm="batch"), SIZE)
    with pytest.raises(ConfigError, match="takes no argument 'width'"):
        encoder_from_config(EncoderSection(arch=VIT, width=8), SIZE)


def test_importing_dist_awenc_does_not_import_timm():
    code = ("import sys, dist_awenc.cli, dist_awenc.encoders.io, dist_awenc.encoders.thirdparty, dist_awenc.ssl; "
            "assert 'timm' not in sys.modules, 'timm imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_card_rebuilds_the_same_timm_module(tmp_path, no_network):
    torch.manual_seed(1)
    enc = build_encoder(VIT, VIT_KWARGS, MEAN, STD, SIZE)
    card = card_for(enc, arch=VIT, arch_kwargs=VIT_KWARGS, method="moco_v3", stage="pretrain", parent=None)
    save_encoder(enc, tmp_path / "encoder", card)
    loaded, lcard = load_encoder(tmp_path)
    assert (lcard["arch"], lcard["arch_kwargs"], lcard["feature_dim"]) == (VIT, VIT_KWARGS, 192)
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), enc.eval()(x))


# ----------------------------------------------------------------------------- a pirate's timm weights


@pytest.fixture(scope="module")
def pirate(tmp_path_factory):
    """A ViT-Tiny written by plain timm code (4x4 patches, 16 px, a 10-class head): fp16 .pt and fp32 safetensors."""
    root = tmp_path_factory.mktemp("pirate_vit")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, num_classes=10).eval()
    torch.save(model.half().state_dict(), root / "vit_fp16.pt")
    model.float()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "vit.safetensors"))
    rounded = timm.create_model("vit_tiny_patch16_224", img_size=SIZE, patch_size=4, num_classes=10).eval()
    rounded.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return {"model": model, "rounded": rounded, "root": root}


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(_normalised(x)), pre_logits=True)


def _import_vit(path: Path, out: Path) -> dict:
    return import_weights(path, arch=VIT, input_size=SIZE, mean=MEAN, std=STD, out=out)


@pytest.mark.parametrize("name", ["vit_fp16.pt", "vit.safetensors"])
def test_imported_timm_vit_features_equal_timms_pre_logits(pirate, tmp_path, name, capsys, no_network):
    card = _import_vit(pirate["root"] / name, tmp_path / "imp")
    said = capsys.readouterr().out
    assert "dropped the classifier head (head.bias (10,), head.weight (10, 192))" in said
    assert "stem patch4: patch_embed is 4x4" in said
    assert ("float16 tensors to float32" in said) == ("fp16" in name)
    encoder, loaded = load_encoder(tmp_path / "imp")
    assert loaded["sha256"] == card["sha256"] and loaded["imported"] is True
    assert (loaded["arch"], loaded["arch_kwargs"], loaded["feature_dim"]) == (VIT, VIT_KWARGS, 192)
    assert loaded["source"]["sha256"] == sha256_file(pirate["root"] / name)
    x = _images()
    with torch.no_grad():
        ours = encoder.eval()(x)
    reference = pirate["rounded"] if "fp16" in name else pirate["model"]
    assert torch.allclose(ours, _pre_logits(reference, x), rtol=1e-4, atol=1e-5)


def test_timm_resnet_and_convnext_weights_map_with_their_stem_read_from_the_weights(tmp_path, capsys, no_network):
    torch.manual_seed(0)
    resnet = timm.create_model("resnet18", num_classes=10)
    resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # a pirate's own CIFAR stem
    resnet.maxpool = nn.Identity()
    convnext = timm.create_model("convnext_atto", num_classes=10)
    for model, arch, stem, size in ((resnet, "timm/resnet18", "cifar", SIZE), (convnext, "timm/convnext_atto", "imagenet", 32)):
        path = tmp_path / f"{arch[5:]}.pt"
        torch.save(model.eval().state_dict(), path)
        card = import_weights(path, arch=arch, input_size=size, mean=MEAN, std=STD, out=tmp_path / arch[5:])
        assert f"stem {stem}:" in capsys.readouterr().out and card["arch_kwargs"] == {"stem": stem}
        x = _images(size=size)
        with torch.no_grad():
            ours = load_encoder(tmp_path / arch[5:])[0].eval()(x)
        assert torch.allclose(ours, _pre_logits(model, x), rtol=1e-4, atol=1e-5)
    # timm's ResNet has torchvision's key names: the project's own resnet18 takes the same file
    same = import_weights(tmp_path / "resnet18.pt", arch="resnet18", input_size=SIZE, mean=MEAN, std=STD,
                          out=tmp_path / "as_torchvision")
    assert same["arch_kwargs"] == {"stem": "cifar", "norm": "batch"}


def _secret(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    eps = 16 / 255
    secret = Secret(key=torch.rand(3, SIZE, SIZE, generator=g),
                    delta=eps * torch.sign(torch.randn(3, SIZE, SIZE, generator=g)), eps=eps, control_seed=2)
    save_secret(secret, tmp_path / "secret")
    return tmp_path / "secret.safetensors"


def _project_copy(pirate, tmp_path: Path) -> Path:
    """The same (fp16-rounded) weights saved through this project's own save_encoder."""
    enc = build_encoder(VIT, VIT_KWARGS, MEAN, STD, SIZE)
    enc.backbone.load_state_dict({k: v for k, v in pirate["rounded"].state_dict().items() if not k.startswith("head.")})
    card = card_for(enc, arch=VIT, arch_kwargs=VIT_KWARGS, method="moco_v3", stage="pretrain", parent=None)
    (tmp_path / "own").mkdir()
    save_encoder(enc, tmp_path / "own" / "encoder", card)
    return tmp_path / "own"


def test_imported_timm_vit_whitebox_verdict_equals_the_projects_own_file(pirate, tmp_path, no_network):
    secret = load_secret(_secret(tmp_path))
    x = _images(12, seed=4)
    own, _ = load_encoder(_project_copy(pirate, tmp_path))
    _import_vit(pirate["root"] / "vit_fp16.pt", tmp_path / "imp")
    imported, _ = load_encoder(tmp_path / "imp")
    fields = type("Fields", (), {"arch": VIT, "input_size": SIZE, "mean": MEAN, "std": STD, "stem": None})()
    direct, _ = load_suspect(pirate["root"] / "vit_fp16.pt", fields)
    verdicts = [verify_whitebox(m, secret, x, tau=0.0) for m in (own, imported, direct)]
    for v in verdicts[1:]:
        assert (v.p_value, v.effect, v.decision, v.n) == (verdicts[0].p_value, verdicts[0].effect, verdicts[0].decision, 12)


def test_cli_import_then_verify_timm_vit_agrees_with_the_projects_own_file(pirate, tmp_path, capsys):
    secret = _secret(tmp_path)
    own = _project_copy(pirate, tmp_path)
    assert main(["import", str(pirate["root"] / "vit_fp16.pt"), "--arch", VIT, "--input-size", str(SIZE),
                 "--mean", *map(str, MEAN), "--std", *map(str, STD), "--out", str(tmp_path / "imp")]) == 0
    common = [f"secret={secret}", f"run.out_dir={tmp_path / 'runs'}", "data.name=fake", "data.size=40",
              f"data.image_size={SIZE}", "verify.n=8", "verify.exploratory=true", "verify.tau_whitebox=0.0"]
    out = {}
    for name, suspect in (("imported", tmp_path / "imp"), ("own", own)):
        assert main(["verify", "--mode", "whitebox", f"run.name={name}", f"suspect={suspect}", *common]) == 0, \
            capsys.readouterr().err
        out[name] = json.loads((tmp_path / "runs" / name / "verdict.json").read_text())
    assert (out["imported"]["p_value"], out["imported"]["effect"]) == (out["own"]["p_value"], out["own"]["effect"])


# ----------------------------------------------------------------------------- pre-training a ViT-Tiny


def test_vit_tiny_pretrains_with_moco_v3_on_digits(tmp_path, no_network):
    """configs/pretrain/digits_vit_mocov3.yaml for 2 steps of 8 images on the CPU: the card records the timm
    architecture and every argument, and the saved encoder is the trained one."""
    from dist_awenc.config import PretrainConfig, load_config
    from dist_awenc.ssl.pretrain import pretrain

    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / "digits_vit_mocov3.yaml",
                      [f"run.out_dir={tmp_path}", "train.max_steps=2", "train.batch_size=8", "train.progress=false",
                       "train.log_every=1", "optim.warmup_steps=1"])
    path = pretrain(cfg)
    card = json.loads(path.with_suffix(".json").read_text())
    assert (card["arch"], card["arch_kwargs"], card["method"], card["feature_dim"]) == (VIT, VIT_KWARGS, "moco_v3", 192)
    losses = [json.loads(line)["loss"] for line in (path.parent / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    encoder, _ = load_encoder(path)
    torch.manual_seed(cfg.run.seed)
    fresh = build_encoder(VIT, VIT_KWARGS, cfg.encoder.mean, cfg.encoder.std, SIZE)
    assert any(not torch.equal(a, b) for a, b in zip(encoder.state_dict().values(), fresh.state_dict().values()))
    with torch.no_grad():
        assert encoder.eval()(_images(2)).shape == (2, 192)


def test_a_timm_vit_is_pretrained_watermarked_embedded_and_verified(tmp_path, no_network):
    """Owners can watermark a ViT: MoCo v3 pre-training, stage 1, stage 2 and a white-box verdict run on a timm
    ViT-Tiny end to end (a few steps each, 16 px; the verdict's numbers are not the point, that it runs is)."""
    from dist_awenc.config import EmbedConfig, PretrainConfig, VerifyConfig, WatermarkConfig, load_config
    from dist_awenc.ssl.pretrain import pretrain
    from dist_awenc.verify.run import verify
    from dist_awenc.watermark.embed import embed
    from dist_awenc.watermark.generate import watermark

    out = [f"run.out_dir={tmp_path}"]
    f0 = pretrain(load_config(PretrainConfig, ROOT / "configs" / "pretrain" / "digits_vit_mocov3.yaml",
                              out + ["train.max_steps=1", "train.batch_size=8", "train.progress=false"]))
    secret = watermark(load_config(WatermarkConfig, None, out + ["run.name=wm", f"encoder={f0}", "generation.steps=2",
                                                                 "generation.batch_size=8", "plan.alternatives=0"]))
    wm = embed(load_config(EmbedConfig, None, out + ["run.name=embed", f"encoder={f0}", f"secret={secret}",
                                                     "ssl.method=moco_v3", "train.max_steps=1", "train.batch_size=8",
                                                     "train.progress=false"]))
    card = json.loads(wm.with_suffix(".json").read_text())
    assert card["arch"] == VIT and card["arch_kwargs"] == VIT_KWARGS and card["secret_sha256"]
    verdicts = verify(load_config(VerifyConfig, None, out + ["run.name=v", f"suspect={wm}", f"secret={secret}"]))
    assert verdicts[0].mode == "whitebox" and verdicts[0].n == 256 and 0 <= verdicts[0].image_p <= 1
