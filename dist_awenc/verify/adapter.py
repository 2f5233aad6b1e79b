"""Adapters: how a suspect's prediction API wants its images and where its answers are (``configs/adapters/*.yaml``).

A pirate's API is rarely ``awenc serve``. An adapter is a small YAML file
selected with ``verify.adapter=configs/adapters/x.yaml``; its keys are the
fields of :class:`Adapter`. Formats:

``serve``
    ``awenc serve``'s fast path: JSON ``{"images_b64": <float32 little-endian>, "shape": [b, 3, S, S]}``;
``json``
    JSON with each image as a base64 PNG at the dotted path ``field`` (a list
    of them when ``batch``), plus the constant fields of ``body``;
``raw``
    the PNG itself as the request body (``Content-Type: image/png``), one image per request;
``multipart``
    ``multipart/form-data`` with the PNG as the file ``field`` (one per request, or one part per image).

``encoding: jpeg`` sends real PIL JPEG bytes at ``jpeg_quality`` instead of PNG
in the three formats that send image files (an API that accepts only JPEG);
the logged hash is of those bytes, so a replay re-encodes and compares them.

Answers are JSON; ``labels`` and ``probabilities`` are dotted paths into them
(a list per request, or one value when ``batch`` is false). A label is an
integer or a string (label modes only compare labels for equality; a string
becomes a stable id, :func:`label_id`), or a top-k list of them, best first,
whose first entry is the label; ``label_item`` is a dotted path applied to
each image's entry instead (``0.label`` for a list of ``{label, score}``
objects). ``headers`` maps a
header to the NAME of an environment variable holding its value: values are
read when a request is made and are never written to a file or a log (the
bundle and the verdict record the names only). PNG queries are the images
rounded to 8 bits, so the suspect sees exactly the image whose hash is logged.
Every adapter goes through the same hardened transport (answer size cap,
total deadline, no redirects, bounded retries).
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from dist_awenc.errors import ConfigError

FORMATS = ("serve", "json", "raw", "multipart")
ENCODINGS = ("png", "jpeg")  # how the image-file formats (json, raw, multipart) send a query
LABELS_ERROR = "labels must be integers or strings, or top-k lists of them"


def label_id(name: str) -> int:
    """A string label's integer id: the first 8 bytes of its UTF-8 SHA-256, shifted into int64's non-negative range.

    It depends on the string alone, never on the order answers arrive in, so a replay of the logged answers gives
    the same ids; only equality of labels matters to the label modes.
    """
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") >> 1


@dataclass(frozen=True)
class Adapter:
    name: str = "serve"
    format: str = "serve"  # serve | json | raw | multipart (module docstring)
    predict_path: str = "/predict"  # appended to the endpoint's base URL
    health_path: Optional[str] = "/health"  # null: the API has none; give `info` instead
    field: str = "images_b64"  # json: dotted path of the image(s); multipart: the form field's name
    batch: bool = True  # several images per request (`field` and the answers are lists) or one
    body: dict = dataclasses.field(default_factory=dict)  # json: constant fields of every request
    labels: str = "labels"  # dotted path of the labels in an answer
    probabilities: Optional[str] = "probabilities"  # dotted path of the probabilities; null: labels only
    headers: dict = dataclasses.field(default_factory=dict)  # header -> NAME of the environment variable with its value
    rate_limit: float = 0.0  # most requests per second (0: no limit)
    timeout: Optional[float] = None  # seconds per request (null: verify.endpoint_timeout)
    deadline: Optional[float] = None  # seconds in all (null: the transport's default, 600)
    info: dict = dataclasses.field(default_factory=dict)  # what /health would say: input_size, num_classes, labels_only
    label_item: Optional[str] = None  # dotted path into each image's label entry (null: a list entry's first element)
    encoding: str = "png"  # png | jpeg: how json, raw and multipart send images
    jpeg_quality: int = 90  # encoding jpeg: PIL's quality, 1..95

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"adapter {self.name}: format '{self.format}' is not one of {', '.join(FORMATS)}")
        if self.format == "raw" and self.batch:
            raise ConfigError(f"adapter {self.name}: format raw sends one image per request; set batch: false")
        if self.format == "serve" and not self.batch:
            raise ConfigError(f"adapter {self.name}: format serve sends batches; set batch: true")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"adapter {self.name}: encoding '{self.encoding}' is not one of {', '.join(ENCODINGS)}")
        if self.encoding == "jpeg" and self.format == "serve":
            raise ConfigError(f"adapter {self.name}: format serve sends float32 arrays; encoding jpeg is for the "
                              "formats that send image files (json, raw, multipart)")
        if isinstance(self.jpeg_quality, bool) or not isinstance(self.jpeg_quality, int) or \
                not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"adapter {self.name}: jpeg_quality must be an integer in 1..95, got {self.jpeg_quality!r}")
        if self.rate_limit < 0 or (self.timeout is not None and self.timeout <= 0) or \
                (self.deadline is not None and self.deadline <= 0):
            raise ConfigError(f"adapter {self.name}: rate_limit must be >= 0, timeout and deadline > 0")
        for k, v in self.headers.items():
            if not isinstance(v, str) or not v.replace("_", "").isalnum():
                raise ConfigError(f"adapter {self.name}: headers.{k} must name an environment variable "
                                  "(the value itself never goes in a file)")

    def record(self) -> dict:
        """The adapter as plain JSON (header values are not part of it: only their variables' names)."""
        return dataclasses.asdict(self)

    def header_values(self) -> dict[str, str]:
        """The headers' values, from the environment; a missing variable is a one-line error naming it."""
        out = {}
        for header, var in self.headers.items():
            if var not in os.environ:
                raise ConfigError(f"adapter {self.name}: environment variable {var} (for header {header}) is not set")
            out[header] = os.environ[var]
        return out

    def wire(self, x: torch.Tensor) -> list[bytes]:
        """The exact bytes each image of (b, 3, S, S) in [0, 1] is sent as (their SHA-256 is what the log records)."""
        if self.format == "serve":
            return [img.numpy().astype("<f4", copy=False).tobytes() for img in x]
        if self.encoding == "jpeg":
            return [_jpeg(img, self.jpeg_quality) for img in x]
        return [_png(img) for img in x]

    @property
    def content_type(self) -> str:
        """The Content-Type of one image file sent by the raw and multipart formats."""
        return "image/jpeg" if self.encoding == "jpeg" else "image/png"

    def request(self, x: torch.Tensor, wires: list[bytes]) -> tuple[bytes, str]:
        """One request's body and Content-Type for the images ``x`` (already encoded as ``wires``)."""
        if self.format == "serve":
            body = {"images_b64": base64.b64encode(b"".join(wires)).decode("ascii"), "shape": list(x.shape)}
            return json.dumps(body).encode(), "application/json"
        if self.format == "raw":
            return wires[0], self.content_type
        if self.format == "json":
            images = [base64.b64encode(w).decode("ascii") for w in wires]
            body = json.loads(json.dumps(self.body))
            _set(body, self.field, images if self.batch else images[0])
            return json.dumps(body).encode(), "application/json"
        boundary = "awenc" + hashlib.sha256(b"".join(wires)).hexdigest()[:32]
        ext = "jpg" if self.encoding == "jpeg" else "png"
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{self.field}"; filename="query{i}.{ext}"\r\n'
                 f"Content-Type: {self.content_type}\r\n\r\n".encode() + w + b"\r\n" for i, w in enumerate(wires)]
        return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"

    def answer(self, obj: Any, path: Optional[str]) -> Any:
        """The value at the dotted ``path`` of an answer, as a list per image (None where it is absent)."""
        if path is None:
            return None
        obj = _get(obj, path)
        return obj if self.batch or obj is None else [obj]

    def label_of(self, entry: Any) -> Optional[int | str]:
        """One image's label from its answer entry: ``label_item`` applied to it, else the entry itself or, for a
        top-k list (best first), its first element. None where that is not an integer or a string."""
        if self.label_item is not None:
            entry = _get(entry, self.label_item)
        elif isinstance(entry, list):
            entry = entry[0] if entry else None
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            return None
        return entry


