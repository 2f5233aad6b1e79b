"""What every part of the FFCV path shares: the install hint, the errors, the availability check."""
from __future__ import annotations

from typing import Optional


from dist_awenc.errors import AwencError

from dist_awenc.data.splits import SPLIT_NAMES


FFCV_REQUIREMENT = "ffcv==1.0.2"
INSTALL_HINT = (
    "install it with scripts/install_ffcv.sh [VENV] (Debian/Ubuntu: apt-get install -y --no-install-recommends "
    "pkg-config libopencv-dev libturbojpeg0-dev, then pip install 'dist_awenc[ffcv]'), or use the torchvision "
    "loader (data.loader=torch)"
)
WRITE_MODES = ("raw", "jpg")
RESIZE_MODES = ("squash", "center")
SPLITS = (*SPLIT_NAMES, "all")


# --------------------------------------------------------------------------- availability


class FFCVNotInstalledError(AwencError, ImportError):
    """FFCV (the optional ``ffcv`` extra) is not installed or does not import."""


class BetonWriteError(AwencError, RuntimeError):
    """Writing a ``.beton`` failed (the partial file has been removed)."""


_FFCV_IMPORT_ERROR: Optional[BaseException] = None


def ffcv_available() -> bool:
    """True when ``ffcv`` (its writer, loader and compiled extension) imports."""
    try:
        _require_ffcv()
    except FFCVNotInstalledError:
        return False
    return True


def _require_ffcv() -> None:
    """Import FFCV's modules, or raise :class:`FFCVNotInstalledError` naming the install steps."""
    try:
        import ffcv.fields  # noqa: F401
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except Exception as err:  # ImportError, or OSError of a compiled extension missing its .so
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FFCVNotInstalledError(f"the FFCV loader needs {FFCV_REQUIREMENT}, which does not import here "
                                    f"({msg}); {INSTALL_HINT}") from err
