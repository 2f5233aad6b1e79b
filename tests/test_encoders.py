"""Encoders: the backbone registry, and saving / loading released encoders (safetensors + card)."""
from __future__ import annotations

import json
import pickle

import pytest
import torch
from torch import nn

from dist_awenc.encoders.io import Encoder, build_encoder, card_for, load_encoder, save_encoder, sha256_file
from dist_awenc.encoders.registry import ENCODERS, arch_kwargs, build_backbone, register_encoder, resolve_arch_kwargs
from dist_awenc.errors import ArtifactError, ConfigError

# name -> (kwargs, input size, batch, feature_dim)
SWEEP = {
    "tiny": ({"width": 8, "norm": "group"}, 8, 4, 32),
    "resnet18": ({"stem": "cifar"}, 32, 2, 512),
    "resnet34": ({"stem": "cifar"}, 32, 2, 512),
    "resnet50": ({"stem": "cifar"}, 32, 2, 2048),
}
CASES = [(name, *SWEEP.get(name, ({}, 32, 2, None))) for name in sorted(ENCODERS)]
CASES.append(("resnet18", {"stem": "imagenet"}, 64, 2, 512))


def test_registry_has_the_documented_backbones():
    assert set(SWEEP) <= set(ENCODERS)


@pytest.mark.parametrize("name,kwargs,size,batch,feature_dim", CASES,
                         ids=[f"{c[0]}-{c[1].get('stem', '')}{c[2]}px" for c in CASES])
def test_every_backbone_forward_backward(name, kwargs, size, batch, feature_dim):
    torch.manual_seed(0)
    enc = build_encoder(name, kwargs, [0.5] * 3, [0.25] * 3, size)
    x = torch.rand(batch, 3, size, size)
    out = enc(x)
    assert out.shape == (batch, enc.feature_dim)
    if feature_dim is not None:
        assert enc.feature_dim == feature_dim
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_build_backbone_refuses_unknown_or_unused_kwargs():
    """As timm does: an argument a backbone cannot use (a width for a ResNet) is an error, not silently dropped."""
    assert build_backbone("tiny", width=4, norm="none").feature_dim == 16
    with pytest.raises(ConfigError, match="'nonsense', 'stem'.*takes: width, norm"):
        build_backbone("tiny", width=4, norm="none", stem="cifar", nonsense=1)
    with pytest.raises(ConfigError, match="resnet18.*'width'"):
        resolve_arch_kwargs("resnet18", width=64, norm="batch")
    assert resolve_arch_kwargs("resnet18", norm="batch") == {"stem": "cifar", "norm": "batch"}
    assert resolve_arch_kwargs("tiny_resnet") == {"width": 16, "norm": "group"}
    assert arch_kwargs("tiny", width=4, norm="none", stem="cifar") == {"width": 4, "norm": "none"}


def test_pretrain_config_with_a_width_for_a_resnet_is_an_error():
    from dist_awenc.config import EncoderSection
    from dist_awenc.ssl.pretrain import encoder_from_config

    with pytest.raises(ConfigError, match="resnet18.*width"):
        encoder_from_config(EncoderSection(arch="resnet18", width=64, norm="batch"), 32)
    enc, arch, kwargs = encoder_from_config(EncoderSection(arch="tiny"), 8)
    assert kwargs == {"width": 32, "norm": "group"}  # the card records every argument, defaults included


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        build_backbone("vit_gigantic")
    msg = str(e.value)
    assert "vit_gigantic" in msg
    for name in ENCODERS:
        assert name in msg
    with pytest.raises(ConfigError, match="resnet50"):
        arch_kwargs("nope")


def test_duplicate_registration_is_refused():
    before = dict(ENCODERS)
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("tiny")(lambda: nn.Identity())
    assert ENCODERS == before


def test_bad_norm_and_stem_are_config_errors():
    with pytest.raises(ConfigError, match="unknown norm"):
        build_backbone("tiny", norm="layer")
    with pytest.raises(ConfigError, match="unknown stem"):
        build_backbone("resnet18", stem="vit")
    with pytest.raises(ConfigError, match="batch or group"):
        build_backbone("resnet18", norm="none")


# ----------------------------------------------------------------------------- save / load


def _tiny(width: int = 8, seed: int = 0) -> tuple[Encoder, dict]:
    torch.manual_seed(seed)
    kw = {"width": width, "norm": "group"}
    enc = build_encoder("tiny", kw, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 8).eval()
    card = card_for(enc, arch="tiny", arch_kwargs=kw, method="simclr", stage="pretrain", parent="abc123",
                    extra={"note": "test"})
    return enc, card


@pytest.fixture
def saved(tmp_path):
    enc, card = _tiny()
    card = save_encoder(enc, tmp_path / "encoder", card)
    return enc, card, tmp_path / "encoder.safetensors"


