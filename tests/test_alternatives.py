"""The permutation test's reference set: alternative secrets made exactly like the owner's, bound by hash, and the
owner's secret drawn among the J + 1 candidates by a digest of all of them."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import stats

from conftest import tiny_f0_and_secret
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import build_encoder, load_encoder
from dist_awenc.errors import ArtifactError, TamperedSecretError
from dist_awenc.watermark.generate import (alternative_seeds, candidate_seeds, choose_key, control_seed_of, generate_delta,
                                           generate_deltas)
from dist_awenc.watermark.draw import check_owner_draw, distinct_candidates, draw_digest, drawn_index, watermark_cosines
from dist_awenc.watermark.secret import (AlternativeSecrets, Secret, alternatives_path, control_of, load_alternatives,
                                         load_secret, save_alternatives)


def _encoder():
    torch.manual_seed(0)
    return build_encoder("tiny", {"width": 4, "norm": "group"}, [0.5] * 3, [0.5] * 3, 8)


def test_batched_generation_equals_one_secret_at_a_time():
    """K secrets generated together are each what generating it alone gives (same batches, same steps)."""
    enc = _encoder()
    g = torch.Generator().manual_seed(1)
    pool, keys = torch.rand(40, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)
    seeds = [11, 22, 33]
    together, hist = generate_deltas(enc, pool, keys, seeds, steps=4, batch_size=8, progress=False)
    for i, s in enumerate(seeds):
        alone, h = generate_delta(enc, pool, keys[i], steps=4, batch_size=8, seed=s, progress=False)
        torch.testing.assert_close(together[i], alone, atol=1e-6, rtol=0)  # sign steps: equal unless a float tie flips
        assert h == pytest.approx(hist[i], rel=1e-5)
    assert not torch.equal(together[0], together[1])


def test_alternative_seeds_are_distinct_and_never_the_owners():
    for owner in (0, 1, 12345):
        seeds = alternative_seeds(owner, 999)
        assert len(seeds) == len(set(seeds)) == 999 and owner not in seeds
    assert alternative_seeds(0, 5) == alternative_seeds(0, 5)  # reproducible


def test_alternatives_file_is_bound_by_hash(tmp_path):
    g = torch.Generator().manual_seed(2)
    alt = AlternativeSecrets(keys=torch.rand(4, 3, 8, 8, generator=g), deltas=torch.rand(4, 3, 8, 8, generator=g) * 0.06,
                             seeds=[1, 2, 3, 4], control_seeds=[8, 9, 10, 11])
    sha = save_alternatives(alt, tmp_path / "alternatives.safetensors")
    back = load_alternatives(tmp_path / "alternatives.safetensors", expected_sha256=sha)
    assert torch.equal(back.deltas, alt.deltas) and back.seeds == alt.seeds
    torch.testing.assert_close(back.controls()[2], control_of(alt.deltas[2], 10))
    other = AlternativeSecrets(keys=alt.keys, deltas=alt.deltas.flip(0), seeds=[1, 2, 3, 4], control_seeds=[8, 9, 10, 11])
    save_alternatives(other, tmp_path / "alternatives.safetensors")  # replaced after the plan recorded the hash
    with pytest.raises(TamperedSecretError, match="not the plan's"):
        load_alternatives(tmp_path / "alternatives.safetensors", expected_sha256=sha)


# ------------------------------------------------------------------ the owner's draw

J, STEPS, BATCH = 3, 4, 16


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    root, f0, secret_path = tiny_f0_and_secret(tmp_path_factory.mktemp("draw"), f"generation.steps={STEPS}",
                                               f"generation.batch_size={BATCH}", f"plan.alternatives={J}")
    secret = load_secret(secret_path)
    alt = load_alternatives(alternatives_path(secret_path), expected_sha256=secret.plan["alternatives_sha256"])
    enc, _ = load_encoder(f0)
    ds = build_dataset("digits", image_size=8, seed=0)
    pool, _ = ds.get_batch(make_splits(len(ds), 0)["pretrain"])
    return root, f0, secret, alt, enc, pool


def _alone(enc, pool, seed):
    """One secret generated alone with ``seed``: stage 1's procedure (key draw + generate_delta)."""
    key = choose_key("image", pool, seed)[0]
    return key, generate_delta(enc, pool, key, seed=seed, steps=STEPS, batch_size=BATCH, progress=False)[0]


