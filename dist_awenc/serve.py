"""The pirate's deployed model as an HTTP prediction service (``awenc serve``).

Black-box verification queries a downstream model ``g = head o f`` that only
answers over the network. This module serves a saved downstream model with
the standard library's ``ThreadingHTTPServer``; the client side is
:mod:`dist_awenc.verify.endpoint`.

Endpoints (every answer is JSON; every error is ``{"error": "<one line>"}``):

``GET /health``
    ``{"status": "ok", "input_size": S, "num_classes": C, "labels_only": bool,
    "max_images": M, "max_body_bytes": B}``
``POST /predict``
    * ``Content-Type: application/json`` with ``{"images": <nested list
      (b, 3, S, S) of floats in [0, 1]>}`` or the fast path
      ``{"images_b64": "<base64 of float32 little-endian bytes>", "shape": [b, 3, S, S]}``;
    * ``Content-Type: image/png`` or ``image/jpeg``: the raw bytes of one image,
      decoded with PIL to RGB, resized to S x S (bilinear) and scaled by 1/255.

    Answers ``{"labels": [...]}`` when serving labels only, else
    ``{"probabilities": [[...]], "labels": [...]}`` (labels = argmax of the logits).

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
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.errors import ConfigError

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


class _RequestTimeout(Exception):
    """The client did not send its whole request before the server's per-request deadline."""


class _DeadlineReader(io.RawIOBase):
    """Socket reads that all end by one deadline (a ``time.monotonic()`` value), whatever the client's pace."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _RequestTimeout
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        except TimeoutError:
            raise _RequestTimeout from None


def default_max_images(image_size: int) -> int:
    """Most images per request: ``MAX_IMAGES``, fewer when they would exceed ``MAX_REQUEST_VALUES`` values."""
    return max(1, min(MAX_IMAGES, MAX_REQUEST_VALUES // (3 * image_size * image_size)))


def default_max_body_bytes(image_size: int, max_images: int) -> int:
    """The largest legitimate body: ``max_images`` images as a nested JSON list, verbose floats, with headroom."""
    return max(MIN_BODY_BYTES, max_images * 3 * image_size * image_size * JSON_BYTES_PER_VALUE + BODY_HEADROOM)


class PredictionServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` holding the model, a lock around it, and counters.

    At most ``max_concurrent`` connections are handled at once (a semaphore);
    one more is answered 503 from the accepting thread and closed.

    Attributes:
        requests_served: requests answered (any path, any status).
        predict_requests: ``POST /predict`` requests answered with predictions.
        images_served: images run through the model.
        bad_requests: requests answered with a 4xx status.
        refused_busy: connections answered 503 because ``max_concurrent`` were in progress.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], model: nn.Module, *, labels_only: bool, image_size: int,
                 num_classes: int, max_images: int, max_body_bytes: int, log_requests: bool,
                 max_concurrent: int = MAX_CONCURRENT, request_deadline: float = REQUEST_DEADLINE,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.model = model
        self.labels_only = bool(labels_only)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.max_images = int(max_images)
        self.max_body_bytes = int(max_body_bytes)
        self.max_concurrent = int(max_concurrent)
        self.request_deadline = float(request_deadline)
        self.max_image_pixels = int(max_image_pixels)
        self.log_requests = log_requests
        self.model_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_concurrent)
        self._count_lock = threading.Lock()
        self.requests_served = 0
        self.predict_requests = 0
        self.images_served = 0
        self.bad_requests = 0
        self.refused_busy = 0
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """A handler thread while a slot is free; otherwise 503 at once, without reading the request."""
        if not self._slots.acquire(blocking=False):
            self._refuse_busy(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse_busy(self, request: socket.socket) -> None:
        body = json.dumps({"error": f"server busy: {self.max_concurrent} requests in progress; retry shortly"})
        head = ("HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n")
        try:
            request.setblocking(False)  # the accepting thread never waits on a client
            request.send((head + body).encode())
        except OSError:
            pass
        self.count(status=HTTPStatus.SERVICE_UNAVAILABLE)
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line on stderr instead of socketserver's traceback; clients that hang up are not errors."""
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)) and not self.log_requests:
            return
        print(f"awenc serve: request from {client_address[0]} failed: {type(err).__name__}: {err}",
              file=sys.stderr, flush=True)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "input_size": self.image_size, "num_classes": self.num_classes,
                "labels_only": self.labels_only, "max_images": self.max_images, "max_body_bytes": self.max_body_bytes}

    def count(self, *, status: int, images: int = 0) -> None:
        with self._count_lock:
            self.requests_served += 1
            if 400 <= status < 500:
                self.bad_requests += 1
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                self.refused_busy += 1
            if images:
                self.predict_requests += 1
                self.images_served += images

    def predict(self, x: torch.Tensor) -> dict[str, list]:
        """Shape: (b, 3, S, S) float32 in [0, 1] -> the response's JSON object."""
        with self.model_lock, torch.no_grad():
            logits = self.model(x.to(self.device)).float().cpu()
        if logits.ndim != 2 or logits.shape != (len(x), self.num_classes):
            raise RuntimeError(f"the model returned logits of shape {tuple(logits.shape)}, "
                               f"expected ({len(x)}, {self.num_classes})")
        out: dict[str, list] = {"labels": logits.argmax(1).tolist()}
        if not self.labels_only:
            out = {"probabilities": F.softmax(logits, dim=1).tolist(), **out}
        return out


