"""A stand-in for a pirate's copy of a released encoder, for the README's verifier path.

Not part of dist_awenc and written without it: plain PyTorch re-saves the released weights the way a pirate's
training code would, a ``.pt`` checkpoint with the state dict under ``model`` (beside an epoch and optimizer
state), DDP's ``module.`` prefix, fp16 tensors and a classifier head of the pirate's own task. The key names are
the backbone's own (torchvision's for a ResNet), so ``awenc import`` maps them as it maps any torchvision file.

    python docs/examples/pirate_copy.py RELEASED_RUN_OR_FILE OUT.pt [--classes 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("released", help="the released encoder: a run folder or its encoder.safetensors")
    ap.add_argument("out", help="the pirate's checkpoint to write (.pt)")
    ap.add_argument("--classes", type=int, default=2, help="classes of the pirate's head (default 2)")
    args = ap.parse_args()
    src = Path(args.released)
    src = src / "encoder.safetensors" if src.is_dir() else src
    torch.manual_seed(0)
    stolen = {k.removeprefix("backbone."): v for k, v in load_file(str(src)).items()}
    state = {f"module.{k}": (v.half() if v.is_floating_point() else v) for k, v in stolen.items()}  # DDP, fp16
    dim = max(v.shape[0] for v in stolen.values() if v.ndim == 4)  # the last convolution's channels
    state["module.fc.weight"] = torch.randn(args.classes, dim).half()  # the pirate's head
    state["module.fc.bias"] = torch.zeros(args.classes).half()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 99, "optimizer": {"lr": 0.1}}, args.out)
    print(f"pirate checkpoint -> {args.out} ({len(state)} tensors, fp16, 'module.' prefix, {args.classes}-class head)")


if __name__ == "__main__":
    main()