def test_the_owners_secret_is_the_candidate_the_digest_of_all_candidates_draws(drawn):
    _, _, secret, alt, enc, pool = drawn
    draw, seeds = secret.plan["owner_draw"], candidate_seeds(0, J)
    # awenc watermark seals both permutation statistics: the probabilities' and the weights'
    assert (secret.plan["score_statistic"], secret.plan["whitebox_statistic"]) == ("key_tv", "score")
    assert seeds[0] == 0 and seeds[1:] == alternative_seeds(0, J)  # derived from run.seed = 0
    assert (draw["candidates"], draw["run_seed"], draw["seeds"]) == (J + 1, 0, seeds)
    i = draw["index"]
    assert secret.meta["seed"] == seeds[i] and secret.control_seed == control_seed_of(seeds[i])
    assert alt.seeds == seeds[:i] + seeds[i + 1:] and alt.control_seeds == [control_seed_of(s) for s in alt.seeds]
    keys, deltas = [*alt.keys[:i], secret.key, *alt.keys[i:]], [*alt.deltas[:i], secret.delta, *alt.deltas[i:]]
    digest = draw_digest(seeds, keys, deltas)
    assert digest == draw["digest"] and i == int(digest, 16) % (J + 1) == drawn_index(digest, J + 1)
    for s, key, delta in zip(seeds, keys, deltas):  # every candidate, the owner's included, is what its seed gives alone
        k, d = _alone(enc, pool, s)
        assert torch.equal(key, k)
        torch.testing.assert_close(delta, d, atol=1e-6, rtol=0)


def test_the_draw_digest_changes_with_any_one_candidate():
    g = torch.Generator().manual_seed(3)
    seeds, keys, deltas = [5, 6, 7, 8], torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8, generator=g) * 0.06
    base = draw_digest(seeds, keys, deltas)
    assert base == draw_digest(list(seeds), keys.clone(), list(deltas.clone()))  # only the values count
    assert drawn_index(base, 4) == int(base, 16) % 4
    changed = set()
    for j in range(4):
        k, d = keys.clone(), deltas.clone()
        k[j, 1, 2, 3] = torch.nextafter(k[j, 1, 2, 3], torch.tensor(2.0))  # one ulp in one key
        d[j, 2, 7, 0] = torch.nextafter(d[j, 2, 7, 0], torch.tensor(2.0))  # one ulp in one delta
        changed |= {draw_digest(seeds, k, deltas), draw_digest(seeds, keys, d),
                    draw_digest([*seeds[:j], 99, *seeds[j + 1:]], keys, deltas)}
    order = [1, 0, 2, 3]
    changed |= {draw_digest([seeds[o] for o in order], keys[order], deltas[order]), draw_digest(seeds[:3], keys[:3], deltas[:3])}
    assert len(changed) == 14 and base not in changed


def test_the_digest_draws_an_owner_whose_rank_is_uniform_even_among_candidates_that_are_not_alike():
    """The permutation p is exact because the draw is independent of the statistics, whatever the candidates:
    here each candidate's statistic grows with its position among the J + 1 (as it would if one chunk of stage 1 made
    stronger secrets than another), and the owner the product's digest draws still ranks uniformly. A draw that
    favoured any position or any value would fail: 4000 trials, the Monte Carlo standard error of the rate at
    p <= 0.05 is about 0.0034."""
    J, trials = 19, 4000
    g = torch.Generator().manual_seed(5)
    ranks, drawn = [], []
    for t in range(trials):
        seeds = candidate_seeds(t, J)
        keys, deltas = torch.rand(J + 1, 3, 4, 4, generator=g), (torch.rand(J + 1, 3, 4, 4, generator=g) - 0.5) * 0.1
        statistic = deltas.abs().mean((1, 2, 3)) + 0.01 * torch.arange(J + 1)  # the position dominates the values
        i = drawn_index(draw_digest(seeds, keys, deltas), J + 1)
        ranks.append(int((statistic >= statistic[i]).sum()))  # 1 = ranked first, p = rank / (J + 1)
        drawn.append(i)
    assert stats.chisquare(np.bincount(drawn, minlength=J + 1)).pvalue > 1e-3  # every position is drawn alike
    assert stats.chisquare(np.bincount(ranks, minlength=J + 2)[1:]).pvalue > 1e-3  # the owner's rank is uniform
    first = np.mean(np.asarray(ranks) == 1)
    assert abs(first - 1 / (J + 1)) <= 3 * np.sqrt(0.05 * 0.95 / trials), first


