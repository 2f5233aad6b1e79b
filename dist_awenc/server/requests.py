"""What a prediction request to ``awenc serve`` may hold, and how it becomes a batch of images.

Limits (the server is public; every request may be hostile):

* ``max_images`` (M) images per request: 1024, fewer for large inputs so that
  a request holds at most ``MAX_REQUEST_VALUES`` = 2**22 pixel values;
* ``max_body_bytes`` (B): the largest legitimate body, M images as a nested
  JSON list at ``JSON_BYTES_PER_VALUE`` = 32 bytes a value, plus 64 KiB (and at
  least 8 MiB, room for one photo); refused from the ``Content-Length`` header
  with 413, before anything is read;
* JSON bodies are checked before parsing: at most as many lists and commas
  as M images need, at most 64 quote characters, nesting at most 5 deep;
* PNG / JPEG: at most ``MAX_IMAGE_PIXELS`` = 2**24 pixels (width x height,
  read from the header before decoding), else 413;
* ``max_concurrent`` = 8 connections handled at once; one more is answered 503
  (``Retry-After: 1``) straight away and closed;
* ``request_deadline`` = 60 s from the connection to the body fully read,
  whatever the pace of the client; then 408 and the connection is closed.
  Answers are written with a 10 s timeout.

Bad input gets 400 (wrong shape, values outside [0, 1], undecodable body,
more than ``max_images`` images, JSON nested too deep), an unsupported content
type 415, a body over ``max_body_bytes`` or an image over the pixel limit 413,
a missing ``Content-Length`` 411, a slow client 408, an unknown path 404. The
server keeps serving after each.

Everything here is a pure function of the request's bytes (no socket, no
model): the server (:mod:`dist_awenc.server.app`) calls it before the model runs.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
from http import HTTPStatus
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

MAX_IMAGES = 1024  # most images per request, whatever the input size
MAX_REQUEST_VALUES = 1 << 22  # most pixel values per request (16 MiB as float32); lowers max_images for large inputs
JSON_BYTES_PER_VALUE = 32  # one float in the most verbose accepted JSON: 17 digits, exponent, ", ", brackets
BODY_HEADROOM = 64 << 10  # keys, whitespace and "shape" on top of the values
MIN_BODY_BYTES = 8 << 20  # room for one ordinary photo as PNG / JPEG, however small the model's input
MAX_IMAGE_PIXELS = 1 << 24  # width x height of one PNG / JPEG (16.7 megapixels), checked before decoding
MAX_CONCURRENT = 8  # connections handled at once; one more gets 503 straight away
REQUEST_DEADLINE = 60.0  # seconds from the connection to the request body fully read
WRITE_TIMEOUT = 10.0  # seconds to write an answer to a client that does not read it
MAX_JSON_DEPTH = 5  # {"images": [b][3][S][S]} nests 5 deep
MAX_JSON_QUOTES = 64  # keys and the base64 string: a handful of JSON strings
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")

_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')  # a string (skipped whole) or a bracket


class BadRequest(Exception):
    """A request the server refuses; ``status`` is the HTTP code, the message one line."""

    def __init__(self, message: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = int(status)


def default_max_images(image_size: int) -> int:
    """Most images per request: ``MAX_IMAGES``, fewer when they would exceed ``MAX_REQUEST_VALUES`` values."""
    return max(1, min(MAX_IMAGES, MAX_REQUEST_VALUES // (3 * image_size * image_size)))


def default_max_body_bytes(image_size: int, max_images: int) -> int:
    """The largest legitimate body: ``max_images`` images as a nested JSON list, verbose floats, with headroom."""
    return max(MIN_BODY_BYTES, max_images * 3 * image_size * image_size * JSON_BYTES_PER_VALUE + BODY_HEADROOM)


def _check_shape(shape: tuple[int, ...], size: int, max_images: int, any_size: bool = False) -> None:
    """``any_size``: images of any H x W (the server resizes them), as many values as ``max_images`` at S x S."""
    want = f"(b, 3, {size}, {size})" if not any_size else "(b, 3, H, W)"
    if len(shape) != 4 or shape[1] != 3 or (not any_size and tuple(shape[2:]) != (size, size)) or min(shape[2:]) < 1:
        raise BadRequest(f"images must have shape {want}, got {tuple(shape)}")
    if shape[0] < 1:
        raise BadRequest("no images in the request")
    if shape[0] > max_images:
        raise BadRequest(f"{shape[0]} images in one request; at most {max_images}")
    if any_size and math.prod(shape[2:]) * shape[0] > max_images * size * size:
        raise BadRequest(f"{shape[0]} images of {shape[2]}x{shape[3]} in one request; at most {max_images} "
                         f"images' worth of {size}x{size} pixels")


def _check_range(x: torch.Tensor) -> torch.Tensor:
    ok = (x >= 0) & (x <= 1)  # also False for NaN
    if not bool(ok.all()):
        bad = x[~ok]
        raise BadRequest(f"{bad.numel()} pixel value(s) outside [0, 1] (e.g. {float(bad[0]):g}); "
                         "send images scaled to [0, 1]")
    return x


def check_json_structure(body: bytes, size: int, max_images: int = MAX_IMAGES) -> None:
    """Refuse, before parsing, JSON that no accepted request needs; raises :class:`BadRequest`.

    Counts (in C, without building objects) lists, commas and quote characters
    against what ``max_images`` images of shape (3, S, S) need, then walks the
    brackets outside strings and refuses nesting deeper than ``MAX_JSON_DEPTH``.
    """
    per_image = (3 * size * size, 1 + 3 + 3 * size)  # values, lists
    max_lists = 2 + max_images * per_image[1]  # the outer list and "shape"
    max_commas = 64 + max_images * (per_image[0] + per_image[1])
    lists, commas, quotes = body.count(b"["), body.count(b","), body.count(b'"')
    if lists > max_lists:
        raise BadRequest(f"body has {lists} JSON lists; {max_images} images of shape (3, {size}, {size}) need "
                         f"at most {max_lists}")
    if commas > max_commas:
        raise BadRequest(f"body has {commas} JSON values; {max_images} images of shape (3, {size}, {size}) need "
                         f"at most {max_commas}")
    if quotes > MAX_JSON_QUOTES:
        raise BadRequest(f"body has {quotes} quote characters; a request needs at most {MAX_JSON_QUOTES} "
                         '(keys "images" or "images_b64" and "shape")')
    depth = 0
    for token in _JSON_TOKEN.finditer(body):
        char = token.group()[:1]
        if char in b"[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise BadRequest(f"JSON nested more than {MAX_JSON_DEPTH} deep; "
                                 f'{{"images": ...}} of shape (b, 3, S, S) nests {MAX_JSON_DEPTH} deep')
        elif char in b"]}":
            depth -= 1


def decode_json(body: bytes, size: int, max_images: int = MAX_IMAGES, any_size: bool = False) -> torch.Tensor:
    """A JSON body -> float32 (b, 3, S, S) in [0, 1] (``any_size``: (b, 3, H, W)); raises :class:`BadRequest`."""
    check_json_structure(body, size, max_images)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: also over-long integers
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadRequest('body must be a JSON object with "images" or "images_b64" and "shape"')
    if "images_b64" in obj:
        shape = obj.get("shape")
        if not (isinstance(shape, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)):
            raise BadRequest('"images_b64" needs "shape": a list of 4 integers [b, 3, S, S]')
        _check_shape(tuple(shape), size, max_images, any_size)
        data = obj["images_b64"]
        if not isinstance(data, str):
            raise BadRequest('"images_b64" must be a base64 string')
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f'"images_b64" is not valid base64: {e}') from None
        want = 4 * math.prod(shape)
        if len(raw) != want:
            raise BadRequest(f'"images_b64" holds {len(raw)} bytes; shape {shape} as float32 needs {want}')
        x = torch.from_numpy(np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape))
    elif "images" in obj:
        try:
            x = torch.tensor(obj["images"], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadRequest(f'"images" must be a nested list of numbers of shape (b, 3, {size}, {size}): '
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        _check_shape(tuple(x.shape), size, max_images, any_size)
    else:
        raise BadRequest('body must have "images" (nested list) or "images_b64" and "shape"')
    return _check_range(x)


def _open_image(body: bytes) -> Any:
    """PIL's lazy open of PNG or JPEG bytes: the header is parsed, no pixel is decoded.

    The format's PIL class is used directly, not ``Image.open``: PIL's own
    decompression-bomb check there (a warning from 89 megapixels, an error
    from 179) would preempt the stricter ``max_pixels`` check that follows.
    """
    from PIL import JpegImagePlugin, PngImagePlugin

    if body.startswith(b"\x89PNG\r\n\x1a\n"):
        kind = PngImagePlugin.PngImageFile
    elif body.startswith(b"\xff\xd8\xff"):
        kind = JpegImagePlugin.JpegImageFile
    else:
        raise BadRequest(f"cannot decode the image: its first bytes {body[:8]!r} are those of neither PNG nor JPEG")
    try:
        return kind(io.BytesIO(body))
    except Exception as e:  # noqa: BLE001  (PIL raises many types on bad or hostile input)
        raise BadRequest(f"cannot decode the image: {type(e).__name__}: {e}") from None


def decode_image(body: bytes, size: int, max_pixels: int = MAX_IMAGE_PIXELS,
                 jpeg_quality: Optional[int] = None) -> torch.Tensor:
    """PNG / JPEG bytes of one image -> float32 (1, 3, S, S) in [0, 1] (RGB, bilinear resize, / 255).

    The dimensions are read from the header and checked against ``max_pixels``
    (width x height) before any pixel is decoded; raises :class:`BadRequest`.
    ``jpeg_quality``: the decoded image is re-encoded as JPEG at that quality
    (:func:`jpeg_roundtrip`) at the size it came in, before it is resized.
    """
    from PIL import Image

    if not body:
        raise BadRequest("empty image body")
    with _open_image(body) as img:
        width, height = img.size
        if width * height > max_pixels:
            raise BadRequest(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels; "
                             f"send it resized (the model takes {size}x{size})", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            img = img.convert("RGB")
            if jpeg_quality is not None:
                img = jpeg_roundtrip(img, jpeg_quality)
            img = img.resize((size, size), Image.BILINEAR)
        except Exception as e:  # noqa: BLE001
            raise BadRequest(f"cannot decode the image: {type(e).__name__}: {e}") from None
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)[None]


def jpeg_roundtrip(img: Any, quality: int) -> Any:
    """A PIL RGB image re-encoded as a real JPEG at ``quality`` (PIL's defaults otherwise) and decoded again."""
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def serving_path(x: torch.Tensor, size: int, jpeg_quality: Optional[int] = None) -> torch.Tensor:
    """What a pirate's serving path does to decoded arrays before its model: each image re-encoded as JPEG at
    ``jpeg_quality`` (rounded to 8 bits first), then resized to ``size`` (bilinear, anti-aliased) where it is not.

    Shape: (b, 3, H, W) float32 in [0, 1] -> (b, 3, size, size).
    """
    from PIL import Image

    if jpeg_quality is not None:
        out = []
        for img in x:
            arr = (img.permute(1, 2, 0).double() * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            back = np.asarray(jpeg_roundtrip(Image.fromarray(arr, "RGB"), jpeg_quality), dtype=np.uint8)
            out.append(torch.from_numpy(back.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0))
        x = torch.stack(out)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return x
