"""Self-supervised contrastive methods (SimCLR, MoCo v2, BYOL, MoCo v3) and their losses."""
from dist_awenc.ssl.losses import byol_regression, moco_infonce, mocov3_infonce, nt_xent
from dist_awenc.ssl.methods import (
    BYOL,
    METHODS,
    MoCoV2,
    SimCLR,
    SSLMethod,
    build_method,
    byol_momentum,
    register_method,
)
from dist_awenc.ssl.mocov3 import MoCoV3  # registers moco_v3

__all__ = [
    "BYOL",
    "METHODS",
    "MoCoV2",
    "MoCoV3",
    "SSLMethod",
    "SimCLR",
    "build_method",
    "byol_momentum",
    "byol_regression",
    "moco_infonce",
    "mocov3_infonce",
    "nt_xent",
    "register_method",
]
