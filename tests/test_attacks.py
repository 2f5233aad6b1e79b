"""Removal attacks: registry sweep at tiny size, and the property each attack promises."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from dist_awenc.attacks import (ATTACK_STRENGTHS, ATTACKS, AttackData, AttackOptions, QueryTransform,
                                TransformedEncoder, apply_attack, register_attack, wrap_query_transform)
from dist_awenc.attacks.base import relative_change
from dist_awenc.evaluate.serving import with_recorded_transform
from dist_awenc.data import build_dataset
from dist_awenc.encoders.io import build_encoder, card_for, load_encoder, save_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.evaluate.probe import DownstreamModel, extract_features

ARCH_KWARGS = {"width": 8, "norm": "group"}
QUERY_ATTACKS = ("query_jpeg", "query_noise", "query_resize", "query_crop", "query_purify")
WEIGHT_ATTACKS = sorted(set(ATTACKS) - set(QUERY_ATTACKS))
# one cheap strength per attack for the sweep
TINY_STRENGTH = {"finetune_probe": 0, "finetune_full": 1e-3, "finetune_ssl": 1, "prune_global": 0.5,
                 "prune_channel": 0.25, "distill": 1, "quantize_int8": 8, "query_jpeg": 50, "query_noise": 0.05,
                 "query_resize": 0.5, "query_crop": 0.75, "overwrite": 1,
                 # adaptive attacks (tests/test_adaptive_attacks.py checks what each one claims)
                 "distill_strong_aug": 1, "distill_arch": 1, "prune_finetune": 0.5, "query_purify": 1.0,
                 "adversarial_finetune": 1, "finetune_resolution": 2}
TINY_OPTIONS = dict(epochs=1, batch_size=32, proj_hidden_dim=32, proj_dim=16, overwrite_steps=5, adv_steps=5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    images, labels = build_dataset("digits", image_size=8).get_batch(torch.arange(600))
    return images, labels


@pytest.fixture(scope="module")
def data(digits) -> AttackData:
    images, labels = digits
    return AttackData(images[:96], labels[:96], 10, images[96:192], seed=0)


@pytest.fixture(scope="module")
def held(digits) -> torch.Tensor:
    return digits[0][400:]


def tiny_encoder(seed: int = 0, norm: str = "group"):
    torch.manual_seed(seed)
    kwargs = {**ARCH_KWARGS, "norm": norm}
    enc = build_encoder("tiny", kwargs, [0.5] * 3, [0.5] * 3, 8)
    card = card_for(enc, arch="tiny", arch_kwargs=kwargs, method="simclr", stage="pretrain", parent=None)
    return enc, card


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(module: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = module.state_dict()
    return set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_attack_with_a_grid():
    assert set(ATTACKS) == {"finetune_probe", "finetune_full", "finetune_ssl", "prune_global", "prune_channel",
                            "distill", "quantize_int8", "query_jpeg", "query_noise", "query_resize", "query_crop",
                            "overwrite", "distill_strong_aug", "distill_arch", "prune_finetune", "query_purify",
                            "adversarial_finetune", "finetune_resolution"}
    assert set(ATTACK_STRENGTHS) == set(ATTACKS)
    assert all(ATTACK_STRENGTHS[name] for name in ATTACKS)
    assert ATTACK_STRENGTHS["quantize_int8"] == [8]


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_attack("prune_global")(lambda *a: a)


def test_unknown_attack_lists_valid_names(data):
    enc, card = tiny_encoder()
    with pytest.raises(ConfigError, match="unknown attack 'nope'") as err:
        apply_attack("nope", enc, card, 1.0, data, progress=False)
    assert "prune_global" in str(err.value) and "overwrite" in str(err.value)


def test_options_are_a_structured_config():
    cfg = OmegaConf.merge(OmegaConf.structured(AttackOptions), OmegaConf.from_dotlist(["lr=0.01", "student_width=16"]))
    opts = OmegaConf.to_object(cfg)
    assert isinstance(opts, AttackOptions) and opts.lr == 0.01 and opts.student_width == 16
    with pytest.raises(ConfigError, match="batch_size"):
        AttackOptions(batch_size=0)


@pytest.mark.parametrize("name,strength", [("prune_global", 1.5), ("prune_channel", -0.1), ("finetune_ssl", 1.5),
                                           ("query_jpeg", 0), ("query_jpeg", 101), ("quantize_int8", 1),
                                           ("finetune_full", 0), ("query_crop", 0), ("finetune_resolution", 1),
                                           ("finetune_resolution", 0.1), ("finetune_resolution", -2)])
def test_bad_strength_is_a_config_error(name, strength, data):
    enc, card = tiny_encoder()
    with pytest.raises(ConfigError, match="strength"):
        apply_attack(name, enc, card, strength, data, progress=False)


def test_data_of_another_size_is_refused(data):
    enc = build_encoder("tiny", ARCH_KWARGS, [0.5] * 3, [0.5] * 3, 16)
    card = card_for(enc, arch="tiny", arch_kwargs=dict(ARCH_KWARGS), method="simclr", stage="x", parent=None)
    with pytest.raises(ConfigError, match="8 px"):
        apply_attack("prune_global", enc, card, 0.5, data, progress=False)


# ----------------------------------------------------------------------------- sweep


@pytest.mark.parametrize("norm", ["group", "batch"])
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_runs_and_leaves_the_input_alone(name, norm, data, held):
    enc, card = tiny_encoder(norm=norm)
    enc.train()
    before = snapshot(enc)
    out, info = apply_attack(name, enc, card, TINY_STRENGTH[name], data, AttackOptions(**TINY_OPTIONS), progress=False)
    assert out is not enc and out.backbone is not enc.backbone
    assert same_state(enc, before) and enc.training and all(p.requires_grad for p in enc.parameters())
    feats = extract_features(out, held[:10])
    assert feats.shape == (10, enc.feature_dim) and torch.isfinite(feats).all()
    assert info["attack"] == name and info["strength"] == float(TINY_STRENGTH[name])
    arch = "tiny_resnet" if name == "distill_arch" else "tiny"  # distill_arch's student is another architecture
    assert info["arch"] == arch and info["arch_kwargs"] == card["arch_kwargs"]
    json.dumps(info)  # JSON-able


@pytest.mark.parametrize("name", WEIGHT_ATTACKS)
def test_attacked_encoder_saves_and_loads(name, data, held, tmp_path):
    enc, card = tiny_encoder()
    out, info = apply_attack(name, enc, card, TINY_STRENGTH[name], data, AttackOptions(**TINY_OPTIONS), progress=False)
    new_card = card_for(out, arch=info["arch"], arch_kwargs=info["arch_kwargs"], method=card["method"],
                        stage=f"attack:{name}", parent=None)
    save_encoder(out, tmp_path / "attacked", new_card)
    loaded, _ = load_encoder(tmp_path / "attacked.safetensors")
    assert torch.allclose(extract_features(loaded, held), extract_features(out, held), atol=1e-6)


# ----------------------------------------------------------------------------- fine-tuning


def test_finetune_probe_returns_an_equal_copy(data, held):
    enc, card = tiny_encoder()
    out, info = apply_attack("finetune_probe", enc, card, 0, data, progress=False)
    assert out is not enc and info["rel_weight_change"] == 0.0
    assert torch.equal(extract_features(out, held), extract_features(enc, held))


def test_finetune_full_changes_weights_more_at_a_higher_lr(data):
    enc, card = tiny_encoder()
    opts = AttackOptions(**{**TINY_OPTIONS, "epochs": 2})
    low, info_low = apply_attack("finetune_full", enc, card, 1e-4, data, opts, progress=False)
    high, info_high = apply_attack("finetune_full", enc, card, 1e-2, data, opts, progress=False)
    assert 0 < info_low["rel_weight_change"] < info_high["rel_weight_change"]
    assert relative_change(enc.backbone, low.backbone) == pytest.approx(info_low["rel_weight_change"])


def test_finetune_resolution_trains_at_the_new_size_and_says_so(data):
    """The pirate's fine-tune sees only 16 px batches (the 8 px data resized); the derivative takes 16 px."""
    enc, card = tiny_encoder()
    seen = []
    handle = enc.backbone.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    out, info = apply_attack("finetune_resolution", enc, card, 2, data, AttackOptions(**TINY_OPTIONS), progress=False)
    handle.remove()
    assert seen and set(seen) == {(16, 16)}  # the copy shares the hook: every training forward was at 16 px
    assert out.input_size == 16 and info["input_size"] == 16 and enc.input_size == 8
    assert info["lr"] == AttackOptions().resolution_lr and info["rel_weight_change"] > 0


