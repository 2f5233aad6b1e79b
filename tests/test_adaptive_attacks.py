"""Adaptive removal attacks (a pirate who knows the method): each runs at tiny size and does what it claims.

The registry sweep of tests/test_attacks.py also runs every one of them (both norms, save / load, the
query-side round trip of ``query_purify``); here: the property each promises, its strength checks, and
that the robustness grid and the calibration's null population take them.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from dist_awenc.attacks import ATTACK_STRENGTHS, ATTACKS, AttackData, AttackOptions, TransformedEncoder, apply_attack
from dist_awenc.attacks.adaptive import perturbation_response
from dist_awenc.attacks.query import QueryTransform, median3x3
from dist_awenc.attacks.stage import PirateData, attacked_card
from dist_awenc.attacks.training import strong_single_view
from dist_awenc.config import ProbeSection, RunSection
from dist_awenc.data import build_dataset
from dist_awenc.data.views import make_views
from dist_awenc.encoders.backbones import TinyConvNet, TinyResNet
from dist_awenc.encoders.io import Encoder, build_encoder, card_for, save_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.evaluate.probe import extract_features
from dist_awenc.stages.robustness import GridSection, expand_grid
from dist_awenc.stages import calibrate as C
from dist_awenc.watermark.generate import choose_key, generate_deltas

ROOT = Path(__file__).resolve().parent.parent
ADAPTIVE = ("distill_strong_aug", "distill_arch", "prune_finetune", "query_purify", "adversarial_finetune")
FAST = dict(epochs=1, batch_size=32, adv_steps=5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    return build_dataset("digits", image_size=8).get_batch(torch.arange(500))


@pytest.fixture(scope="module")
def data(digits) -> AttackData:
    images, labels = digits
    return AttackData(images[:128], labels[:128], 10, images[128:256], seed=0)


def suspect(arch: str = "tiny", width: int = 8, seed: int = 0) -> tuple[Encoder, dict]:
    torch.manual_seed(seed)
    kwargs = {"width": width, "norm": "group"}
    enc = build_encoder(arch, kwargs, [0.5] * 3, [0.5] * 3, 8)
    return enc, card_for(enc, arch=arch, arch_kwargs=kwargs, method="simclr", stage="embed", parent=None)


# ----------------------------------------------------------------------------- registry, grid, null population


def test_adaptive_attacks_have_default_grids_in_the_robustness_grid():
    assert set(ADAPTIVE) <= set(ATTACKS)
    assert ATTACK_STRENGTHS["prune_finetune"] == [0.5, 0.7, 0.9]
    assert ATTACK_STRENGTHS["query_purify"] == [0.5, 1.0]
    gridded = {t.attack for t in expand_grid(GridSection())}  # attacks: [] = every registered attack
    assert set(ADAPTIVE) <= gridded
    sweep = yaml.safe_load((ROOT / "configs/sweep/digits.yaml").read_text())
    assert sweep["grid"]["attacks"] == []  # the digits sweep runs every registered attack, the adaptive ones too


@pytest.mark.parametrize("population", ["digits_adaptive", "digits_adaptive10"])
def test_null_population_takes_the_adaptive_attacks(population):
    from dist_awenc.config import CalibrateConfig, load_config

    path = ROOT / f"configs/sweep/null/{population}.yaml"
    cfg = yaml.safe_load(path.read_text())
    load_config(CalibrateConfig, path)
    parsed = [C.parse_attack(a) for a in cfg["population"]["attacks"]]
    assert set(ADAPTIVE) <= {name for name, _ in parsed}
    for name, strength in parsed:  # each at a strength of its default grid
        assert strength in ATTACK_STRENGTHS[name], (name, strength)


def test_the_larger_null_population_is_the_adaptive_one_with_twice_the_seeds():
    small, large = (yaml.safe_load((ROOT / f"configs/sweep/null/{n}.yaml").read_text())
                    for n in ("digits_adaptive", "digits_adaptive10"))
    assert large["population"]["seeds"] == 2 * small["population"]["seeds"]
    assert {**large["population"], "seeds": None} == {**small["population"], "seeds": None}
    assert {k: v for k, v in large.items() if k != "population"} == {k: v for k, v in small.items() if k != "population"}


def test_null_population_refuses_an_unregistered_attack():
    with pytest.raises(ConfigError, match="unknown attack 'prune_everything'") as err:
        C.parse_attack("prune_everything:0.5")
    assert "prune_finetune" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="name:strength"):
        C.parse_attack("prune_finetune:lots")


def test_null_trial_of_a_query_attack_deploys_its_transform(data, tmp_path, monkeypatch):
    """A null encoder attacked by query_purify is served through the purification (black-box modes) while
    its weights are what white-box verification measures: the same invariant as for the owner's suspects."""
    enc, card = suspect()
    out, info = apply_attack("query_purify", enc, card, 1.0, data, progress=False)
    save_encoder(out, tmp_path / "null", attacked_card(card, info, out))
    seen = {}

    class Stop(Exception):
        pass

    def fake_evaluate(encoder, *a, **k):
        seen["encoder"] = encoder
        raise Stop

    monkeypatch.setattr(C, "evaluate_encoder", fake_evaluate)
    ctx = {"cache": tmp_path / "trials", "n": {}, "alpha": 1e-3, "cfg": SimpleNamespace(run=RunSection(), probe=ProbeSection()),
           "pirate": PirateData(data.train_images, data.train_labels, data.num_classes)}
    with pytest.raises(Stop):
        C._null_encoder("null", tmp_path / "null.safetensors", "fam", {}, ctx)
    deployed = seen["encoder"]
    assert isinstance(deployed, TransformedEncoder) and deployed.transform.spec() == info["query_transform"]


