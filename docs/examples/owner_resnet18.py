"""A stand-in for the encoder an owner brings, for the README's owner path.

Not part of dist_awenc and written without it: plain PyTorch trains a torchvision ResNet-18 for a few seconds on
scikit-learn's digits (upscaled to 16 px, ImageNet's normalisation, supervised labels) and saves its state dict,
as your own training code would have. An untrained ResNet-18 will not do as a stand-in: its BatchNorm statistics
are the initial ones, so its features barely depend on the image and a watermark has nothing to hold on to.

    python docs/examples/owner_resnet18.py OUT.pt [--steps 15]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the state dict to write (.pt)")
    ap.add_argument("--steps", type=int, default=15, help="training steps of batch 32 (default 15)")
    args = ap.parse_args()
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x, y = (x - mean) / std, torch.tensor(digits.target)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for step in range(args.steps):
        i = torch.randint(0, len(x), (32,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), args.out)
    print(f"ResNet-18 state dict -> {args.out} ({args.steps} steps on digits, last loss {loss.item():.3f})")


if __name__ == "__main__":
    main()
