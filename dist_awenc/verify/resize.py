"""Verifying a suspect that takes another input resolution than the secret's (``plan.resize``).

Pirates fine-tune at another resolution (224 -> 384 is routine) and APIs resize
whatever they get. The secret marks images at its own resolution S, so a suspect
taking S' px inputs is queried the way a pirate's pipeline would feed it: the
clean, marked and control queries (and key images) are made at S, then resized
to S' by the method the plan records (``plan.resize``, fixed at ``awenc
watermark`` time; a plan from before it existed gets :data:`DEFAULT_RESIZE`,
said in a note).

* white-box: the encoder is wrapped (:class:`Resized`): every call resizes, then
  runs it;
* in-process black-box: the downstream model is wrapped the same way (its
  ``forward`` and ``predict_proba``);
* a remote API that states its ``input_size`` (its ``/health`` or the adapter's
  ``info``): the queries are resized before they are encoded and sent
  (:func:`resizing`), so the logged hashes are of the resized images; an API
  that states none is sent the secret's resolution and resizes them itself.

The secret-permutation tests stay exact: every secret, the owner's and the J
alternatives, is resized the same way, so the J + 1 statistics remain
exchangeable under H0. The calibrated margin tests were calibrated at S, so at
another resolution they draw no decision (:func:`mark_resolution`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.errors import ConfigError

# name -> torch.nn.functional.interpolate's mode; every method anti-aliases when it shrinks
RESIZE_METHODS = {"bilinear-antialias": "bilinear", "bicubic-antialias": "bicubic"}
DEFAULT_RESIZE = "bilinear-antialias"


def check_resize(method: str) -> str:
    """``method`` if it is a known resize, else a one-line ConfigError listing the valid ones."""
    if method not in RESIZE_METHODS:
        raise ConfigError(f"plan.resize '{method}' is not one of {', '.join(RESIZE_METHODS)}")
    return method


def plan_resize(plan: Optional[dict]) -> tuple[str, Optional[str]]:
    """The resize a plan records, and a note when it records none (older plans: the default)."""
    method = (plan or {}).get("resize")
    if method is None:
        return DEFAULT_RESIZE, (f"the plan records no resize (made before plans recorded one): {DEFAULT_RESIZE} "
                                "assumed")
    return check_resize(method), None


def resize_images(x: torch.Tensor, size: int, method: str = DEFAULT_RESIZE) -> torch.Tensor:
    """Resize images to ``size`` x ``size``, kept in [0, 1].

    Shape: (b, 3, H, W) -> (b, 3, size, size); the input itself when it is already that size.
    """
    if tuple(x.shape[-2:]) == (size, size):
        return x
    mode = RESIZE_METHODS[check_resize(method)]
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True).clamp(0, 1)


class Resized(nn.Module):
    """An encoder or a downstream model that takes ``size`` px inputs, fed images of any resolution.

    Every call resizes its input to ``size`` (:func:`resize_images`) and runs the wrapped module; ``predict_proba``
    too when the module has one. Its parameters are the module's, so ``next(model.parameters())`` finds its device;
    an encoder's ``feature_dim`` is passed through (a downstream head can be trained on the wrapped encoder).
    """

    def __init__(self, module: nn.Module, size: int, method: str = DEFAULT_RESIZE) -> None:
        super().__init__()
        self.module, self.size, self.method = module, int(size), check_resize(method)
        if hasattr(module, "feature_dim"):
            self.feature_dim = module.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(resize_images(x, self.size, self.method))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.predict_proba(resize_images(x, self.size, self.method))


def fed_at(module: nn.Module, module_size: int, image_size: int, method: str = DEFAULT_RESIZE) -> nn.Module:
    """``module`` (taking ``module_size`` px inputs) as fed ``image_size`` px images: itself when the sizes agree,
    else :class:`Resized` (how the pirate's own pipeline feeds a derivative at another resolution)."""
    return module if module_size == image_size else Resized(module, module_size, method)


@torch.no_grad()
def takes_size(module: nn.Module, size: int) -> bool:
    """Whether ``module`` runs on ``size`` px inputs: a CNN with global pooling does whatever its card says; a ViT
    whose position embedding fixes its input size does not (its forward raises)."""
    was = module.training
    module.eval()
    try:
        param = next(module.parameters(), None)
        module(torch.zeros(1, 3, size, size, device=param.device if param is not None else "cpu"))
        return True
    except (RuntimeError, ValueError, AssertionError):
        return False
    finally:
        module.train(was)


def weights_at(encoder: nn.Module, encoder_size: int, image_size: int,
               method: str = DEFAULT_RESIZE) -> tuple[nn.Module, int]:
    """The encoder as the white-box tests measure it, and the resolution they measure it at.

    The weights are the owner's to inspect, so where they take the secret's ``image_size`` px inputs they are
    measured there, where the mark was embedded (and where stage 1 recorded f0's baselines), whatever input size the
    suspect's card states; a pirate who fine-tuned at another resolution does not move the test to a resolution the
    mark was never taught at. Weights that take no other input size than their own are fed the images resized
    (:func:`fed_at`). A fixed rule, not a choice made after seeing scores: the permutation test stays exact.
    """
    if encoder_size == image_size or takes_size(encoder, image_size):
        return encoder, image_size
    return Resized(encoder, encoder_size, method), encoder_size


def resizing(predict: Callable[[torch.Tensor], Any], size: int, method: str) -> Callable[[torch.Tensor], Any]:
    """A remote predictor fed queries resized to ``size`` before they are encoded and sent."""
    return lambda x: predict(resize_images(x, size, method))


def resolution_reason(secret_size: int, suspect_size: int) -> str:
    """Why a margin test draws no decision at another resolution (one line)."""
    return (f"calibrated at {secret_size} px; the suspect takes {suspect_size} px: only the permutation tests "
            "decide")


def mark_resolution(verdicts: Sequence[Any], secret_size: int, suspect_size: Optional[int], method: str,
                    note: Optional[str] = None, resized_by: str = "the verifier") -> None:
    """At another resolution than the secret's: record the suspect's input size and the resize in every verdict's
    details, and make each margin test (it has a threshold) draw no decision. At the secret's, or where the
    suspect states no input size (an API that resizes what it gets), nothing changes."""
    if suspect_size is None or suspect_size == secret_size:
        return
    for v in verdicts:
        v.details["input_size"] = {"secret": secret_size, "suspect": suspect_size}
        v.details["resize"] = {"method": method, "by": resized_by, **({"note": note} if note else {})}
        if v.threshold is not None:
            reason = resolution_reason(secret_size, suspect_size)
            v.no_decision = reason + (f"; {v.no_decision}" if v.no_decision else "")