def test_save_load_round_trip(saved, tmp_path):
    enc, card, path = saved
    assert path.exists() and path.with_suffix(".json").exists()
    x = torch.rand(5, 3, 8, 8)
    for where in (path, tmp_path):  # file or run folder
        loaded, lcard = load_encoder(where)
        loaded.eval()
        assert torch.equal(loaded(x), enc(x))
        assert torch.equal(loaded.mean, enc.mean) and torch.equal(loaded.std, enc.std)
        assert lcard == json.loads(path.with_suffix(".json").read_text())


def test_card_fields(saved):
    enc, card, path = saved
    on_disk = json.loads(path.with_suffix(".json").read_text())
    assert on_disk == card
    assert on_disk["arch"] == "tiny"
    assert on_disk["arch_kwargs"] == {"width": 8, "norm": "group"}
    assert on_disk["method"] == "simclr"
    assert on_disk["input_size"] == 8
    assert on_disk["mean"] == pytest.approx([0.4, 0.5, 0.6])
    assert on_disk["std"] == pytest.approx([0.2, 0.25, 0.3])
    assert on_disk["feature_dim"] == 32
    assert on_disk["sha256"] == sha256_file(path)
    assert on_disk["parent"] == "abc123"
    assert on_disk["note"] == "test"


def _edit_card(path, **changes) -> None:
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.update(changes)
    card_path.write_text(json.dumps(card))


def test_weights_of_another_width_do_not_fit(saved):
    _, card, path = saved
    _edit_card(path, arch_kwargs={"width": 16, "norm": "group"})
    with pytest.raises(ArtifactError, match="do not fit architecture"):
        load_encoder(path)


def test_weights_of_another_architecture_do_not_fit(saved):
    _, card, path = saved
    _edit_card(path, arch="resnet18", arch_kwargs={"stem": "cifar", "norm": "batch"})
    with pytest.raises(ArtifactError, match="do not fit architecture 'resnet18'"):
        load_encoder(path)


def test_pickle_named_safetensors_is_refused(saved, tmp_path):
    enc, card, path = saved
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps({k: v for k, v in enc.state_dict().items()}))
    fake.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_encoder(fake)
    zipped = tmp_path / "zipped.safetensors"
    torch.save(enc.backbone.state_dict(), zipped)
    with pytest.raises(ArtifactError, match="not a safetensors file"):
        load_encoder(zipped, card)


def test_truncated_safetensors_is_refused(saved):
    _, card, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="unreadable safetensors"):
        load_encoder(path)


def test_hash_mismatch_is_refused(saved):
    _, card, path = saved
    _edit_card(path, sha256="0" * 64)
    with pytest.raises(ArtifactError, match="does not match its card"):
        load_encoder(path)
    loaded, _ = load_encoder(path, verify_hash=False)  # opting out of the check
    assert isinstance(loaded, Encoder)


def test_modified_weights_fail_the_hash(saved):
    _, card, path = saved
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its card"):
        load_encoder(path)


def test_missing_file_or_card(saved, tmp_path):
    _, card, path = saved
    with pytest.raises(ArtifactError, match="does not exist"):
        load_encoder(tmp_path / "nothing.safetensors")
    with pytest.raises(ArtifactError, match="no encoder given"):
        load_encoder("")
    path.with_suffix(".json").unlink()
    with pytest.raises(ArtifactError, match="card"):
        load_encoder(path)


def test_pickled_module_pt_is_refused(saved, tmp_path):
    enc, card, _ = saved
    pt = tmp_path / "module.pt"
    torch.save(enc.backbone, pt)  # a whole nn.Module: loading it would unpickle arbitrary code
    with pytest.raises(ArtifactError, match="refused to load"):
        load_encoder(pt, card)


def test_pt_state_dict_loads_with_card(saved, tmp_path):
    enc, card, _ = saved
    x = torch.rand(3, 3, 8, 8)
    plain = tmp_path / "plain.pt"
    torch.save(enc.backbone.state_dict(), plain)
    prefixed = tmp_path / "prefixed.pt"
    torch.save({f"backbone.{k}": v for k, v in enc.backbone.state_dict().items()}, prefixed)
    for p in (plain, prefixed):
        loaded, lcard = load_encoder(p, card)
        assert torch.equal(loaded.eval()(x), enc(x))
        assert lcard["arch"] == "tiny"
    with pytest.raises(ArtifactError, match="card"):  # a bare .pt has no card beside it
        load_encoder(plain)


def test_pt_not_a_state_dict_is_refused(saved, tmp_path):
    _, card, _ = saved
    pt = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], pt)
    with pytest.raises(ArtifactError, match="state_dict"):
        load_encoder(pt, card)


def test_unknown_weights_format(saved, tmp_path):
    _, card, _ = saved
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"not weights")
    with pytest.raises(ArtifactError, match="unknown weights format"):
        load_encoder(odd, card)
