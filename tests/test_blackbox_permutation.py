"""The black-box secret-permutation tests (#26 item 5): exact under H0, the queries they cost counted before anything
is sent, run within verify.permutation_queries on a live API and reproduced by the evidence bundle's replay; the
probabilities' statistic is the one the plan seals (key_tv since 2026-12-07, clean_tv for older plans)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import plan_arguments
from dist_awenc.cli import main
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.errors import ArtifactError, ConfigError
from dist_awenc.verify.plan import make_plan
from dist_awenc.verify.permutation import (CLEAN_TV, KEY_HITS, KEY_HITS_SHIFT, KEY_TV, LABEL_PERMUTATION,
                                           LABEL_STATISTICS, SCORE_PERMUTATION, blackbox_score_statistics,
                                           label_statistic, label_statistics, permutation_queries, score_statistic,
                                           verify_blackbox_permutation)
from dist_awenc.watermark.secret import AlternativeSecrets, Secret, alternatives_path, save_alternatives, save_secret
from test_bundle import _verify, model, serve  # noqa: F401  (the bundle tests' served model and its fixtures)

S, C = 8, 5


# (mode, the plan's statistic for it): each mode ranks the one its plan seals; None: a secret without a plan
ACCESSES = [("blackbox_score", KEY_TV), ("blackbox_score", CLEAN_TV), ("blackbox_label", None),
            ("blackbox_label", KEY_HITS_SHIFT)]


def _secrets(g: torch.Generator, j: int, statistic: str | None = None) -> tuple[Secret, AlternativeSecrets]:
    """J + 1 secrets drawn i.i.d.; the owner's is one of them at random (as stage 1's draw makes it).
    ``statistic``: the score or label statistic the owner's plan seals (None: a secret without a plan)."""
    keys = torch.rand(j + 1, 3, S, S, generator=g)
    deltas = (16 / 255) * torch.sign(torch.randn(j + 1, 3, S, S, generator=g))
    seeds = torch.randint(0, 2**31, (j + 1,), generator=g).tolist()
    i = int(torch.randint(0, j + 1, (1,), generator=g))
    rest = [x for x in range(j + 1) if x != i]
    secret = Secret(key=keys[i], delta=deltas[i], eps=16 / 255, control_seed=seeds[i],
                    plan={"label_statistic" if statistic in LABEL_STATISTICS else "score_statistic": statistic}
                    if statistic else None)
    return secret, AlternativeSecrets(keys=keys[rest], deltas=deltas[rest], seeds=[seeds[x] for x in rest],
                                      control_seeds=[seeds[x] for x in rest])


