"""Hostile traffic both ways (issue #14): ``awenc serve`` against abusive clients, ``RemoteModel`` against a
hostile server.

Every attack on the server must end in a 4xx / 503 JSON error or a closed
connection, and a normal request must succeed right after it. Time limits in
these tests are hang guards, not measurements.
"""
from __future__ import annotations

import base64
import itertools
import json
import select
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torch import nn

from dist_awenc.server.app import make_server
from dist_awenc.server.requests import (BadRequest, MIN_BODY_BYTES, check_json_structure, decode_image,
                                       default_max_body_bytes, default_max_images)
from dist_awenc.verify.endpoint import EndpointError, RemoteModel, probe

S = 8
C = 10
GUARD = 20.0  # seconds before a test calls a hang a failure


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, C))


@pytest.fixture
def server(model):
    """``server(**limits) -> (server, url)``; each is shut down afterwards."""
    servers = []

    def start(**kw):
        srv = make_server(model, image_size=S, **kw)
        servers.append(srv)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return srv, srv.url

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _address(url: str) -> tuple[str, int]:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    return host, int(port)


def _b64_body(n: int = 2) -> bytes:
    raw = torch.rand(n, 3, S, S).numpy().astype("<f4").tobytes()
    return json.dumps({"images_b64": base64.b64encode(raw).decode(), "shape": [n, 3, S, S]}).encode()


