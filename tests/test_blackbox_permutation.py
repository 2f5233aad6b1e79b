"""The black-box secret-permutation tests (#26 item 5): exact under H0, the queries they cost counted before anything
is sent, run within verify.permutation_queries on a live API and reproduced by the evidence bundle's replay."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_awenc.cli import main
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.verify.plan import make_plan
from dist_awenc.verify.permutation import (LABEL_PERMUTATION, SCORE_PERMUTATION, permutation_queries,
                                           verify_blackbox_permutation)
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, alternatives_path, save_alternatives, save_secret
from test_bundle import _verify, model, serve  # noqa: F401  (the bundle tests' served model and its fixtures)

S, C = 8, 5


def _secrets(g: torch.Generator, j: int) -> tuple[Secret, AlternativeSecrets]:
    """J + 1 secrets drawn i.i.d.; the owner's is one of them at random (as stage 1's draw makes it)."""
    keys = torch.rand(j + 1, 3, S, S, generator=g)
    deltas = (16 / 255) * torch.sign(torch.randn(j + 1, 3, S, S, generator=g))
    seeds = torch.randint(0, 2**31, (j + 1,), generator=g).tolist()
    i = int(torch.randint(0, j + 1, (1,), generator=g))
    rest = [x for x in range(j + 1) if x != i]
    secret = Secret(key=keys[i], delta=deltas[i], eps=16 / 255, control_seed=seeds[i])
    return secret, AlternativeSecrets(keys=keys[rest], deltas=deltas[rest], seeds=[seeds[x] for x in rest],
                                      control_seeds=[seeds[x] for x in rest])


class Linear:
    """A fixed random linear classifier on 8 px images, independent of every secret; counts the images it answers."""

    def __init__(self, seed: int, towards: torch.Tensor | None = None):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(C, 3 * S * S, generator=g)
        self.towards, self.asked = towards, 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.asked += len(x)
        z = x.flatten(1) @ self.w.T
        if self.towards is not None:  # a "watermarked" model: class 0 wherever the owner's delta pattern is present
            z[:, 0] += 40 * (x.flatten(1) - 0.5) @ torch.sign(self.towards.flatten())
        return z

    def proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(1)

    def label(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


@pytest.mark.parametrize("mode", ["blackbox_score", "blackbox_label"])
def test_the_queries_sent_are_the_ones_counted_before(mode):
    g = torch.Generator().manual_seed(0)
    secret, alt = _secrets(g, 3)
    m = Linear(1)
    x = torch.rand(7, 3, S, S, generator=g)
    v = verify_blackbox_permutation(mode, m.proba if mode == "blackbox_score" else m.label, secret, alt, x, alpha=0.25)
    assert m.asked == permutation_queries(mode, 7, 3) == v.details["queries"]
    assert v.mode == {"blackbox_score": SCORE_PERMUTATION, "blackbox_label": LABEL_PERMUTATION}[mode]
    assert v.p_floor == 0.25 and v.threshold is None


@pytest.mark.parametrize("mode", ["blackbox_score", "blackbox_label"])
def test_size_under_h0_is_at_most_its_level(mode):
    """Suspects independent of the secrets: P(p <= k/(J+1)) <= k/(J+1) for each k (exact; labels tie, so <=).
    400 trials: the Monte Carlo standard error of a rate near 0.25 is about 0.022."""
    J, trials = 3, 400
    g = torch.Generator().manual_seed(1)
    ps = []
    for t in range(trials):
        secret, alt = _secrets(g, J)
        m = Linear(1000 + t)
        x = torch.rand(6, 3, S, S, generator=g)
        ps.append(verify_blackbox_permutation(mode, m.proba if mode == "blackbox_score" else m.label, secret, alt, x,
                                              alpha=0.25).p_value)
    ps = np.asarray(ps)
    for k in (1, 2, 3):
        level = k / (J + 1)
        se = np.sqrt(level * (1 - level) / trials)
        assert (ps <= level + 1e-12).mean() <= level + 3 * se, (k, (ps <= level + 1e-12).mean())
    if mode == "blackbox_score":  # continuous statistics: exact, not merely conservative
        assert abs((ps <= 0.25 + 1e-12).mean() - 0.25) <= 3 * np.sqrt(0.25 * 0.75 / trials)


@pytest.mark.parametrize("mode", ["blackbox_score", "blackbox_label"])
def test_a_model_that_carries_the_owners_mark_ranks_it_first(mode):
    g = torch.Generator().manual_seed(2)
    secret, alt = _secrets(g, 9)
    m = Linear(3, towards=secret.delta)
    x = torch.rand(20, 3, S, S, generator=g)
    v = verify_blackbox_permutation(mode, m.proba if mode == "blackbox_score" else m.label, secret, alt, x, alpha=0.1)
    assert v.p_value == pytest.approx(0.1) and v.details["at_resolution_limit"]
    assert v.details["owner_statistic"] > v.details["alternatives_max"]


@pytest.fixture(scope="module")
def planned_secret(tmp_path_factory):
    """The bundle tests' secret, with a plan naming J = 3 alternatives bound by hash."""
    ds = build_dataset("digits", image_size=S, seed=0)
    splits = make_splits(len(ds), 0)
    g = torch.Generator().manual_seed(4)
    secret, alt = _secrets(g, 3)
    folder = tmp_path_factory.mktemp("perm")
    path = folder / "secret"
    digest = save_alternatives(alt, alternatives_path(str(path.with_suffix(".safetensors"))))
    secret.plan = make_plan(dataset="digits", dataset_size=len(ds), image_size=S, split_seed=0,
                            holdout_indices=splits["holdout"],
                            n={"whitebox": 256, "blackbox_score": 99, "blackbox_label": 99, "blackbox_collapse": 99},
                            alpha=0.25, alternatives=3, alternatives_sha256=digest, primary_mode="blackbox_score")
    save_secret(secret, path)
    return path.with_suffix(".safetensors")