def test_check_owner_draw_accepts_the_written_files_and_refuses_a_swapped_candidate(drawn, tmp_path):
    _, _, secret, alt, enc, pool = drawn
    check_owner_draw(secret, alt)
    i, path = secret.plan["owner_draw"]["index"], tmp_path / "alternatives.safetensors"
    outsider = alternative_seeds(0, J + 1)[J]  # a secret of the same procedure that was not a candidate
    key, delta = _alone(enc, pool, outsider)
    j = 1
    for seed in (alt.seeds[j], outsider):  # its tensors under the candidate's seed, or with its own seed
        keys, deltas, seeds = alt.keys.clone(), alt.deltas.clone(), list(alt.seeds)
        keys[j], deltas[j], seeds[j] = key, delta, seed
        save_alternatives(AlternativeSecrets(keys=keys, deltas=deltas, seeds=seeds, control_seeds=alt.control_seeds), path)
        with pytest.raises(TamperedSecretError, match="owner draw"):
            check_owner_draw(secret, load_alternatives(path))
    order = [1, 0, *range(2, J)]  # two alternatives in each other's place
    with pytest.raises(TamperedSecretError, match="owner draw"):
        check_owner_draw(secret, AlternativeSecrets(keys=alt.keys[order], deltas=alt.deltas[order],
                                                    seeds=[alt.seeds[o] for o in order], control_seeds=alt.control_seeds))
    # the owner claiming another candidate as theirs, or a candidate dropped
    other = Secret(key=alt.keys[0], delta=alt.deltas[0], eps=secret.eps, control_seed=alt.control_seeds[0],
                   meta={**secret.meta, "seed": alt.seeds[0]}, plan=secret.plan)
    owner_as_alt = AlternativeSecrets(keys=torch.cat([secret.key[None], alt.keys[1:]]),
                                      deltas=torch.cat([secret.delta[None], alt.deltas[1:]]),
                                      seeds=[secret.meta["seed"], *alt.seeds[1:]], control_seeds=alt.control_seeds)
    for s, a in ((other, owner_as_alt), (secret, AlternativeSecrets(alt.keys[1:], alt.deltas[1:], alt.seeds[1:],
                                                                    alt.control_seeds[1:]))):
        with pytest.raises(TamperedSecretError, match="owner draw"):
            check_owner_draw(s, a)
    # a plan with alternatives but no draw (a secret made before draws) is refused; a plan without alternatives passes
    undrawn = {k: v for k, v in secret.plan.items() if k != "owner_draw"}
    with pytest.raises(ArtifactError, match="no owner draw"):
        check_owner_draw(Secret(key=secret.key, delta=secret.delta, eps=secret.eps, control_seed=1, plan=undrawn), alt)
    check_owner_draw(Secret(key=secret.key, delta=secret.delta, eps=secret.eps, control_seed=1,
                            plan={**undrawn, "alternatives": 0}), None)


def test_without_alternatives_there_is_no_draw_and_the_secret_is_run_seeds(drawn, tmp_path):
    from accelerate.state import AcceleratorState

    from dist_awenc.config import WatermarkConfig, load_config
    from dist_awenc.watermark.generate import watermark

    _, f0, _, _, enc, pool = drawn
    AcceleratorState._reset_state(reset_partial_state=True)
    secret = load_secret(watermark(load_config(WatermarkConfig, None, [
        f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={f0}", "data.image_size=8", "run.seed=5",
        f"generation.steps={STEPS}", f"generation.batch_size={BATCH}", "plan.alternatives=0"])))
    assert "owner_draw" not in secret.plan and secret.meta["seed"] == 5 and secret.control_seed == control_seed_of(5)
    torch.testing.assert_close(secret.delta, _alone(enc, pool, 5)[1], atol=1e-6, rtol=0)
    check_owner_draw(secret, None)


