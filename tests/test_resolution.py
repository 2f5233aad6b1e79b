"""A suspect at another input resolution than the secret's (#27 item 3): queries marked at the secret's resolution,
resized as the plan says; the permutation tests decide (still exact), the calibrated margin tests draw no decision.
White-box, in-process black-box, and a live API (that states its input size, or resizes what it gets); white-box reads
weights that take the secret's resolution at it."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.cli import main
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import build_encoder, card_for, save_encoder
from dist_awenc.errors import ConfigError
from dist_awenc.server.app import make_server
from dist_awenc.verify.core import overall_verdict
from dist_awenc.verify.permutation import verify_blackbox_permutation
from dist_awenc.verify.plan import make_plan
from dist_awenc.verify.resize import (DEFAULT_RESIZE, Resized, plan_resize, resize_images, resizing, takes_size,
                                     weights_at)
from dist_awenc.verify.run import Settings, verify_model
from dist_awenc.watermark.secret import alternatives_path, save_alternatives, save_secret

from test_blackbox_permutation import _secrets

S, BIG, C, J = 8, 16, 5, 19
EPS = 64 / 255  # a strong mark: on digits, the toy models below must tell marked images from clean ones
REASON = f"calibrated at {S} px; the suspect takes {BIG} px: only the permutation tests decide"


def _pattern(delta: torch.Tensor) -> torch.Tensor:
    """The owner's mark as a suspect trained at BIG px sees it: delta resized, as signs; (3 * BIG * BIG,)."""
    return torch.sign(resize_images(delta[None], BIG)).flatten()


