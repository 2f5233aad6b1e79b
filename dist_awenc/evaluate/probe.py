"""Downstream evaluation: features, a linear probe, kNN, and the pirate's downstream model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.neighbors import KNeighborsClassifier
from torch import nn


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Shape: (N, 3, S, S) in [0, 1] -> (N, D) features, in eval mode, on the encoder's device."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [encoder(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    encoder.train(was_training)
    return torch.cat(out)


class DownstreamModel(nn.Module):
    """``g = head o f``: encoder, feature standardisation, linear classifier.

    Shape: (b, 3, S, S) in [0, 1] -> (b, num_classes) logits.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("feat_mean", torch.zeros(feature_dim))
        self.register_buffer("feat_std", torch.ones(feature_dim))
        self.head = nn.Linear(feature_dim, num_classes)

    def classify_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head((feats - self.feat_mean) / self.feat_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify_features(self.encoder(x))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self(x).float(), dim=1)


def train_linear_head(
    model: DownstreamModel,
    feats: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> DownstreamModel:
    """Fit the head of ``model`` on frozen features (Adam, cross-entropy, seeded)."""
    model.feat_mean.copy_(feats.mean(0))
    model.feat_std.copy_(feats.std(0).clamp_min(1e-6))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.head.reset_parameters()
    opt = torch.optim.Adam(model.head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        perm = torch.randperm(len(feats), generator=g)
        for i in range(0, len(feats), batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model.classify_features(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return model


@torch.no_grad()
def accuracy(model: DownstreamModel, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return float((model.classify_features(feats).argmax(1) == labels).float().mean())


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20) -> float:
    """Cosine kNN (distance-weighted vote, scikit-learn) on L2-normalised features."""
    knn = KNeighborsClassifier(n_neighbors=min(k, len(train_feats)), metric="cosine", weights="distance")
    knn.fit(F.normalize(train_feats, dim=1).numpy(), train_labels.numpy())
    return float(knn.score(F.normalize(test_feats, dim=1).numpy(), test_labels.numpy()))
