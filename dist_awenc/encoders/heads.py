"""Small MLP heads put on top of an image backbone.

The same :class:`MLPHead` serves as the SimCLR / MoCo v2 projector (Chen et al.
2020, "A Simple Framework for Contrastive Learning of Visual Representations";
Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning") and
as the BYOL projector and predictor (Grill et al. 2020, "Bootstrap Your Own
Latent").
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_NORMS = ("none", "batch")


class ScaleBatchNorm1d(nn.Module):
    """BatchNorm over the batch with a learned per-feature scale and no shift (TensorFlow's ``center=False``), the
    norm on SimCLR v1's projector output (google-research/simclr ``linear_layer(use_bias=False, use_bn=True)``).

    Shape: ``(b, d)`` -> ``(b, d)``.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.weight


class MLPHead(nn.Module):
    """``Linear -> [BatchNorm1d] -> ReLU -> ... -> Linear [-> BatchNorm1d]``.

    Every layer but the last is followed by the optional normalisation and a
    ReLU; the last layer is a plain ``Linear`` (no activation), followed by a BatchNorm (scale, no shift:
    :class:`ScaleBatchNorm1d`) where ``out_norm="batch"``, which then has no bias.

    Args:
        in_dim: input feature size.
        hidden_dim: width of the hidden layers (unused when ``num_layers == 1``).
        out_dim: output size.
        num_layers: number of ``Linear`` layers (>= 1).
        norm: ``"none"`` or ``"batch"`` (``BatchNorm1d`` after each hidden
            ``Linear``, which then has no bias).
        out_norm: ``"none"`` or ``"batch"`` (SimCLR v1's BatchNorm on the output layer).

    Shape:
        input ``(b, in_dim)`` -> output ``(b, out_dim)``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        norm: str = "none",
        out_norm: str = "none",
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MLPHead: {name} must be a positive int, got {value!r}")
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise ValueError(f"MLPHead: num_layers must be an int >= 1, got {num_layers!r}")
        if norm not in HEAD_NORMS:
            raise ValueError(f"MLPHead: norm must be one of {', '.join(HEAD_NORMS)}; got {norm!r}")
        if out_norm not in HEAD_NORMS:
            raise ValueError(f"MLPHead: out_norm must be one of {', '.join(HEAD_NORMS)}; got {out_norm!r}")
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.out_dim = out_dim
        self.num_layers = num_layers
        self.norm = norm

        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim, bias=out_norm == "none"))
        if out_norm == "batch":
            layers.append(ScaleBatchNorm1d(out_dim))
        self.out_norm = out_norm
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x ``(b, in_dim)``. Returns: ``(b, out_dim)``."""
        return self.net(x)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, hidden_dim={self.hidden_dim}, out_dim={self.out_dim}, "
            f"num_layers={self.num_layers}, norm={self.norm!r}" + (f", out_norm={self.out_norm!r}" if self.out_norm != "none" else "")
        )
