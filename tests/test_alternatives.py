"""The permutation test's reference set: alternative secrets made exactly like the owner's, bound by hash."""
from __future__ import annotations

import pytest
import torch

from dist_awenc.encoders.io import build_encoder
from dist_awenc.errors import TamperedSecretError
from dist_awenc.watermark.generate import alternative_seeds, generate_delta, generate_deltas
from dist_awenc.watermark.secret import AlternativeSecrets, control_of, load_alternatives, save_alternatives


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
