"""kNN on the device: the same decisions as scikit-learn's cosine, distance-weighted kNN."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier

from dist_awenc.evaluate.probe import knn_accuracy


def _sklearn(tr, ytr, te, yte, k):
    knn = KNeighborsClassifier(n_neighbors=min(k, len(tr)), metric="cosine", weights="distance")
    knn.fit(F.normalize(tr, dim=1).numpy(), ytr.numpy())
    return float(knn.score(F.normalize(te, dim=1).numpy(), yte.numpy()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 20, 500])
def test_knn_matches_scikit_learn(seed, k):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, 16, generator=g)
    ytr, yte = torch.randint(6, (300,), generator=g), torch.randint(6, (120,), generator=g)
    tr = centers[ytr] + 1.5 * torch.randn(300, 16, generator=g)
    te = centers[yte] + 1.5 * torch.randn(120, 16, generator=g)
    te[:10] = tr[:10] * 3.0  # same direction as a training point: cosine distance 0 takes the whole vote
    assert knn_accuracy(tr, ytr, te, yte, k=k) == _sklearn(tr, ytr, te, yte, k)


def test_knn_is_the_same_in_any_chunk_size():
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randn(200, 8, generator=g), torch.randn(77, 8, generator=g)
    ytr, yte = torch.randint(3, (200,), generator=g), torch.randint(3, (77,), generator=g)
    full = knn_accuracy(tr, ytr, te, yte, k=7)
    assert all(knn_accuracy(tr, ytr, te, yte, k=7, chunk=c) == full for c in (1, 10, 76))
