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

    A pirate's serving path, on request: ``jpeg_quality`` re-encodes every
    image as a real PIL JPEG at that quality, at the size it came in, before
    the model; ``resize`` accepts arrays of any H x W and resizes them to S
    (bilinear, anti-aliased), as image files always are. ``/health`` then
    says so under ``serving_path``.

    Answers ``{"labels": [...]}`` when serving labels only, else
    ``{"probabilities": [[...]], "labels": [...]}`` (labels = argmax of the logits).

Limits and status codes: :mod:`dist_awenc.server.requests`, which decodes
every request before the model sees it.
"""
from __future__ import annotations

import io
import json
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from dist_awenc.errors import ConfigError
from dist_awenc.server.deadline import DeadlineReader, RequestTimeout
from dist_awenc.server.requests import (IMAGE_TYPES, MAX_CONCURRENT, MAX_IMAGE_PIXELS, REQUEST_DEADLINE, WRITE_TIMEOUT,
                                       BadRequest, decode_image, decode_json, default_max_body_bytes,
                                       default_max_images, serving_path)


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
                 max_image_pixels: int = MAX_IMAGE_PIXELS, jpeg_quality: Optional[int] = None,
                 resize: bool = False) -> None:
        self.model = model
        self.jpeg_quality, self.resize = jpeg_quality, bool(resize)  # the serving path before the model
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
        out = {"status": "ok", "input_size": self.image_size, "num_classes": self.num_classes,
               "labels_only": self.labels_only, "max_images": self.max_images, "max_body_bytes": self.max_body_bytes}
        if self.jpeg_quality is not None or self.resize:
            out["serving_path"] = {"jpeg_quality": self.jpeg_quality, "resize": self.resize}
        return out

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
        self.rfile = io.BufferedReader(DeadlineReader(self.connection, self.deadline))

    def handle(self) -> None:
        try:
            super().handle()
        except RequestTimeout:
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
        body, srv = self._read_body(), self.server
        if ctype in IMAGE_TYPES:
            return decode_image(body, srv.image_size, srv.max_image_pixels, srv.jpeg_quality)
        x = decode_json(body, srv.image_size, srv.max_images, any_size=srv.resize)
        return x if srv.jpeg_quality is None and not srv.resize else serving_path(x, srv.image_size, srv.jpeg_quality)


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
                log_requests: bool = False, jpeg_quality: Optional[int] = None, resize: bool = False) -> PredictionServer:
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
        jpeg_quality: re-encode every image as JPEG at this quality (1..95) before the model (None: never).
        resize: accept arrays of any size and resize them to S (image files are resized always).

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
    if jpeg_quality is not None and (isinstance(jpeg_quality, bool) or jpeg_quality not in range(1, 96)):
        raise ConfigError(f"jpeg quality must be an integer in 1..95, got {jpeg_quality!r}")
    try:
        return PredictionServer((host, int(port)), model, labels_only=labels_only, image_size=size,
                                num_classes=num_classes, log_requests=log_requests, jpeg_quality=jpeg_quality,
                                resize=resize, **limits)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model_path: str | Path, host: str = "127.0.0.1", port: int = 8000, labels_only: bool = False,
          log_requests: bool = False, jpeg_quality: Optional[int] = None, resize: bool = False) -> None:
    """Load a saved downstream model and serve it until Ctrl-C (``jpeg_quality``, ``resize``: :func:`make_server`)."""
    from dist_awenc.evaluate.downstream import load_downstream

    model, _card = load_downstream(model_path)
    server = make_server(model, host=host, port=port, labels_only=labels_only, log_requests=log_requests,
                         jpeg_quality=jpeg_quality, resize=resize)
    kind = "labels only" if labels_only else "probabilities"
    path = "".join([f", inputs re-encoded as JPEG q{jpeg_quality}" if jpeg_quality else "",
                    f", inputs resized to {server.image_size} px" if resize else ""])
    print(f"serving {model_path} on {server.url}/predict ({kind}{path})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"stopped after {server.predict_requests} prediction requests ({server.images_served} images)",
              file=sys.stderr, flush=True)
    finally:
        server.server_close()