# ------------------------------------------------------------------ the twin rule (plan.twin_cosine)


def test_the_twin_rule_keeps_candidates_in_order_unless_one_kept_before_is_nearer_than_the_bound():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    deltas = base.clone()
    deltas[2] = base[0] + 0.1 * base[2]  # a twin of 0 (cosine about 0.99)
    deltas[4] = base[2] + 0.1 * base[4]  # near 2's noise, but 2 is skipped: kept
    deltas[5] = -base[1] + 0.05 * base[5]  # opposite to 1: not a twin
    cos = watermark_cosines(deltas)
    assert cos[0, 2] > 0.95 and cos[1, 5] < -0.95 and torch.allclose(cos.diagonal(), torch.ones(6, dtype=torch.float64))
    assert distinct_candidates(deltas, 0.7, 6) == [0, 1, 3, 4, 5]  # 2 skipped; too few for 6
    assert distinct_candidates(deltas, 0.7, 3) == [0, 1, 3]  # the first 3 kept
    assert distinct_candidates(deltas, 1.0, 6) == list(range(6))  # off: every candidate
    assert distinct_candidates(deltas, float(cos[0, 2]), 6) == list(range(6))  # a cosine at the bound is kept


def test_with_the_twin_rule_the_drawn_owner_still_ranks_uniformly():
    """The twin rule decides which candidates exist, the digest of the final set which one is the owner's: the
    owner's rank under H0 stays uniform even for a statistic tied to the watermarks' geometry (here the first pixel,
    on 6-pixel watermarks where about 15% of pairs are twins at 0.7, so most sets skip several). 2000 sets."""
    J, trials = 19, 2000
    g = torch.Generator().manual_seed(8)
    ranks, skipped = [], 0
    for t in range(trials):
        stream = torch.randn(3 * (J + 1), 6, 1, 1, generator=g, dtype=torch.float64)
        kept = distinct_candidates(stream, 0.7, J + 1)
        assert len(kept) == J + 1
        deltas, seeds = stream[kept], [t * 1000 + k for k in kept]
        skipped += kept[-1] + 1 - (J + 1)
        statistic = deltas[:, 0, 0, 0]
        i = drawn_index(draw_digest(seeds, torch.zeros(J + 1, 1), deltas), J + 1)
        ranks.append(int((statistic >= statistic[i]).sum()))
    assert skipped / trials > 3  # the rule did skip candidates
    assert stats.chisquare(np.bincount(ranks, minlength=J + 2)[1:]).pvalue > 1e-3
    assert abs(np.mean(np.asarray(ranks) == 1) - 1 / (J + 1)) <= 3 * np.sqrt(0.05 * 0.95 / trials)


@pytest.fixture(scope="module")
def twin_ruled(drawn, tmp_path_factory):
    """Stage 1 with the twin rule at a bound just below the closest pair of the first J + 1 candidates (the drawn
    fixture's, same run seed): at least one candidate is skipped."""
    from accelerate.state import AcceleratorState

    from dist_awenc.config import WatermarkConfig, load_config
    from dist_awenc.watermark.generate import watermark

    _, f0, secret, alt, enc, pool = drawn
    i = secret.plan["owner_draw"]["index"]
    cos = watermark_cosines(torch.cat([alt.deltas[:i], secret.delta[None], alt.deltas[i:]])).fill_diagonal_(-1)
    bound = float(cos.max()) - 1e-3
    AcceleratorState._reset_state(reset_partial_state=True)
    path = watermark(load_config(WatermarkConfig, None, [
        f"run.out_dir={tmp_path_factory.mktemp('twins')}", "run.name=wm", f"encoder={f0}", "data.image_size=8",
        f"generation.steps={STEPS}", f"generation.batch_size={BATCH}", f"plan.alternatives={J}",
        f"plan.twin_cosine={bound}"]))
    twin_secret = load_secret(path)
    return twin_secret, load_alternatives(alternatives_path(path)), bound, enc, pool