# ----------------------------------------------------------------------------- strengths


@pytest.mark.parametrize("name,strength", [("distill_strong_aug", 0), ("distill_strong_aug", 1.5), ("distill_arch", 0),
                                           ("prune_finetune", 1.5), ("prune_finetune", -0.1), ("query_purify", 0),
                                           ("query_purify", -1), ("adversarial_finetune", 0),
                                           ("adversarial_finetune", 2.5)])
def test_bad_strength_is_a_one_line_config_error(name, strength, data):
    enc, card = suspect()
    with pytest.raises(ConfigError, match="strength") as err:
        apply_attack(name, enc, card, strength, data, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value", [("adv_keys", 0), ("adv_steps", 0), ("adv_eps", 0.0), ("adv_eps", 2.0)])
def test_bad_adversarial_options_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        AttackOptions(**{field: value})


@pytest.mark.parametrize("name,strength", [("distill_strong_aug", 1), ("distill_arch", 1), ("prune_finetune", 0.5),
                                           ("query_purify", 0.5), ("adversarial_finetune", 1)])
def test_adaptive_attack_returns_an_encoder_of_the_right_shape(name, strength, data, digits):
    enc, card = suspect()
    out, info = apply_attack(name, enc, card, strength, data, AttackOptions(**FAST), progress=False)
    assert isinstance(out, TransformedEncoder if name == "query_purify" else Encoder) and not out.training
    feats = extract_features(out, digits[0][400:420])
    assert feats.shape == (20, enc.feature_dim) and torch.isfinite(feats).all()
    json.dumps(info)


# ----------------------------------------------------------------------------- what each one claims


def test_distill_arch_student_is_another_architecture(data):
    enc, card = suspect()
    student, info = apply_attack("distill_arch", enc, card, 1, data, AttackOptions(**FAST), progress=False)
    assert isinstance(student.backbone, TinyResNet) and info["arch"] == "tiny_resnet" and info["teacher_arch"] == "tiny"
    assert "rel_weight_change" not in info  # not comparable across architectures
    new_card = attacked_card(card, info, student)
    assert new_card["arch"] == "tiny_resnet" and new_card["attack"]["attack"] == "distill_arch"
    assert new_card["arch_kwargs"] == {"width": 8, "norm": "group"} and new_card["feature_dim"] == enc.feature_dim
    res, res_card = suspect("tiny_resnet")  # a residual suspect is distilled into the plain net
    student, info = apply_attack("distill_arch", res, res_card, 1, data, AttackOptions(**FAST), progress=False)
    assert isinstance(student.backbone, TinyConvNet) and info["arch"] == "tiny"
    _, info = apply_attack("distill_arch", enc, card, 1, data, AttackOptions(**FAST, student_arch="tiny"), progress=False)
    assert info["arch"] == "tiny"  # attack.student_arch wins


def test_distill_strong_aug_trains_on_strong_views(data, digits):
    views = strong_single_view()
    assert (views.n_views, views.crop_scale_min) == (1, 0.2) and min(views.jitter_p, views.grayscale_p, views.blur_p) > 0
    x = torch.rand(200, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # colour images (digits are gray)
    v = make_views(x, views, seed=0, step=0)[0]
    gray = (v[:, 0] == v[:, 1]).flatten(1).all(1) & (v[:, 1] == v[:, 2]).flatten(1).all(1)
    assert 20 < int(gray.sum()) < 60  # grayscale p = 0.2
    teacher, card = suspect(seed=1)
    student, info = apply_attack("distill_strong_aug", teacher, card, 4, data, AttackOptions(batch_size=32),
                                 progress=False)
    assert info["crop_scale_min"] == 0.2 and info["arch"] == "tiny" and info["loss_last"] < info["loss_first"]
    held = digits[0][400:]
    fresh, _ = suspect(seed=2)
    f_t = extract_features(teacher, held)
    before = float(F.cosine_similarity(extract_features(fresh, held), f_t).mean())
    after = float(F.cosine_similarity(extract_features(student, held), f_t).mean())
    assert after > before, (before, after)


def test_prune_finetune_keeps_the_pruned_zeros(data):
    enc, card = suspect()
    pruned, _ = apply_attack("prune_global", enc, card, 0.7, data, progress=False)
    out, info = apply_attack("prune_finetune", enc, card, 0.7, data, AttackOptions(**{**FAST, "epochs": 2}),
                             progress=False)
    layers = lambda e: [m.weight.detach() for m in e.backbone.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # noqa: E731
    total = sum(w.numel() for w in layers(out))
    assert info["sparsity"] == pytest.approx(0.7, abs=1 / total) and info["steps"] == 2 * 4
    for w_ft, w_pruned in zip(layers(out), layers(pruned)):
        assert torch.equal(w_ft == 0, w_pruned == 0)  # the same weights are zero: the masks were kept
        assert not torch.equal(w_ft, w_pruned)  # and the survivors were fine-tuned
    assert set(out.backbone.state_dict()) == set(enc.backbone.state_dict())  # plain state_dict, no masks
    assert info["rel_weight_change"] > 0


def test_adversarial_finetune_weakens_the_pirates_own_perturbations(data, digits):
    enc, card = suspect()
    out, info = apply_attack("adversarial_finetune", enc, card, 3, data, AttackOptions(batch_size=32, adv_steps=10),
                             progress=False)
    assert info["response_after"] < info["response_before"], info
    assert info["steps"] == 3 * 4 and info["keys"] == 4 and info["eps"] == pytest.approx(16 / 255)
    # the same check from outside: a universal perturbation computed on the stolen encoder moves the attacked
    # encoder's embeddings less than the stolen one's
    images = data.unlabeled
    key = choose_key("image", images, 99)[0]
    deltas, _ = generate_deltas(enc, images, key[None], [99], steps=20, step_size=2 / 255, batch_size=64,
                                progress=False)
    held = digits[0][400:]
    assert perturbation_response(out, held, deltas) < perturbation_response(enc, held, deltas)


def test_query_purify_smooths_and_is_recorded(data, digits):
    x = digits[0][:32]
    tv = lambda y: float((y[..., 1:, :] - y[..., :-1, :]).abs().mean() + (y[..., 1:] - y[..., :-1]).abs().mean())  # noqa: E731
    light, heavy = QueryTransform("purify", 0.5)(x), QueryTransform("purify", 1.5)(x)
    assert light.shape == x.shape and 0 <= float(light.min()) and float(light.max()) <= 1
    assert not torch.equal(light, x) and tv(heavy) < tv(light) < tv(x)
    spike = torch.zeros(1, 3, 8, 8)
    spike[..., 4, 4] = 1
    assert float(median3x3(spike).abs().max()) == 0  # an isolated pixel is removed by the median
    enc, card = suspect()
    out, info = apply_attack("query_purify", enc, card, 0.5, data, progress=False)
    assert info["query_transform"] == {"kind": "purify", "strength": 0.5, "seed": 0}
    assert isinstance(out, TransformedEncoder) and out.backbone is not enc.backbone and info["rel_weight_change"] == 0.0
    assert attacked_card(card, info, out)["query_transform"] == info["query_transform"]


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "configs/robustness").glob("*.yaml")))
def test_every_robustness_grid_loads_with_registered_attacks_at_their_grid_strengths(name):
    from dist_awenc.config import load_config
    from dist_awenc.stages.robustness import RobustnessConfig

    cfg = load_config(RobustnessConfig, ROOT / f"configs/robustness/{name}.yaml")
    assert cfg.grid.attacks and set(cfg.grid.attacks) <= set(ATTACKS)
    for attack, strengths in cfg.grid.strengths.items():
        assert attack in cfg.grid.attacks and set(strengths) <= set(ATTACK_STRENGTHS[attack]), (attack, strengths)