@pytest.mark.parametrize("mode,images,name", [("blackbox_score", 33, SCORE_PERMUTATION),
                                               ("blackbox_label", 49, LABEL_PERMUTATION)])
def test_a_live_api_gets_the_permutation_test_within_its_budget_and_replay_reproduces_it(serve, planned_secret, tmp_path,
                                                                                        capsys, mode, images, name):
    server, url = serve(labels_only=mode == "blackbox_label")
    assert _verify(url, planned_secret, tmp_path, "v", mode) == 0
    doc = json.loads((tmp_path / "v" / "verdict.json").read_text())
    assert [t["mode"] for t in doc["tests"]] == [mode, name]
    perm = doc["tests"][1]
    # e.g. score: 297 asked, of which the margin test's 99 are answered by the query log, not sent again
    need, new = (permutation_queries(mode, images, 3, beside_margin_test=b) for b in (False, True))
    assert perm["details"]["queries"] == need and server.images_served == 99 + new < 99 + need
    assert perm["p_floor"] == 0.25 and name in doc["overall"]["family"]
    assert f"also: {name}" in (tmp_path / "v" / "report.md").read_text()
    server.shutdown()
    capsys.readouterr()
    assert main(["verify", "--replay", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "reproduce verdict.json exactly" in out and name in out


def test_over_the_budget_the_permutation_test_is_not_run_and_says_so(serve, planned_secret, tmp_path, capsys):
    server, url = serve(labels_only=True)
    assert _verify(url, planned_secret, tmp_path, "v", "blackbox_label", "verify.exploratory=true",
                   "verify.permutation_queries=100") == 0
    doc = json.loads((tmp_path / "v" / "verdict.json").read_text())
    assert [t["mode"] for t in doc["tests"]] == ["blackbox_label"] and server.images_served == 99
    need = permutation_queries("blackbox_label", 49, 3, beside_margin_test=True)
    assert need == 3 * 99 and f"{LABEL_PERMUTATION} not run: it needs {need} queries beyond" in \
        capsys.readouterr().err