def _get(obj: Any, path: str) -> Any:
    """The value at a dotted path (keys of objects, indices of lists), or None where it is absent."""
    for key in path.split("."):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and key.isdigit() and int(key) < len(obj):
            obj = obj[int(key)]
        else:
            return None
    return obj


def _pixels(img: torch.Tensor):
    """(3, S, S) in [0, 1] -> a PIL RGB image of its values rounded to 8 bits."""
    from PIL import Image

    arr = (img.detach().cpu().permute(1, 2, 0).double() * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def _png(img: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    _pixels(img).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: torch.Tensor, quality: int) -> bytes:
    """Real PIL JPEG bytes: baseline, no optimisation pass, full-resolution chroma (4:4:4), so the same image gives
    the same bytes again (a replay re-encodes every query and compares its hash with the logged one)."""
    buf = io.BytesIO()
    _pixels(img).save(buf, format="JPEG", quality=int(quality), subsampling=0, optimize=False, progressive=False)
    return buf.getvalue()


def _set(obj: dict, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj.setdefault(key, {})
        if not isinstance(obj, dict):
            raise ConfigError(f"adapter: field '{path}' runs through '{key}', which body sets to a non-object")
    obj[last] = value


SERVE = Adapter()


def load_adapter(path: str | Path | dict | None) -> Adapter:
    """An adapter from its YAML file (or its record); None or "" is ``awenc serve``'s own format."""
    if not path:
        return SERVE
    if isinstance(path, dict):
        return Adapter(**path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"verify.adapter: '{p}' does not exist (adapters are YAML files, e.g. configs/adapters/serve.yaml)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    names = [f.name for f in dataclasses.fields(Adapter)]
    if not isinstance(raw, dict) or any(k not in names for k in raw):
        bad = [k for k in raw if k not in names] if isinstance(raw, dict) else ["(not a mapping)"]
        raise ConfigError(f"{p}: unknown adapter key {bad[0]!r}; valid keys: {', '.join(names)}")
    raw.setdefault("name", p.stem)
    try:
        return Adapter(**raw)
    except TypeError as e:
        raise ConfigError(f"{p}: {e}") from None
