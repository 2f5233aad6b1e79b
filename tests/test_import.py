"""Third-party weights (#13): a torchvision ResNet state dict, written here by plain torchvision code (never by this
project's save functions), verified with suspect_card.* fields or after `awenc import`."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from dist_awenc.cli import main
from dist_awenc.config import SuspectCardSection
from dist_awenc.encoders.io import build_encoder, card_for, load_encoder, save_encoder, sha256_file
from dist_awenc.encoders.keymap import fit
from dist_awenc.encoders.thirdparty import import_weights, load_suspect
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.verify.core import verify_whitebox
from dist_awenc.watermark.secret import Secret, save_secret

SIZE = 16
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.247, 0.243, 0.261]
FIELDS = ["suspect_card.arch=resnet18", "suspect_card.stem=cifar", f"suspect_card.input_size={SIZE}",
          f"suspect_card.mean={MEAN}", f"suspect_card.std={STD}"]


def pirate_resnet18() -> nn.Module:
    """torchvision's ResNet-18 with a 10-class head and the CIFAR stem, BatchNorm statistics made non-trivial."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
    return model.eval()


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision's own features: the model with ``fc = Identity`` on normalised images."""
    m = copy.deepcopy(model).eval()
    m.fc = nn.Identity()
    with torch.no_grad():
        return m((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))


@pytest.fixture(scope="module")
def pirate(tmp_path_factory):
    """The model, its fp16-rounded twin, and its weights as a pirate would save them."""
    root = tmp_path_factory.mktemp("pirate")
    model = pirate_resnet18()
    half = copy.deepcopy(model).half().state_dict()  # fp16 floats; num_batches_tracked stays int64
    files = {"pt_fp16": root / "pirate_fp16.pt", "pt_fp16_ddp": root / "pirate_ddp.pth",
             "st_fp32": root / "pirate.safetensors", "st_fp16_ddp": root / "pirate_ddp_fp16.safetensors"}
    torch.save(half, files["pt_fp16"])
    torch.save({f"module.{k}": v for k, v in half.items()}, files["pt_fp16_ddp"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(files["st_fp32"]))
    save_file({f"module.{k}": v.contiguous() for k, v in half.items()}, str(files["st_fp16_ddp"]))
    rounded = copy.deepcopy(model).half().float().eval()
    return {"model": model, "rounded": rounded, "files": files, "root": root}


def _import(path: Path, out: Path, **kw) -> dict:
    return import_weights(path, arch="resnet18", stem="cifar", input_size=SIZE, mean=MEAN, std=STD, out=out, **kw)


def _card(**kw) -> SuspectCardSection:
    return SuspectCardSection(**{"arch": "resnet18", "stem": "cifar", "input_size": SIZE, "mean": MEAN, "std": STD, **kw})


def _images(n: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- mapping: same features


@pytest.mark.parametrize("name", ["pt_fp16", "pt_fp16_ddp", "st_fp32", "st_fp16_ddp"])
def test_imported_features_equal_torchvision_penultimate(pirate, tmp_path, name, capsys):
    x = _images()
    card = _import(pirate["files"][name], tmp_path / "imp")
    said = capsys.readouterr().out
    assert "dropped the classifier head (fc.bias (10,), fc.weight (10, 512))" in said
    assert ("cast" in said and "float16 tensors to float32" in said) == ("fp16" in name)
    assert ("'module.' prefix" in said) == ("ddp" in name)
    encoder, loaded = load_encoder(tmp_path / "imp")  # the copy, its card and its hash: no fields needed
    assert loaded["sha256"] == card["sha256"] == sha256_file(tmp_path / "imp" / "encoder.safetensors")
    assert loaded["imported"] is True and loaded["stage"] == "import"
    assert loaded["source"]["sha256"] == sha256_file(pirate["files"][name])
    assert loaded["arch"] == "resnet18" and loaded["arch_kwargs"] == {"stem": "cifar", "norm": "batch"}
    assert loaded["input_size"] == SIZE and loaded["feature_dim"] == 512
    with torch.no_grad():
        ours = encoder.eval()(x)
    reference = pirate["rounded"] if "fp16" in name else pirate["model"]
    assert torch.allclose(ours, penultimate(reference, x), rtol=1e-4, atol=1e-5)
    full = penultimate(pirate["model"], x)  # the fp32 original, within fp16 rounding of its weights
    assert torch.allclose(ours, full, rtol=2e-2, atol=2e-2 * float(full.abs().mean()))
    direct, dcard = load_suspect(pirate["files"][name], _card())  # the same without importing
    with torch.no_grad():
        assert torch.equal(direct(x), ours)
    assert dcard["sha256"] == loaded["source"]["sha256"] and "imported" not in dcard


def test_wrapped_checkpoint_and_inferred_stem(pirate, tmp_path, capsys):
    """A training checkpoint ({"state_dict": ..., "epoch": ...}): its other entries (even a normalisation of its own)
    never change how it is measured; the stem is read from conv1's kernel when not given."""
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"state_dict": pirate["model"].state_dict(), "epoch": 7, "mean": [0.0, 0.0, 0.0], "input_size": 224},
               ckpt)
    card = import_weights(ckpt, arch="resnet18", input_size=SIZE, mean=MEAN, std=STD, out=tmp_path / "imp")
    said = capsys.readouterr().out
    assert "took the state dict under 'state_dict' (ignored: epoch, input_size, mean)" in said
    assert "stem cifar: conv1 is 3x3" in said
    assert card["arch_kwargs"]["stem"] == "cifar" and card["input_size"] == SIZE
    x = _images()
    with torch.no_grad():
        assert torch.allclose(load_encoder(tmp_path / "imp")[0].eval()(x), penultimate(pirate["model"], x), atol=1e-5)