class _Handler(BaseHTTPRequestHandler):
    """One connection, one request (HTTP/1.0): read within the server's deadline, answer JSON, close."""

    server: PredictionServer
    server_version = "awenc-serve/1"
    timeout = WRITE_TIMEOUT  # the socket's timeout while answering; reads keep to the deadline instead

    # ------------------------------------------------------------------ plumbing

    def setup(self) -> None:
        self.deadline = time.monotonic() + self.server.request_deadline
        super().setup()
        self.rfile.close()  # the stdlib's reader, replaced by one that keeps to the deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.deadline))

    def handle(self) -> None:
        try:
            super().handle()
        except _RequestTimeout:
            self.close_connection = True
            for attr in ("requestline", "request_version", "command"):  # unset when the request line never came
                if not hasattr(self, attr):
                    setattr(self, attr, "")
            self._error(HTTPStatus.REQUEST_TIMEOUT,
                        f"request not received within {self.server.request_deadline:g} s; send it faster")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (stdlib signature)
        if self.server.log_requests:
            super().log_message(format, *args)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The stdlib's own refusals (bad request line, headers too long, unknown method) as JSON too."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = ""  # a malformed request line still gets a status line and headers
        self._error(code, message or HTTPStatus(code).phrase)

    def _send_json(self, status: int, obj: dict, images: int = 0) -> None:
        body = json.dumps(obj, allow_nan=False).encode()
        self.server.count(status=status, images=images)  # before answering: a client may look right after
        self.connection.settimeout(WRITE_TIMEOUT)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status >= 400:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send_json(status, {"error": " ".join(str(message).split()) or HTTPStatus(status).phrase})

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:  # noqa: N802  (stdlib name)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, self.server.health())
        elif path == "/predict":
            self._error(405, "use POST /predict")
        else:
            self._error(404, f"unknown path '{self.path}'; endpoints: GET /health, POST /predict")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/predict":
            if path == "/health":
                self._error(405, "use GET /health")
            else:
                self._error(404, f"unknown path '{self.path}'; endpoints: GET /health, POST /predict")
            return
        try:
            x = self._read_images()
        except BadRequest as e:
            self._error(e.status, str(e))
            return
        try:
            out = self.server.predict(x)
        except Exception as e:  # noqa: BLE001  (a model failure is the server's, reported as 500)
            self._error(500, f"inference failed: {type(e).__name__}: {e}")
            return
        self._send_json(200, out, images=len(x))

    # ------------------------------------------------------------------ decoding

    def _read_body(self) -> bytes:
        """The body, refused from its ``Content-Length`` alone when over ``max_body_bytes``."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise BadRequest("chunked bodies are not supported; send Content-Length", HTTPStatus.LENGTH_REQUIRED)
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise BadRequest("Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        try:
            length = int(raw)
        except ValueError:
            raise BadRequest(f"bad Content-Length '{raw}'") from None
        if length < 0:
            raise BadRequest(f"bad Content-Length '{raw}'")
        if length > self.server.max_body_bytes:
            self.close_connection = True
            raise BadRequest(f"body of {length} bytes exceeds the limit of {self.server.max_body_bytes}; "
                             "send fewer images per request", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        body = self.rfile.read(length)
        if len(body) != length:
            raise BadRequest(f"body ended after {len(body)} of {length} bytes")
        return body

    def _read_images(self) -> torch.Tensor:
        ctype = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if ctype not in ("application/json", *IMAGE_TYPES):
            raise BadRequest(f"unsupported Content-Type '{ctype or '(none)'}'; send application/json, image/png "
                             "or image/jpeg", HTTPStatus.UNSUPPORTED_MEDIA_TYPE)
        body = self._read_body()
        if ctype in IMAGE_TYPES:
            return decode_image(body, self.server.image_size, self.server.max_image_pixels)
        return decode_json(body, self.server.image_size, self.server.max_images)


# ---------------------------------------------------------------------- request decoding (pure functions)


def _check_shape(shape: tuple[int, ...], size: int, max_images: int) -> None:
    want = f"(b, 3, {size}, {size})"
    if len(shape) != 4 or tuple(shape[1:]) != (3, size, size):
        raise BadRequest(f"images must have shape {want}, got {tuple(shape)}")
    if shape[0] < 1:
        raise BadRequest("no images in the request")
    if shape[0] > max_images:
        raise BadRequest(f"{shape[0]} images in one request; at most {max_images}")


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


def decode_json(body: bytes, size: int, max_images: int = MAX_IMAGES) -> torch.Tensor:
    """A JSON body -> float32 (b, 3, S, S) in [0, 1]; raises :class:`BadRequest`."""
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
        _check_shape(tuple(shape), size, max_images)
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
        _check_shape(tuple(x.shape), size, max_images)
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


def decode_image(body: bytes, size: int, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """PNG / JPEG bytes of one image -> float32 (1, 3, S, S) in [0, 1] (RGB, bilinear resize, / 255).

    The dimensions are read from the header and checked against ``max_pixels``
    (width x height) before any pixel is decoded; raises :class:`BadRequest`.
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
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
        except Exception as e:  # noqa: BLE001
            raise BadRequest(f"cannot decode the image: {type(e).__name__}: {e}") from None
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)[None]