def _request(body: bytes, ctype: str = "application/json", length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    return (f"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n"
            .encode() + body)


def _exchange(url: str, chunks, pause: float = 0.0):
    """Send ``chunks`` (pausing between them) until the server answers or hangs up -> (status, JSON) or (None, None).

    ``(None, None)`` is a connection the server closed (or reset) without an answer.
    """
    end = time.monotonic() + GUARD
    with socket.create_connection(_address(url), timeout=GUARD) as sock:
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered or hung up: stop sending
            try:
                sock.sendall(chunk)
            except OSError:
                break
            assert time.monotonic() < end, "the server let a client send for longer than the hang guard"
            time.sleep(pause)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    if not data:
        return None, None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _assert_refused(got, statuses, match: str = "") -> None:
    status, obj = got
    if status is None:
        return  # closed without an answer: allowed
    assert status in statuses, (status, obj)
    assert set(obj) == {"error"} and "\n" not in obj["error"]
    assert match.lower() in obj["error"].lower(), obj["error"]


def _assert_serves(url: str) -> None:
    status, obj = _exchange(url, [_request(_b64_body(2))])
    assert status == 200 and len(obj["labels"]) == 2 and len(obj["probabilities"][0]) == C


# ----------------------------------------------------------------------------- limits


def test_limits_derive_from_the_input_shape(server):
    assert default_max_images(8) == 1024 and default_max_images(224) == 27
    assert default_max_body_bytes(8, 1024) == MIN_BODY_BYTES  # 6.3 MB of verbose JSON: the floor wins
    assert 100 << 20 < default_max_body_bytes(224, 27) <= (128 << 20) + (64 << 10)  # 2**22 values x 32 bytes
    srv, url = server()
    assert (srv.max_images, srv.max_body_bytes) == (1024, MIN_BODY_BYTES)
    # the largest legitimate request, as verbose nested JSON, fits
    values = ", ".join(["0.12345678901234568"] * (3 * S * S))
    assert len(values) * 1024 < srv.max_body_bytes


# ----------------------------------------------------------------------------- hostile clients


def test_huge_body_refused_from_its_header(server):
    srv, url = server()
    got = _exchange(url, [_request(b"", length=200_000_000), b"[" * 1024])
    _assert_refused(got, {413}, "exceeds the limit")
    _assert_serves(url)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (1-bit grey) with a few bytes of pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_image_dimensions_checked_before_decoding(server):
    bomb = _png_header_only(20000, 20000)
    assert len(bomb) < 200
    with pytest.raises(BadRequest, match="20000x20000 pixels exceeds") as e:
        decode_image(bomb, S)
    assert e.value.status == 413
    srv, url = server()
    _assert_refused(_exchange(url, [_request(bomb, "image/png")]), {413}, "20000x20000")
    _assert_serves(url)


@pytest.mark.parametrize("body,ctype", [
    (b"GIF89a" + b"\0" * 100, "image/png"),  # another format under a PNG label
    (b"\x89PNG\r\n\x1a\n" + b"\xff" * 100, "image/png"),  # a truncated PNG
    (b'{"images": [[[[0.5]]]]}', "image/jpeg"),  # JSON under an image label
    (b"\0" * 1000, "image/jpeg"),
])
def test_non_image_payloads(server, body, ctype):
    srv, url = server()
    _assert_refused(_exchange(url, [_request(body, ctype)]), {400}, "cannot decode the image")
    _assert_serves(url)


@pytest.mark.parametrize("body", [
    b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000,
    b"{" * 100_000,
    b'{"k": "]]]]]]]]", "images": [[[[[[[[0.5]]]]]]]]}',  # brackets in a string do not hide the depth
    b'{"images": [' + b"[[]]," * 50_000 + b"[]]}",  # many small lists: parsing would build them all
    b'{"images": [' + b'"", ' * 1000 + b"0]}",  # many strings
])
def test_hostile_json_refused_before_parsing(server, body):
    srv, url = server()
    _assert_refused(_exchange(url, [_request(body)]), {400})
    assert srv.bad_requests <= 1
    _assert_serves(url)


def test_json_depth_checked_whatever_the_limits():
    deep = b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(BadRequest, match="nested more than 5 deep"):
        check_json_structure(deep, 224, 10_000)  # allows 2e7 lists: the depth walk refuses
    check_json_structure(json.dumps({"images": torch.rand(2, 3, S, S).tolist()}).encode(), S, 2)
    check_json_structure(_b64_body(3), S, 3)


def test_concurrency_cap_answers_503_at_once(server):
    srv, url = server(max_concurrent=2)
    holders = [socket.create_connection(_address(url)) for _ in range(2)]  # idle clients take both slots
    try:
        time.sleep(0.2)
        status, obj = _exchange(url, [])  # connect, send nothing: the 503 comes unasked
        assert status == 503 and "busy" in obj["error"]
        assert srv.refused_busy >= 1
    finally:
        for sock in holders:
            sock.close()
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:  # the closed holders free their slots
        status, _ = _exchange(url, [_request(_b64_body(2))])
        if status == 200:
            break
        time.sleep(0.05)
    _assert_serves(url)


def test_64_concurrent_clients(server):
    srv, url = server(max_concurrent=4)
    results = [None] * 64

    def client(i):
        try:
            results[i] = _exchange(url, [_request(_b64_body(2))])[0]
        except OSError as e:  # refused or reset at connect: a closed connection
            results[i] = type(e).__name__

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GUARD)
    assert not any(t.is_alive() for t in threads)
    assert all(r in (200, 503, None) or isinstance(r, str) for r in results), results
    assert 200 in results
    _assert_serves(url)


def test_slow_client_is_cut_off_at_the_deadline(server):
    srv, url = server(request_deadline=1.0)
    t0 = time.monotonic()
    # headers that never end, one byte at a time: each recv is quick, the request never completes
    drip = (bytes([c]) for c in itertools.cycle(b"X-a: b\r\n"))
    slow_headers = itertools.chain([b"POST /predict HTTP/1.1\r\n"], drip)
    _assert_refused(_exchange(url, slow_headers, pause=0.1), {408}, "not received within 1 s")
    # a complete header, then a body that trickles
    slow_body = itertools.chain([_request(b"", length=1000)], itertools.repeat(b" "))
    _assert_refused(_exchange(url, slow_body, pause=0.1), {408}, "not received within 1 s")
    assert time.monotonic() - t0 < GUARD
    _assert_serves(url)


def test_garbage_request_line_gets_json(server):
    srv, url = server()
    _assert_refused(_exchange(url, [b"NOT HTTP AT ALL\r\n\r\n"]), {400})
    _assert_refused(_exchange(url, [b"PUT /predict HTTP/1.0\r\n\r\n"]), {501})
    _assert_serves(url)


# ----------------------------------------------------------------------------- a hostile server