def test_default_normalisation_is_imagenets_and_said(pirate, tmp_path, capsys):
    card = import_weights(pirate["files"]["st_fp32"], arch="resnet18", input_size=SIZE, out=tmp_path / "imp")
    assert "ImageNet's mean/std" in capsys.readouterr().out
    assert torch.allclose(torch.tensor(card["mean"]), torch.tensor([0.485, 0.456, 0.406]))


def test_import_is_written_once(pirate, tmp_path, capsys):
    first = _import(pirate["files"]["pt_fp16"], tmp_path / "imp")
    before = (tmp_path / "imp" / "encoder.safetensors").stat().st_mtime_ns
    again = _import(pirate["files"]["pt_fp16"], tmp_path / "imp")
    assert "nothing written" in capsys.readouterr().out
    assert again["sha256"] == first["sha256"]
    assert (tmp_path / "imp" / "encoder.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ArtifactError, match="another import .source file"):
        _import(pirate["files"]["st_fp32"], tmp_path / "imp")
    with pytest.raises(ArtifactError, match="another import .input_size"):
        import_weights(pirate["files"]["pt_fp16"], arch="resnet18", stem="cifar", input_size=32, mean=MEAN, std=STD,
                       out=tmp_path / "imp")


def test_bf16_is_cast_and_said():
    expected = {"conv1.weight": torch.zeros(2, 3), "bn1.num_batches_tracked": torch.tensor(0)}
    state = {"conv1.weight": torch.ones(2, 3, dtype=torch.bfloat16), "bn1.num_batches_tracked": torch.tensor(5),
             "head.weight": torch.ones(4, 2, dtype=torch.bfloat16)}
    out, notes = fit(state, expected, "x.pt", "toy")
    assert out["conv1.weight"].dtype == torch.float32 and out["bn1.num_batches_tracked"].dtype == torch.int64
    assert notes == ["dropped the classifier head (head.weight (4, 2)): the encoder is what is measured",
                     "cast 1 bfloat16 tensors to float32"]


# ----------------------------------------------------------------------------- same verdict as the project's own file


def _secret(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    eps = 16 / 255
    secret = Secret(key=torch.rand(3, SIZE, SIZE, generator=g), delta=eps * torch.sign(torch.randn(3, SIZE, SIZE, generator=g)),
                    eps=eps, control_seed=2)
    save_secret(secret, tmp_path / "secret")
    return tmp_path / "secret.safetensors"


def _project_copy(pirate, tmp_path: Path) -> Path:
    """The same (fp16-rounded) weights saved through this project's own save_encoder."""
    enc = build_encoder("resnet18", {"stem": "cifar", "norm": "batch"}, MEAN, STD, SIZE)
    state = {k: v for k, v in pirate["rounded"].state_dict().items() if not k.startswith("fc.")}
    enc.backbone.load_state_dict(state, strict=True)
    card = card_for(enc, arch="resnet18", arch_kwargs={"stem": "cifar", "norm": "batch"}, method="simclr",
                    stage="pretrain", parent=None)
    (tmp_path / "own").mkdir()
    save_encoder(enc, tmp_path / "own" / "encoder", card)
    return tmp_path / "own"


def test_whitebox_verdict_equals_the_projects_own_file(pirate, tmp_path):
    from dist_awenc.watermark.secret import load_secret

    secret = load_secret(_secret(tmp_path))
    x = _images(12, seed=4)
    own, _ = load_encoder(_project_copy(pirate, tmp_path))
    _import(pirate["files"]["pt_fp16_ddp"], tmp_path / "imp")
    imported, _ = load_encoder(tmp_path / "imp")
    direct, _ = load_suspect(pirate["files"]["pt_fp16"], _card())
    verdicts = [verify_whitebox(m, secret, x, tau=0.0) for m in (own, imported, direct)]
    for v in verdicts[1:]:
        assert (v.p_value, v.effect, v.decision, v.n) == (verdicts[0].p_value, verdicts[0].effect, verdicts[0].decision, 12)


def test_cli_verify_bare_file_imported_and_own_agree(pirate, tmp_path, capsys):
    secret = _secret(tmp_path)
    own = _project_copy(pirate, tmp_path)
    assert main(["import", str(pirate["files"]["pt_fp16"]), "--arch", "resnet18", "--stem", "cifar", "--input-size",
                 str(SIZE), "--mean", *map(str, MEAN), "--std", *map(str, STD), "--out", str(tmp_path / "imp")]) == 0
    common = [f"secret={secret}", f"run.out_dir={tmp_path / 'runs'}", "data.name=fake", "data.size=40",
              f"data.image_size={SIZE}", "verify.n=8", "verify.exploratory=true", "verify.tau_whitebox=0.0"]
    runs = {"bare": [f"suspect={pirate['files']['pt_fp16']}", *FIELDS], "imported": [f"suspect={tmp_path / 'imp'}"],
            "imported_agreeing": [f"suspect={tmp_path / 'imp'}", "suspect_card.input_size=16", f"suspect_card.mean={MEAN}"],
            "own": [f"suspect={own}"]}
    out = {}
    for name, args in runs.items():
        assert main(["verify", "--mode", "whitebox", f"run.name={name}", *common, *args]) == 0, capsys.readouterr().err
        out[name] = json.loads((tmp_path / "runs" / name / "verdict.json").read_text())
    for name in ("imported", "imported_agreeing", "own"):
        assert (out[name]["p_value"], out[name]["effect"]) == (out["bare"]["p_value"], out["bare"]["effect"])
    assert out["bare"]["details"]["suspect_sha256"] == sha256_file(pirate["files"]["pt_fp16"])


# ----------------------------------------------------------------------------- refusals


class Plant:
    """Unpickling this creates ``path``: what a planted checkpoint could do (run any code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_non_state_dict_pickles_are_refused_and_nothing_runs(pirate, tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = {"object": tmp_path / "object.pt", "payload": tmp_path / "payload.pt", "module": tmp_path / "module.pth"}
    torch.save({"x": object()}, bad["object"])
    torch.save({"conv1.weight": torch.zeros(1), "x": Plant(marker)}, bad["payload"])
    torch.save(pirate["model"], bad["module"])
    for path in bad.values():
        with pytest.raises(ArtifactError, match="refused to load: not a plain state dict"):
            load_suspect(path, _card())
        with pytest.raises(ArtifactError, match="refused to load"):
            _import(path, tmp_path / "imp")
        capsys.readouterr()
        assert main(["import", str(path), "--arch", "resnet18", "--input-size", "16"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("awenc import: error:") and "refused to load" in err[0]
    assert not marker.exists()
    torch.load(bad["payload"], weights_only=False)  # control: unpickling it for real would have run the payload
    assert marker.exists()
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(ArtifactError, match="not a plain mapping of names to tensors"):
        load_suspect(listed, _card())
    two = tmp_path / "two.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "model": {"a": torch.zeros(1)}}, two)
    with pytest.raises(ArtifactError, match="several state dicts"):
        load_suspect(two, _card())
    assert not (tmp_path / "imp").exists()


def test_missing_and_unexpected_keys_are_listed(pirate, tmp_path):
    state = dict(pirate["model"].state_dict())
    del state["layer4.1.bn2.weight"]
    state["extra.scale"] = torch.ones(1)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    with pytest.raises(ArtifactError) as e:
        load_suspect(path, _card())
    msg = str(e.value)
    assert "\n" not in msg and "1 missing (layer4.1.bn2.weight)" in msg and "1 unexpected (extra.scale)" in msg
    with pytest.raises(ArtifactError) as e:  # the wrong depth: up to five of the missing keys, then a count
        load_suspect(pirate["files"]["pt_fp16"], _card(arch="resnet34"))
    assert "missing (layer1.2.conv1.weight" in str(e.value) and "more)" in str(e.value)
    with pytest.raises(ArtifactError, match=r"shape\(s\) differ .*conv1.weight \(64, 3, 3, 3\) vs \(64, 3, 7, 7\)"):
        load_suspect(pirate["files"]["pt_fp16"], _card(stem="imagenet"))
    with pytest.raises(ConfigError, match="suspect_card.arch: unknown encoder 'vit_b_16'; valid: .*timm/<model name>"):
        load_suspect(pirate["files"]["pt_fp16"], _card(arch="vit_b_16"))


def test_bare_file_without_fields_says_how(pirate, capsys):
    with pytest.raises(ArtifactError, match="suspect_card.arch and suspect_card.input_size .* `awenc import`"):
        load_suspect(pirate["files"]["pt_fp16"], SuspectCardSection())
    with pytest.raises(ConfigError, match="awenc import"):
        load_suspect(pirate["files"]["pt_fp16"], SuspectCardSection(arch="resnet18"))


def test_fields_that_disagree_with_a_card_are_refused(pirate, tmp_path, capsys):
    _import(pirate["files"]["pt_fp16"], tmp_path / "imp")
    load_suspect(tmp_path / "imp", _card())  # the same conventions: fine (mean/std compared as the card's float32)
    for field, value in (("input_size", 32), ("stem", "imagenet"), ("arch", "resnet34"), ("mean", [0.5, 0.5, 0.5])):
        with pytest.raises(ConfigError, match=f"suspect_card.{field}=.* disagrees with the card"):
            load_suspect(tmp_path / "imp", SuspectCardSection(**{field: value}))
    imp = str(tmp_path / "imp")
    common = [f"run.out_dir={tmp_path / 'runs'}", "suspect_card.input_size=32", "data.name=fake", "data.size=40"]
    secret = _secret(tmp_path)
    for argv in (["verify", f"suspect={imp}", f"secret={secret}", *common],
                 ["downstream", f"encoder={imp}", *common],
                 ["attack", f"encoder={imp}", *common]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"awenc {argv[0]}: error: suspect_card.input_size=32 disagrees"), err
    assert not (tmp_path / "runs").exists()
    capsys.readouterr()
    assert main(["verify", "--mode", "blackbox_label", f"suspect={imp}", f"secret={secret}", *common]) == 2
    assert "verified white-box" in capsys.readouterr().err


# ----------------------------------------------------------------------------- downstream and attack take the fields


def test_downstream_and_attack_take_a_bare_file(pirate, tmp_path, capsys):
    bare = pirate["files"]["pt_fp16_ddp"]
    common = [f"run.out_dir={tmp_path / 'runs'}", "data.name=fake", "data.size=40", f"data.image_size={SIZE}",
              "probe.epochs=2", "probe.knn_k=3", *FIELDS]
    assert main(["downstream", f"encoder={bare}", "run.name=ds", *common]) == 0, capsys.readouterr().err
    model_card = json.loads((tmp_path / "runs" / "ds" / "model.json").read_text())
    assert model_card["encoder"]["sha256"] == sha256_file(bare) and model_card["encoder"]["arch"] == "resnet18"
    assert main(["attack", f"encoder={bare}", "run.name=att", "attack.name=prune_global", "attack.strength=0.5",
                 *common]) == 0, capsys.readouterr().err
    attacked = json.loads((tmp_path / "runs" / "att" / "encoder.json").read_text())
    assert attacked["parent"] == sha256_file(bare) and attacked["attack"]["attack"] == "prune_global"
    assert load_encoder(tmp_path / "runs" / "att")[1]["sha256"] == attacked["sha256"]


def test_run_folders_from_before_the_section_are_the_same_run(tmp_path):
    """A downstream or verify folder written before `suspect_card` existed is reused by a config that leaves it unset."""
    import yaml

    from dist_awenc.config import DownstreamConfig, load_config, to_yaml
    from dist_awenc.runs import config_difference

    cfg = load_config(DownstreamConfig, None, ["encoder=runs/f0"])
    old = yaml.safe_load(to_yaml(cfg))
    del old["suspect_card"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert config_difference(tmp_path, cfg) is None
    cfg.suspect_card.input_size = 32
    assert config_difference(tmp_path, cfg)[0] == "suspect_card"