def test_stage_1_skips_twins_records_them_and_the_draw_still_checks(twin_ruled):
    secret, alt, bound, enc, pool = twin_ruled
    draw = secret.plan["owner_draw"]
    skipped, i = draw["skipped"], draw["index"]
    assert draw["twin_cosine"] == bound and len(skipped) >= 1 and "less the skipped seeds" in draw["seed_rule"]
    stream = candidate_seeds(0, J + len(skipped))
    seeds = [s for s in stream if s not in skipped]
    assert draw["seeds"] == seeds and set(skipped) < set(stream) and stream[-1] not in skipped
    assert secret.meta["seed"] == seeds[i] and alt.seeds == seeds[:i] + seeds[i + 1:]
    deltas = torch.cat([alt.deltas[:i], secret.delta[None], alt.deltas[i:]])
    assert float(watermark_cosines(deltas).fill_diagonal_(-1).max()) <= bound  # no twins left
    check_owner_draw(secret, alt)
    for s in skipped:  # each skipped candidate, made alone from its seed, is a twin of one kept before it
        d = _alone(enc, pool, s)[1]
        earlier = [j for j, kept in enumerate(seeds) if stream.index(kept) < stream.index(s)]
        assert float(watermark_cosines(torch.cat([d[None], deltas[earlier]]))[0, 1:].max()) > bound


def test_the_draw_check_refuses_a_twin_rule_record_that_does_not_hold(twin_ruled):
    secret, alt, bound, _, _ = twin_ruled
    draw, i = secret.plan["owner_draw"], secret.plan["owner_draw"]["index"]
    closest = float(watermark_cosines(torch.cat([alt.deltas[:i], secret.delta[None], alt.deltas[i:]]))
                    .fill_diagonal_(-1).max())

    def check(**changes):
        plan = {**secret.plan, "owner_draw": {k: v for k, v in {**draw, **changes}.items() if v is not None}}
        check_owner_draw(dataclasses.replace(secret, plan=plan), alt)

    with pytest.raises(TamperedSecretError, match="above the plan's twin bound"):
        check(twin_cosine=closest - 1e-3)  # a bound the kept candidates do not meet
    with pytest.raises(TamperedSecretError, match="no twin bound"):
        check(twin_cosine=None)  # seeds skipped without a rule to skip them
    with pytest.raises(TamperedSecretError, match="skipped as twins"):
        check(skipped=draw["skipped"][1:] + [candidate_seeds(0, 3 * J)[3 * J]])  # another seed claimed skipped
    with pytest.raises(TamperedSecretError, match="candidate seeds"):
        check(skipped=None, twin_cosine=None)  # the plain rule: the seeds are not the stream's first J + 1
    with pytest.raises(TamperedSecretError, match="more than stage 1 ever skips"):
        check(skipped=list(range(10**6)))  # refused before a stream that long is derived


