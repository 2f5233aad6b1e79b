"""Writing files so that a crash leaves the old content or the new, never a partial file.

Every writer here follows one protocol: write a temporary file beside the
target (a name unique per host, process and call, so nodes sharing a folder
never collide), fsync it, rename it over the target, fsync the folder.

torch-free: ``save_tensors`` imports safetensors and torch only when called,
so the sweep's bookkeeping (``awenc sweep status``) can use this module.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_path", "atomic_write_text", "durable_replace", "fsync_dir", "save_figure", "save_tensors",
           "sha256_file", "tmp_name"]


def read_json(path: str | Path, error: type[Exception], what: str = "") -> Any:
    """Parse a JSON file; a missing or malformed one is one ``error`` line naming the file (and ``what`` it is)."""
    p = Path(path)
    if not p.exists():
        raise error(f"'{p}' does not exist" + (f" ({what})" if what else ""))
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tmp_name(path: str | Path, suffix: str = "") -> Path:
    """A temp name beside ``path`` that no other process or node shares (``suffix`` keeps an extension a writer needs)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


def fsync_dir(folder: str | Path) -> None:
    """fsync a folder (makes a rename in it durable); silently skipped where the file system refuses."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def durable_replace(tmp: str | Path, path: str | Path) -> None:
    """fsync the written temp file, rename it over ``path``, fsync the folder: a crash leaves old or new, never empty."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temp path for the block to write; on success it replaces ``path`` durably, on error it is removed.

    For writers that take a file name (CSV, parquet, a figure): ``suffix`` keeps
    the extension a writer infers the format from (``".png"``).
    """
    path = Path(path)
    tmp = tmp_name(path, suffix)
    try:
        yield tmp
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically and durably (temp file created exclusively, fsync, rename, fsync the folder)."""
    with atomic_path(path) as tmp:
        # created exclusively, with umask permissions (a group sharing the folder can read it)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
            f.write(text)


def save_tensors(path: str | Path, tensors: "dict[str, torch.Tensor]", metadata: dict[str, str] | None = None) -> str:
    """Write safetensors atomically and durably (temp file, fsync, rename); returns the file's SHA-256."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Lay out, write atomically (PNG) and close a matplotlib figure (pyplot imported only when called)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


# the names these helpers had in dist_awenc.encoders.io
_tmp_name = tmp_name
_durable_replace = durable_replace