def test_finetune_ssl_changes_weights(data):
    enc, card = tiny_encoder()
    out, info = apply_attack("finetune_ssl", enc, card, 2, data, AttackOptions(**TINY_OPTIONS), progress=False)
    assert info["rel_weight_change"] > 1e-3 and info["steps"] == 2 * 3


# ----------------------------------------------------------------------------- pruning, quantisation


def conv_weights(enc) -> list[torch.Tensor]:
    return [m.weight.detach() for m in enc.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@pytest.mark.parametrize("ratio", [0.1, 0.37, 0.9])
def test_prune_global_hits_the_ratio_exactly(ratio, data):
    enc, card = tiny_encoder()
    out, info = apply_attack("prune_global", enc, card, ratio, data, progress=False)
    ws = conv_weights(out)
    total = sum(w.numel() for w in ws)
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert abs(zeros - ratio * total) <= 1
    assert info["sparsity"] == pytest.approx(ratio, abs=1 / total)
    assert set(out.backbone.state_dict()) == set(enc.backbone.state_dict())  # plain state_dict, no masks
    # the smallest weights went: every survivor is at least as large as every pruned original
    orig = torch.cat([w.flatten().abs() for w in conv_weights(enc)])
    kept = torch.cat([w.flatten() != 0 for w in ws])
    assert orig[kept].min() >= orig[~kept].max()


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_prune_channel_zeroes_the_right_number_of_channels(ratio, data):
    enc, card = tiny_encoder()
    out, info = apply_attack("prune_channel", enc, card, ratio, data, progress=False)
    convs = [m for m in out.backbone.modules() if isinstance(m, nn.Conv2d)]
    for conv, orig in zip(convs, [m for m in enc.backbone.modules() if isinstance(m, nn.Conv2d)]):
        dead = conv.weight.detach().flatten(1).abs().sum(1) == 0
        assert int(dead.sum()) == round(ratio * conv.out_channels)
        norms = orig.weight.detach().flatten(1).abs().sum(1)
        assert norms[~dead].min() >= norms[dead].max()  # the smallest-L1 channels
        live = ~dead
        assert torch.equal(conv.weight[live], orig.weight[live])
    assert info["channels_pruned"] == [round(ratio * c.out_channels) for c in convs]


@pytest.mark.parametrize("bits,per_channel", [(8, True), (8, False), (6, True), (4, True)])
def test_quantized_weights_lie_on_the_grid(bits, per_channel, data):
    enc, card = tiny_encoder()
    out, info = apply_attack("quantize_int8", enc, card, bits, data, AttackOptions(quant_per_channel=per_channel),
                             progress=False)
    qmax = 2 ** (bits - 1) - 1
    for w in conv_weights(out):
        amax = w.abs().flatten(1).amax(1).view(-1, 1, 1, 1) if per_channel else w.abs().amax()
        q = w / (amax / qmax)
        assert torch.allclose(q, q.round(), atol=1e-5)
        assert q.abs().max() <= qmax + 1e-5
    assert info["levels"] == 2 * qmax + 1
    assert 0 < info["rel_weight_change"] < (0.01 if bits == 8 else 0.2)


# ----------------------------------------------------------------------------- distillation


def test_distilled_student_matches_the_teacher(digits, held):
    images, labels = digits
    teacher, card = tiny_encoder(seed=1)
    fresh, _ = tiny_encoder(seed=2)
    f_t = extract_features(teacher, held)
    before = float(F.cosine_similarity(extract_features(fresh, held), f_t).mean())
    data = AttackData(images[:64], labels[:64], 10, images[:256], seed=0)
    student, info = apply_attack("distill", teacher, card, 10, data, AttackOptions(batch_size=32), progress=False)
    after = float(F.cosine_similarity(extract_features(student, held), f_t).mean())
    assert after > 0.9 and after > before + 0.2, (before, after)
    assert info["loss_last"] < info["loss_first"]


def test_distill_student_options(data):
    enc, card = tiny_encoder()
    with pytest.raises(ConfigError, match="feature_dim"):
        apply_attack("distill", enc, card, 1, data, AttackOptions(student_width=4), progress=False)
    with pytest.raises(ConfigError, match="student_arch"):
        apply_attack("distill", enc, card, 1, data, AttackOptions(student_arch="vgg"), progress=False)
    out, info = apply_attack("distill", enc, card, 1, data,
                             AttackOptions(**{**TINY_OPTIONS, "student_width": 8}), progress=False)
    assert info["arch_kwargs"] == {"width": 8, "norm": "group"} and "rel_weight_change" in info


# ----------------------------------------------------------------------------- query side


@pytest.mark.parametrize("kind,strength", [("jpeg", 50), ("noise", 0.05), ("resize", 0.5), ("crop", 0.75)])
def test_query_transform_keeps_shape_and_range(kind, strength, held):
    out = QueryTransform(kind, strength, seed=3)(held)
    assert out.shape == held.shape and out.dtype == held.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, held)