def test_the_twin_rule_gives_up_with_a_clear_error_and_refuses_a_bound_outside_0_1(drawn, tmp_path):
    from accelerate.state import AcceleratorState

    from dist_awenc.config import WatermarkConfig, load_config
    from dist_awenc.errors import ConfigError
    from dist_awenc.watermark.generate import watermark

    f0 = drawn[1]
    args = [f"run.out_dir={tmp_path}", "run.name=wm", f"encoder={f0}", "data.image_size=8", f"generation.steps={STEPS}",
            f"generation.batch_size={BATCH}", f"plan.alternatives={J}"]
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match=r"plan.twin_cosine must be in \(0, 1\]"):
            watermark(load_config(WatermarkConfig, None, [*args, f"plan.twin_cosine={bad}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ArtifactError, match=r"plan.twin_cosine=1e-09: 12 candidates made and only \d of the 4 needed"):
        watermark(load_config(WatermarkConfig, None, [*args, "plan.twin_cosine=1e-9", "run.name=strict"]))
    assert not (tmp_path / "strict" / "secret.safetensors").exists()


def test_candidates_resume_from_their_chunks_and_never_from_another_seeds_chunk(tmp_path, monkeypatch):
    from dist_awenc.config import GenerationSection
    from dist_awenc.watermark import generate

    enc, g = _encoder(), GenerationSection(steps=2, batch_size=8)
    pool = torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    first = generate.generate_candidates(enc, pool, g, [1, 2, 3], tmp_path, chunk=2, transform=None)
    assert first.key_sources[0].startswith("image:") and len(first.history) == 3 and len(first.history[2]) == 2

    def refuse(*a, **k):
        raise AssertionError("regenerated a finished chunk")

    with monkeypatch.context() as m:
        m.setattr(generate, "generate_deltas", refuse)
        again = generate.generate_candidates(enc, pool, g, [1, 2, 3], tmp_path, chunk=2, transform=None)
    assert torch.equal(again.keys, first.keys) and torch.equal(again.deltas, first.deltas)
    assert (again.history, again.key_sources, again.seeds) == (first.history, first.key_sources, first.seeds)
    other = generate.generate_candidates(enc, pool, g, [1, 2, 4], tmp_path, chunk=2, transform=None)  # chunk 2 redone
    assert torch.equal(other.deltas[:2], first.deltas[:2]) and not torch.equal(other.deltas[2], first.deltas[2])


def test_f0_baselines_are_recorded_and_a_plan_sealing_f0_excess_ranks_the_excess_over_them(drawn):
    """Stage 1 records the clean f0's mean white-box score with every candidate on the plan's hold-out images; under a
    plan sealing ``f0_excess`` (every plan made before 2026-12-07) the permutation test ranks each secret's score minus
    that baseline, so on f0 itself every statistic is 0 and the owner ties with all J (p = 1), and the file
    round-trips the baselines under its hash. A plan sealing ``score`` (the default) ranks the score itself."""
    from dist_awenc.verify.permutation import verify_permutation, whitebox_statistics

    _, _, made, alt, enc, _ = drawn
    secret = dataclasses.replace(made, plan={**made.plan, "whitebox_statistic": "f0_excess"})
    ds = build_dataset("digits", image_size=8, seed=0)
    n = secret.plan["n"]["whitebox"]
    assert alt.baseline_images == n and alt.baselines.shape == (J,)
    x, _ = ds.get_batch(make_splits(len(ds), 0)["holdout"][:n])
    want = whitebox_statistics(enc, alt.keys, alt.deltas, alt.controls(), x)
    torch.testing.assert_close(alt.baselines, torch.from_numpy(want), atol=1e-6, rtol=0)
    own = whitebox_statistics(enc, secret.key[None], secret.delta[None], secret.control()[None], x)[0]
    assert alt.owner_baseline == pytest.approx(float(own), abs=1e-6)
    v = verify_permutation(enc, secret, alt, x)
    assert v.p_value == 1.0 and abs(v.details["owner_statistic"]) < 1e-6 and "minus the clean f0's" in v.details["statistic"]
    # another suspect: the same ranking as the plain statistic shifted by each secret's baseline
    torch.manual_seed(5)
    other = build_encoder("tiny", {"width": 4, "norm": "group"}, [0.5] * 3, [0.5] * 3, 8)
    v = verify_permutation(other, secret, alt, x)
    t_owner = whitebox_statistics(other, secret.key[None], secret.delta[None], secret.control()[None], x)[0]
    t_alt = whitebox_statistics(other, alt.keys, alt.deltas, alt.controls(), x)
    s_owner, s_alt = t_owner - alt.owner_baseline, t_alt - alt.baselines.numpy()
    assert v.p_value == pytest.approx((1 + (s_alt >= s_owner).sum()) / (J + 1))
    assert v.effect == pytest.approx(float(t_owner))  # the effect stays the plain mean score
    # the default plan: the same suspect ranked by its scores alone, whatever f0's baselines
    v = verify_permutation(other, made, alt, x)
    assert v.p_value == pytest.approx((1 + (t_alt >= t_owner).sum()) / (J + 1)) and v.details["statistic"].startswith("score: ")
    assert v.details["owner_statistic"] == pytest.approx(float(t_owner))