class _Hostile(BaseHTTPRequestHandler):
    """``server.mode`` picks the abuse; ``server.hits`` counts requests."""

    def log_message(self, *args):
        pass

    def _head(self, status: int, length: int | None = None, **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        if length is not None:
            self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()

    def do_GET(self):  # noqa: N802
        self.server.hits += 1
        if self.server.mode == "redirect_health":
            self._head(302, 0, Location=self.server.elsewhere + "/health")
        elif self.server.mode == "endless_health":
            self._endless()
        else:
            body = json.dumps({"status": "ok", "input_size": S, "num_classes": C, "labels_only": False}).encode()
            self._head(200, len(body))
            self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.hits += 1
        mode = self.server.mode
        if mode == "redirect":
            self._head(307, 0, Location=self.server.elsewhere + "/predict")
        elif mode == "endless":
            self._endless()
        elif mode == "huge_length":
            self._head(200, 10**12)
            self.wfile.write(b'{"labels": [')
        elif mode == "drip":
            self._head(200)  # no length: HTTP/1.0, the body runs until the connection closes
            for _ in range(int(GUARD / 0.05)):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(0.05)
        elif mode == "busy":
            self._head(503, 2)
            self.wfile.write(b"{}")

    def _endless(self) -> None:
        self._head(200)
        self.wfile.write(b'{"labels": [')
        for _ in range(100_000):  # 6.4 GB at most; ends when the client hangs up
            self.wfile.write(b"0, " * 21_000)


class _HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that give up are the point


@pytest.fixture
def hostile():
    servers = []

    def start(mode: str, elsewhere: str = ""):
        srv = _HostileServer(("127.0.0.1", 0), _Hostile)
        srv.mode, srv.hits, srv.elsewhere = mode, 0, elsewhere
        servers.append(srv)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _remote(url: str, **kw) -> RemoteModel:
    return RemoteModel(url, **{"query_budget": 100, "backoff": 0.01, "timeout": 5.0, **kw})


@pytest.mark.parametrize("mode,match", [
    ("endless", r"answered more than \d+ bytes; expected at most"),
    ("huge_length", r"announced an answer of 1000000000000 bytes; expected at most \d+"),
])
def test_oversized_answers_are_refused(hostile, mode, match):
    srv, url = hostile(mode)
    remote = _remote(url)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=match) as e:
        remote.predict_label(torch.rand(4, 3, S, S))
    assert time.monotonic() - t0 < GUARD and "\n" not in str(e.value)
    assert srv.hits == 2  # /health, then one /predict: not retried
    assert remote.queries == 4 and remote.answered == 0


def test_endless_health_is_refused(hostile):
    srv, url = hostile("endless_health")
    with pytest.raises(EndpointError, match=r"more than 65536 bytes"):
        probe(url, retries=0)


@pytest.mark.parametrize("mode", ["redirect", "redirect_health"])
def test_redirects_are_refused(hostile, mode):
    target, elsewhere = hostile("ok")
    srv, url = hostile(mode, elsewhere=elsewhere)
    with pytest.raises(EndpointError, match=r"redirected the request \(HTTP 30[27]\) to http://127\.0\.0\.1:\d+/"
                                            r"\w+; redirects are not followed") as e:
        _remote(url).predict_label(torch.rand(2, 3, S, S))
    assert "\n" not in str(e.value)
    assert target.hits == 0  # the owner's queries never reach the other host
    assert srv.hits == (1 if mode == "redirect_health" else 2)


def test_deadline_bounds_a_dripping_answer(hostile):
    srv, url = hostile("drip")
    remote = _remote(url, deadline=1.0)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=r"deadline of 1 s passed while reading its answer"):
        remote.predict_label(torch.rand(2, 3, S, S))
    assert time.monotonic() - t0 < GUARD


def test_deadline_bounds_retries(hostile):
    srv, url = hostile("busy")
    remote = _remote(url, retries=1000, backoff=0.05, deadline=1.0)
    with pytest.raises(EndpointError, match=r"deadline of 1 s .*HTTP 503") as e:
        remote.predict_label(torch.rand(2, 3, S, S))
    assert "\n" not in str(e.value)
    assert 2 <= srv.hits < 100
    with pytest.raises(EndpointError, match="deadline > 0"):
        RemoteModel(url, query_budget=1, deadline=0)