def test_jpeg_quality_knob(held):
    x = held[:32]
    near = (QueryTransform("jpeg", 100)(x) - x).abs().mean()
    far = (QueryTransform("jpeg", 10)(x) - x).abs().mean()
    assert near < 0.01 and far > 3 * near and far > 0.02


def test_jpeg_passes_gradients_straight_through(held):
    x = held[:4].clone().requires_grad_(True)
    QueryTransform("jpeg", 50)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_noise_is_deterministic_per_image_and_seed(held):
    x = held[:16]
    t = QueryTransform("noise", 0.05, seed=7)
    a = t(x)
    assert torch.equal(a, t(x))
    assert torch.equal(a[5:9], t(x[5:9]))  # independent of the batch an image arrives in
    assert not torch.equal(a, QueryTransform("noise", 0.05, seed=8)(x))
    noise = (a - x)[(x > 0.2) & (x < 0.8)]  # unclamped entries
    assert noise.std() == pytest.approx(0.05, rel=0.2)


def test_resize_and_crop_at_strength_one_are_identity(held):
    for kind in ("resize", "crop"):
        assert torch.allclose(QueryTransform(kind, 1.0)(held), held, atol=1e-6)


@pytest.mark.parametrize("name", QUERY_ATTACKS)
def test_query_attack_round_trips_through_its_spec(name, data, held, tmp_path):
    enc, card = tiny_encoder()
    out, info = apply_attack(name, enc, card, ATTACK_STRENGTHS[name][0], data, progress=False)
    assert isinstance(out, TransformedEncoder) and info["rel_weight_change"] == 0.0
    assert out.feature_dim == enc.feature_dim and out.input_size == enc.input_size
    spec = json.loads(json.dumps(info["query_transform"]))
    assert spec == {"kind": name.removeprefix("query_"), "strength": ATTACK_STRENGTHS[name][0], "seed": data.seed}
    # saved weights are the suspect's; the card's spec rebuilds the same model around them
    saved = save_encoder(out, tmp_path / "enc", {**card, "query_transform": spec})
    assert saved["sha256"] == save_encoder(enc, tmp_path / "orig", card)["sha256"]
    rebuilt = wrap_query_transform(enc, spec)
    assert torch.allclose(extract_features(rebuilt, held), extract_features(out, held), atol=1e-6)
    assert not torch.allclose(extract_features(enc, held), extract_features(out, held), atol=1e-6)
    # loading never applies a card's transform (a suspect's card must not change how its weights are measured);
    # building the pirate's deployed model applies it, explicitly
    loaded, loaded_card = load_encoder(tmp_path / "enc.safetensors")
    assert torch.allclose(extract_features(loaded, held), extract_features(enc, held), atol=1e-6)
    deployed = with_recorded_transform(loaded, loaded_card)
    assert torch.allclose(extract_features(deployed, held), extract_features(out, held), atol=1e-6)
    # a downstream model over it has the usual state_dict keys
    assert set(DownstreamModel(out, out.feature_dim, 10).state_dict()) == set(
        DownstreamModel(enc, enc.feature_dim, 10).state_dict())