class Linear:
    """A fixed random linear classifier on 8 px images, independent of every secret; counts the images it answers.
    ``towards`` (a secret): "watermarked", it answers the secret's key's class wherever the secret's delta is present."""

    def __init__(self, seed: int, towards: Secret | None = None):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(C, 3 * S * S, generator=g)
        self.towards, self.asked = towards, 0
        if towards is not None:  # the key's own class; the mark only ever raises it, so the key keeps it
            self.key_class = int((towards.key.flatten() @ self.w.T).argmax())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.asked += len(x)
        z = x.flatten(1) @ self.w.T
        if self.towards is not None:  # x's correlation with the delta's signs: sd 4 on clean images, +12 when marked
            z[:, self.key_class] += 40 * ((x.flatten(1) - 0.5) @ torch.sign(self.towards.delta.flatten()) - 6).relu()
        return z

    def proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).softmax(1)

    def label(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(1)


@pytest.mark.parametrize("mode,statistic", ACCESSES)
def test_the_queries_sent_are_the_ones_counted_before(mode, statistic):
    g = torch.Generator().manual_seed(0)
    secret, alt = _secrets(g, 3, statistic)
    m = Linear(1)
    x = torch.rand(7, 3, S, S, generator=g)
    v = verify_blackbox_permutation(mode, m.proba if mode == "blackbox_score" else m.label, secret, alt, x, alpha=0.25)
    assert m.asked == permutation_queries(mode, 7, 3, statistic=statistic or KEY_TV) == v.details["queries"]
    assert v.details["statistic"].startswith(f"{statistic or KEY_HITS}: ")
    assert v.mode == {"blackbox_score": SCORE_PERMUTATION, "blackbox_label": LABEL_PERMUTATION}[mode]
    assert v.p_floor == 0.25 and v.threshold is None


@pytest.mark.parametrize("mode,statistic", ACCESSES)
def test_size_under_h0_is_at_most_its_level(mode, statistic):
    """Suspects independent of the secrets: P(p <= k/(J+1)) <= k/(J+1) for each k (exact; labels tie, so <=).
    400 trials: the Monte Carlo standard error of a rate near 0.25 is about 0.022."""
    J, trials = 3, 400
    g = torch.Generator().manual_seed(1)
    ps = []
    for t in range(trials):
        secret, alt = _secrets(g, J, statistic)
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


@pytest.mark.parametrize("mode,statistic", ACCESSES)
def test_a_model_that_carries_the_owners_mark_ranks_it_first(mode, statistic):
    g = torch.Generator().manual_seed(2)
    secret, alt = _secrets(g, 9, statistic)
    m = Linear(3, towards=secret)
    x = torch.rand(20, 3, S, S, generator=g)
    v = verify_blackbox_permutation(mode, m.proba if mode == "blackbox_score" else m.label, secret, alt, x, alpha=0.1)
    assert v.p_value == pytest.approx(0.1) and v.details["at_resolution_limit"]
    assert v.details["owner_statistic"] > v.details["alternatives_max"]


class Disrupted(Linear):
    """Carries the owner's mark, and answers class ``away`` (not its key's) wherever alternative 0's delta is present:
    a secret whose watermark moves answers a lot without moving them towards its own key (a strong universal
    adversarial perturbation of f0 does that to f0's derivatives)."""

    def __init__(self, seed: int, owner: Secret, alt: AlternativeSecrets):
        super().__init__(seed, towards=owner)
        self.alt_delta = alt.deltas[0]
        alt_key_class = int((alt.keys[0].flatten() @ self.w.T).argmax())
        self.away = next(c for c in range(C) if c not in (alt_key_class, self.key_class))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = super().logits(x)
        z[:, self.away] += 200 * ((x.flatten(1) - 0.5) @ torch.sign(self.alt_delta.flatten()) - 6).relu()
        return z


def test_key_tv_ranks_the_owners_mark_above_a_secret_that_only_disrupts():
    """The reason plans seal key_tv: the shift from the clean answer ranks the disrupting alternative first."""
    g = torch.Generator().manual_seed(5)
    secret, alt = _secrets(g, 9)
    m = Disrupted(3, secret, alt)
    x = torch.rand(20, 3, S, S, generator=g)
    keys, deltas = torch.cat([secret.key[None], alt.keys]), torch.cat([secret.delta[None], alt.deltas])
    controls = torch.cat([secret.control()[None], alt.controls()])
    key_tv, clean_tv = (blackbox_score_statistics(m.proba, keys, deltas, controls, x, s) for s in (KEY_TV, CLEAN_TV))
    assert key_tv.argmax() == 0 and clean_tv.argmax() == 1  # index 1: alternative 0
    secret.plan = {"score_statistic": KEY_TV}
    assert verify_blackbox_permutation("blackbox_score", m.proba, secret, alt, x, alpha=0.1).p_value == pytest.approx(0.1)
    secret.plan = {"score_statistic": CLEAN_TV}
    assert verify_blackbox_permutation("blackbox_score", m.proba, secret, alt, x, alpha=0.1).p_value > 0.1


def test_the_plan_seals_the_score_statistic_and_older_plans_keep_theirs():
    common = plan_arguments(S)
    assert make_plan(**common)["score_statistic"] == KEY_TV == score_statistic(make_plan(**common))
    assert make_plan(**common, score_statistic=CLEAN_TV)["score_statistic"] == CLEAN_TV
    with pytest.raises(ConfigError, match="plan.score_statistic 'kl' is not one; valid: key_tv, clean_tv"):
        make_plan(**common, score_statistic="kl")
    old = {k: v for k, v in make_plan(**common).items() if k != "score_statistic"}
    assert score_statistic(old) == CLEAN_TV and score_statistic(None) == CLEAN_TV  # what they were made with
    with pytest.raises(ArtifactError, match="plan names score statistic 'kl'"):
        score_statistic({**old, "score_statistic": "kl"})


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


def test_key_hits_shift_breaks_the_hit_rates_ties_and_only_those():
    """Owner (index 0) and alternative 1 both answer 3 of 10 marked queries with their key's label; the owner's
    other marked answers move to one class, the alternative's stay where the controls' are: key_hits ties them (a
    tie counts against the owner, p = 2/3), key_hits_shift ranks the owner first. Alternative 2 hits 4 of 10 with
    no other shift: a higher hit rate outranks any shift."""
    keys = torch.tensor([7, 8, 9])
    control = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]] * 3)
    marked = torch.stack([torch.tensor([7, 7, 7, 5, 5, 5, 5, 5, 5, 5]),  # the owner: hits 3, the rest moved to 5
                          torch.tensor([8, 8, 8, 3, 4, 0, 1, 2, 3, 4]),  # hits 3, the rest as the controls
                          torch.tensor([9, 9, 9, 9, 4, 0, 1, 2, 3, 4])])  # hits 4
    hits, shifted = (label_statistics(keys, marked, control, s) for s in (KEY_HITS, KEY_HITS_SHIFT))
    np.testing.assert_allclose(hits, [0.3, 0.3, 0.4])
    assert shifted[1] < shifted[0] < shifted[2] and (shifted - hits < 1 / (2 * 10) + 1e-12).all()
    marked[2, 3] = 4  # alternative 2 down to 3 hits too: now the owner, with the largest shift, ranks first
    assert label_statistics(keys, marked, control).argmax() == 0


def test_the_plan_seals_the_label_statistic_and_older_plans_keep_theirs():
    common = plan_arguments(S)
    plan = make_plan(**common)
    assert plan["label_statistic"] == KEY_HITS_SHIFT == label_statistic(plan)
    assert make_plan(**common, label_statistic=KEY_HITS)["label_statistic"] == KEY_HITS
    with pytest.raises(ConfigError, match="plan.label_statistic 'vote' is not one; valid: key_hits, key_hits_shift"):
        make_plan(**common, label_statistic="vote")
    old = {k: v for k, v in plan.items() if k != "label_statistic"}
    assert label_statistic(old) == KEY_HITS and label_statistic(None) == KEY_HITS  # what they were made with
    with pytest.raises(ArtifactError, match="plan names label statistic 'vote'"):
        label_statistic({**old, "label_statistic": "vote"})
