"""Downstream evaluation: features, a linear probe, kNN, and the pirate's downstream model."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.data.stream import Images, batches


@torch.no_grad()
def extract_features(encoder: nn.Module, images: Images, batch_size: int = 512) -> torch.Tensor:
    """Shape: (N, 3, S, S) in [0, 1] -> (N, D) features on the CPU, computed in eval mode on the encoder's device.

    ``images`` is a tensor or an :class:`~dist_awenc.data.stream.IndexedImages`, decoded ``batch_size`` at a time.
    """
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    out = [encoder(x.to(device)).float().cpu() for x in batches(images, batch_size)]
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
                 test_labels: torch.Tensor, k: int = 20, chunk: int = 4096) -> float:
    """Cosine kNN with a distance-weighted vote, as a batched top-k of a matmul on the features' device.

    Computes what scikit-learn's ``KNeighborsClassifier(metric="cosine", weights="distance")`` does
    (weights 1 / (1 - cos); a neighbour at distance 0 takes the whole vote, shared among such
    neighbours; ties in the vote go to the smallest label), without leaving the device and with
    memory bounded by ``chunk`` test rows x train rows.
    """
    k = min(k, len(train_feats))
    train = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(train.device)
    num_classes = int(labels.max()) + 1
    correct = 0
    for i in range(0, len(test_feats), chunk):
        test = F.normalize(test_feats[i : i + chunk].float().to(train.device), dim=1)
        sims, idx = (test @ train.T).topk(k, dim=1)  # (c, k)
        dist = (1 - sims).clamp_min(0)
        exact = dist == 0
        weights = torch.where(exact.any(1, keepdim=True), exact.float(), 1 / dist.clamp_min(1e-30))
        votes = torch.zeros(len(test), num_classes, device=train.device).scatter_add_(1, labels[idx], weights)
        correct += int((votes.argmax(1).cpu() == test_labels[i : i + chunk].cpu()).sum())
    return correct / len(test_feats)