def test_wrap_query_transform_checks_its_spec():
    enc, _ = tiny_encoder()
    assert wrap_query_transform(enc, None) is enc
    with pytest.raises(ConfigError, match="kind, strength"):
        wrap_query_transform(enc, {"kind": "jpeg", "quality": 50})
    with pytest.raises(ConfigError, match="unknown query transform 'blur'"):
        wrap_query_transform(enc, {"kind": "blur", "strength": 1.0})


# ----------------------------------------------------------------------------- overwrite


def test_overwrite_embeds_a_pirate_mark(data):
    enc, card = tiny_encoder()
    out, info = apply_attack("overwrite", enc, card, 2, data, AttackOptions(**TINY_OPTIONS), progress=False)
    assert info["rel_weight_change"] > 1e-3
    assert info["pirate_key"].startswith("image:") and info["steps"] == 2 * 3
    again, info_again = apply_attack("overwrite", enc, card, 2, data, AttackOptions(**TINY_OPTIONS), progress=False)
    assert info_again["loss_last"] == pytest.approx(info["loss_last"])  # seeded
    assert relative_change(out.backbone, again.backbone) < 1e-6


def test_a_hand_edited_card_cannot_change_a_whitebox_verdict(held, tmp_path):
    """Adding a query_transform to a stolen encoder's card leaves the white-box statistic exactly as it was."""
    from dist_awenc.verify.core import verify_whitebox
    from dist_awenc.watermark.secret import Secret

    enc, card = tiny_encoder()
    g = torch.Generator().manual_seed(3)
    secret = Secret(key=torch.rand(3, 8, 8, generator=g), delta=(16 / 255) * torch.sign(torch.randn(3, 8, 8, generator=g)),
                    eps=16 / 255, control_seed=1)
    save_encoder(enc, tmp_path / "stolen", card)
    before = verify_whitebox(load_encoder(tmp_path / "stolen.safetensors")[0], secret, held)
    edited = json.loads((tmp_path / "stolen.json").read_text())
    edited["query_transform"] = {"kind": "jpeg", "strength": 10, "seed": 0}
    (tmp_path / "stolen.json").write_text(json.dumps(edited))
    after = verify_whitebox(load_encoder(tmp_path / "stolen.safetensors")[0], secret, held)
    assert after.p_value == before.p_value and after.effect == before.effect