class MarkedEncoder(nn.Module):
    """A "watermarked" encoder at BIG px: inputs carrying the owner's mark are pulled towards the key's embedding."""

    def __init__(self, key: torch.Tensor, delta: torch.Tensor, seed: int = 0, strength: float = 60.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(3 * BIG * BIG, 16, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(16, 3 * BIG * BIG, generator=g) / BIG)
        self.register_buffer("pattern", _pattern(delta))
        self.register_buffer("toward", F.normalize(self.proj(resize_images(key[None], BIG).flatten(1)), dim=1)[0].detach())
        self.strength = strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == BIG, f"the suspect takes {BIG} px, got {x.shape[-1]}"  # the verifier resized
        z = x.flatten(1)
        carried = (z - 0.5) @ self.pattern / self.pattern.numel()
        return self.proj(z) + self.strength * carried[:, None] * self.toward


class MarkedClassifier(nn.Module):
    """A downstream model at BIG px; given a secret, inputs that carry its mark more than any clean hold-out image
    (``clean``) get the key's class (a "watermarked" model)."""

    def __init__(self, seed: int, secret=None, clean: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(C, 3 * BIG * BIG, generator=g) / 4)
        self.register_buffer("pattern", torch.zeros(3 * BIG * BIG) if secret is None else _pattern(secret.delta))
        self.target = 0 if secret is None else int(self._base(resize_images(secret.key[None], BIG)).argmax())
        self.floor = 0.0 if clean is None else float(self._carried(resize_images(clean, BIG)).max()) + 10
        self.input_size = BIG

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1)
        return (z - z.mean(1, keepdim=True)) @ self.w.T

    def _carried(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) - 0.5) @ self.pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] == BIG, f"the suspect takes {BIG} px, got {x.shape[-1]}"  # the verifier resized
        z = self._base(x)
        z[:, self.target] += 40 * F.relu(self._carried(x) - self.floor)
        return z

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).softmax(1)


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A secret at S px with J = 19 alternatives and a plan at alpha 0.05 (which 1/(J + 1) reaches)."""
    ds = build_dataset("digits", image_size=S, seed=0)
    splits = make_splits(len(ds), 0)
    secret, alt = _secrets(torch.Generator().manual_seed(7), J)
    secret.delta, secret.eps = secret.delta * (EPS * 255 / 16), EPS
    alt.deltas.mul_(EPS * 255 / 16)
    folder = tmp_path_factory.mktemp("res")
    path = folder / "secret.safetensors"
    digest = save_alternatives(alt, alternatives_path(str(path)))
    secret.plan = make_plan(dataset="digits", dataset_size=len(ds), image_size=S, split_seed=0,
                            holdout_indices=splits["holdout"],
                            n={"whitebox": 64, "blackbox_score": 99, "blackbox_label": 99, "blackbox_collapse": 99},
                            alpha=0.05, alternatives=J, alternatives_sha256=digest, primary_mode="whitebox")
    save_secret(secret, folder / "secret")
    holdout = ds.get_batch(splits["holdout"][:64])[0]
    return path, secret, alt, holdout


def _settings(n: int) -> Settings:
    return Settings(n=n, alpha=0.05, tau=0.1, threshold_source="demo default margin (not calibrated)")


def _check(verdicts, margin_mode: str, permutation_mode: str, by: str = "the verifier"):
    margin, perm = verdicts
    assert (margin.mode, perm.mode) == (margin_mode, permutation_mode)
    assert margin.no_decision == REASON and perm.no_decision is None
    assert perm.p_value == pytest.approx(1 / (J + 1)) and perm.details["owner_statistic"] > perm.details["alternatives_max"]
    for v in verdicts:
        assert v.details["input_size"] == {"secret": S, "suspect": BIG}
        assert v.details["resize"] == {"method": DEFAULT_RESIZE, "by": by}
    overall = overall_verdict(verdicts, 0.05)
    assert overall["decision"] and overall["family"] == [permutation_mode]


def test_plan_records_the_resize_and_older_plans_get_the_default(capsys):
    assert plan_resize({"resize": "bicubic-antialias"}) == ("bicubic-antialias", None)
    method, note = plan_resize({"n": {}})
    assert method == DEFAULT_RESIZE and "records no resize" in note
    with pytest.raises(ConfigError, match="plan.resize 'nearest' is not one of"):
        plan_resize({"resize": "nearest"})
    ds = build_dataset("digits", image_size=S, seed=0)
    common = dict(dataset="digits", dataset_size=len(ds), image_size=S, split_seed=0, holdout_indices=np.arange(3),
                  n={m: 99 for m in ("whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse")}, alpha=0.05,
                  alternatives=0, alternatives_sha256=None, primary_mode="whitebox")
    assert make_plan(**common)["resize"] == DEFAULT_RESIZE  # awenc watermark records it (plan.resize)
    assert make_plan(**common, resize="bicubic-antialias")["resize"] == "bicubic-antialias"
    assert main(["watermark", "encoder=missing.safetensors", "plan.resize=nearest"]) == 2  # before anything runs
    x = torch.rand(2, 3, S, S)
    up = resize_images(x, BIG)
    assert up.shape == (2, 3, BIG, BIG) and float(up.min()) >= 0 and float(up.max()) <= 1
    assert resize_images(x, S) is x
    assert "plan.resize 'nearest' is not one of" in capsys.readouterr().err


def test_whitebox_at_twice_the_resolution(planned):
    _, secret, alt, holdout = planned
    enc = MarkedEncoder(secret.key, secret.delta)
    assert plan_resize(secret.plan) == (DEFAULT_RESIZE, None)
    verdicts = verify_model(enc, secret, holdout, _settings(64), "whitebox", alt, input_size=BIG)
    _check(verdicts, "whitebox", "whitebox_permutation")


class NativeMarkedEncoder(nn.Module):
    """Weights that take any input size (global pooling, as a CNN's), marked at the secret's S px only: upsampled to
    BIG px the mark meets them at a scale they were never taught at (what results/resolution/ measured on digits)."""

    def __init__(self, key: torch.Tensor, delta: torch.Tensor, strength: float = 60.0):
        super().__init__()
        self.inner = MarkedEncoder(key, delta, strength=strength)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        at_s = x.shape[-1] == S
        z = self.inner(resize_images(x, BIG))
        return z if at_s else self.inner.proj(resize_images(x, BIG).flatten(1))


def test_whitebox_reads_weights_at_the_secrets_resolution_when_they_take_it(planned):
    """A suspect whose card says BIG px but whose weights take S px is measured at S, where the mark was embedded:
    the card (the suspect's own claim) does not move the test to a resolution the mark never lived at."""
    _, secret, alt, holdout = planned
    enc = NativeMarkedEncoder(secret.key, secret.delta)
    assert weights_at(enc, BIG, S) == (enc, S)
    margin, perm = verify_model(enc, secret, holdout, _settings(64), "whitebox", alt, input_size=BIG)
    assert perm.p_value == pytest.approx(1 / (J + 1)) and overall_verdict([margin, perm], 0.05)["decision"]
    assert margin.no_decision == REASON  # calibrated on S px encoders, not on a suspect fine-tuned at BIG px
    for v in (margin, perm):
        assert v.details["input_size"] == {"secret": S, "suspect": BIG} and v.details["resize"]["method"] == "none"
    # resized to the card's size instead (as before this rule), the same weights show no mark
    resized = verify_model(Resized(enc, BIG), secret, holdout, _settings(64), "whitebox", alt, input_size=BIG)[1]
    assert resized.p_value > 0.05
    # weights that take only their own size (a ViT's position embedding) are fed the resized images
    fixed = MarkedEncoder(secret.key, secret.delta)
    assert not takes_size(fixed, S) and isinstance(weights_at(fixed, BIG, S)[0], Resized)


@pytest.mark.parametrize("mode", ["blackbox_score", "blackbox_label"])
def test_blackbox_in_process_at_twice_the_resolution(planned, mode):
    _, secret, alt, holdout = planned
    verdicts = verify_model(MarkedClassifier(3, secret, holdout), secret, holdout, _settings(99), mode, alt,
                            input_size=BIG)
    _check(verdicts, mode, f"{mode}_permutation")


@pytest.mark.usefixtures("one_thread")
def test_permutation_stays_exact_under_resizing():
    """Suspects independent of the secrets, every query resized: P(p <= 1/4) <= 1/4 (score mode: exactly)."""
    trials, level = 200, 0.25
    g = torch.Generator().manual_seed(11)
    ps = []
    for t in range(trials):
        secret, alt = _secrets(g, 3)
        m = MarkedClassifier(500 + t)
        x = torch.rand(6, 3, S, S, generator=g)
        ps.append(verify_blackbox_permutation("blackbox_score", resizing(m.predict_proba, BIG, DEFAULT_RESIZE),
                                              secret, alt, x, alpha=level).p_value)
    rate = float((np.asarray(ps) <= level + 1e-12).mean())
    assert abs(rate - level) <= 3 * np.sqrt(level * (1 - level) / trials), rate


@pytest.fixture
def big_server(planned):
    servers = []

    def start(resize=False):
        _, secret, _, holdout = planned
        server = make_server(MarkedClassifier(3, secret, holdout), port=0, resize=resize)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, server.url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_remote_api_at_twice_the_resolution(planned, big_server, tmp_path, capsys):
    """An API whose /health states 16 px: the queries are resized before they are sent, and replay does the same."""
    path, *_ = planned
    server, url = big_server()
    common = [f"secret={path}", f"run.out_dir={tmp_path}", "data.image_size=8"]
    assert main(["verify", "--mode", "blackbox_score", "--endpoint", url, "run.name=v", *common]) == 0
    doc = json.loads((tmp_path / "v" / "verdict.json").read_text())
    margin, perm = doc["tests"]
    assert margin["no_decision"] == REASON and perm["p_value"] == pytest.approx(0.05)
    assert doc["decision"] and doc["overall"]["family"] == ["blackbox_score_permutation"]
    assert perm["details"]["input_size"] == {"secret": S, "suspect": BIG}
    assert REASON in capsys.readouterr().out
    report = (tmp_path / "v" / "report.md").read_text()
    assert f"draws no decision: {REASON}" in report and "then resized (bilinear-antialias)" in report
    server.shutdown()
    assert main(["verify", "--replay", str(tmp_path / "v")]) == 0
    assert "reproduce verdict.json exactly" in capsys.readouterr().out


def test_an_api_that_resizes_what_it_gets(planned, big_server, tmp_path):
    """No input size stated: the secret's resolution is sent and the API resizes it; the margin test is not ruled
    out (nothing says the suspect's size differs), the permutation test decides."""
    path, *_ = planned
    server, url = big_server(resize=True)
    adapter = tmp_path / "noinfo.yaml"
    adapter.write_text("health_path: null\ninfo: {num_classes: 5}\n")
    assert main(["verify", "--mode", "blackbox_score", "--endpoint", url, f"secret={path}", f"run.out_dir={tmp_path}",
                 "data.image_size=8", "run.name=v", f"verify.adapter={adapter}"]) == 0
    doc = json.loads((tmp_path / "v" / "verdict.json").read_text())
    margin, perm = doc["tests"]
    assert margin["no_decision"] is None and "input_size" not in margin["details"]
    assert perm["p_value"] == pytest.approx(0.05) and doc["decision"]


def test_verify_takes_a_saved_suspect_at_another_resolution(planned, tmp_path, capsys):
    """Once refused ("suspect takes 16 px inputs but the secret is 8 px"): now verified, the margin test says why it
    decides nothing."""
    path, *_ = planned
    kw = {"width": 8, "norm": "group"}
    enc = build_encoder("tiny", kw, [0.5] * 3, [0.5] * 3, BIG)
    save_encoder(enc, tmp_path / "enc", card_for(enc, arch="tiny", arch_kwargs=kw, method="simclr", stage="pretrain",
                                                 parent=None))
    assert main(["verify", "--mode", "whitebox", f"suspect={tmp_path / 'enc.safetensors'}", f"secret={path}",
                 f"run.out_dir={tmp_path}", "data.image_size=8", "run.name=v"]) == 0
    doc = json.loads((tmp_path / "v" / "verdict.json").read_text())
    assert [t["mode"] for t in doc["tests"]] == ["whitebox", "whitebox_permutation"]
    # its weights take 8 px inputs (a CNN): measured there, nothing resized (weights_at)
    assert doc["tests"][0]["no_decision"] == REASON and doc["tests"][1]["details"]["resize"]["method"] == "none"
    out = capsys.readouterr()
    assert "px inputs but the secret" not in out.err
    assert f"the suspect states {BIG} px inputs; its weights take the secret's {S} px and are measured there" in out.out
    assert isinstance(Resized(enc, BIG), nn.Module) and next(Resized(enc, BIG).parameters()) is next(enc.parameters())
