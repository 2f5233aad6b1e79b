"""Self-supervised contrastive methods and their losses."""
from dist_awenc.ssl.losses import byol_regression, moco_infonce, nt_xent
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

__all__ = [
    "BYOL",
    "METHODS",
    "MoCoV2",
    "SSLMethod",
    "SimCLR",
    "build_method",
    "byol_momentum",
    "byol_regression",
    "moco_infonce",
    "nt_xent",
    "register_method",
]