# ---------------------------------------------------------------------- construction


def _infer_image_size(model: nn.Module) -> int:
    for obj in (model, getattr(model, "encoder", None)):
        size = getattr(obj, "input_size", None)
        if isinstance(size, int):
            return size
    raise ConfigError("cannot tell the model's input size; pass image_size=")


def _infer_num_classes(model: nn.Module, image_size: int) -> int:
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return int(head.out_features)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1])


def make_server(model: nn.Module, *, host: str = "127.0.0.1", port: int = 0, labels_only: bool = False,
                image_size: Optional[int] = None, max_images: Optional[int] = None,
                max_body_bytes: Optional[int] = None, max_concurrent: int = MAX_CONCURRENT,
                request_deadline: float = REQUEST_DEADLINE, max_image_pixels: int = MAX_IMAGE_PIXELS,
                log_requests: bool = False) -> PredictionServer:
    """Bind (not yet serve) an HTTP prediction server for ``model``.

    Args:
        model: images (b, 3, S, S) in [0, 1] -> logits (b, C); put in eval mode.
        host, port: where to listen; port 0 picks a free port (see ``server.server_address``).
        labels_only: answer labels only (the label-only threat model), no probabilities.
        image_size: S; by default the model's (or its encoder's) ``input_size``.
        max_images: most images in one request; by default :func:`default_max_images`.
        max_body_bytes: largest request body accepted; by default :func:`default_max_body_bytes`.
        max_concurrent: connections handled at once; more are answered 503.
        request_deadline: seconds a client has from connecting to sending its whole request.
        max_image_pixels: most pixels (width x height) of a PNG / JPEG body.
        log_requests: print an access-log line per request on stderr.

    Returns:
        The bound server; run ``server.serve_forever()`` (e.g. in a thread), stop with
        ``server.shutdown()`` and ``server.server_close()``.

    Raises:
        ConfigError: the address cannot be bound, a limit is not positive, or the input size is unknown.
    """
    model.eval()
    size = int(image_size) if image_size is not None else _infer_image_size(model)
    num_classes = _infer_num_classes(model, size)
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    max_images = default_max_images(size) if max_images is None else int(max_images)
    if max_body_bytes is None:
        max_body_bytes = default_max_body_bytes(size, max_images)
    limits = {"max_images": max_images, "max_body_bytes": max_body_bytes, "max_concurrent": max_concurrent,
              "request_deadline": request_deadline, "max_image_pixels": max_image_pixels}
    for name, value in limits.items():
        if not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")
    try:
        return PredictionServer((host, int(port)), model, labels_only=labels_only, image_size=size,
                                num_classes=num_classes, log_requests=log_requests, **limits)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, labels_only: bool = False,
          log_requests: bool = False) -> None:
    """Load a saved downstream model and serve it until Ctrl-C."""
    from dist_awenc.evaluate.downstream import load_downstream

    model, _card = load_downstream(model_path)
    server = make_server(model, host=host, port=port, labels_only=labels_only, log_requests=log_requests)
    kind = "labels only" if labels_only else "probabilities"
    print(f"serving {model_path} on {server.url}/predict ({kind})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"stopped after {server.predict_requests} prediction requests ({server.images_served} images)",
              file=sys.stderr, flush=True)
    finally:
        server.server_close()
