"""The live prediction API: ``dist_awenc.server.app`` (server) and ``dist_awenc.verify.endpoint`` (client), on loopback."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from dist_awenc.encoders.io import build_encoder, card_for
from dist_awenc.evaluate.downstream import load_downstream, save_downstream
from dist_awenc.evaluate.probe import DownstreamModel
from dist_awenc.server.app import make_server
from dist_awenc.verify.core import verify_blackbox_label, verify_blackbox_score
from dist_awenc.verify.endpoint import EndpointError, RemoteModel, probe
from dist_awenc.watermark.secret import Secret

HANG_GUARD_S = 60  # a request to the local server takes well under a second: a hang guard, not a speed check

S = 8
C = 10
ARCH_KWARGS = {"width": 8, "norm": "group"}
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(0)
    encoder = build_encoder("tiny", ARCH_KWARGS, [0.5] * 3, [0.5] * 3, S)
    model = DownstreamModel(encoder, encoder.feature_dim, C)
    with torch.no_grad():  # spread the logits so that labels vary from image to image
        model.head.weight.mul_(20)
    card = card_for(encoder, arch="tiny", arch_kwargs=ARCH_KWARGS, method="simclr", stage="pretrain", parent=None)
    path = tmp_path_factory.mktemp("serve") / "model"
    save_downstream(model, card, C, path)
    return path.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def model(model_path):
    m, _ = load_downstream(model_path)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.rand(64, 3, S, S, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def secret():
    torch.manual_seed(2)
    return Secret(key=torch.rand(3, S, S), delta=(16 / 255) * torch.sign(torch.randn(3, S, S)), eps=16 / 255,
                  control_seed=1)


def _start(server):
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def _stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture
def serve_model(model):
    """``serve_model(labels_only=False, **kw) -> (server, url)``; every server is shut down afterwards."""
    servers = []

    def start(labels_only=False, **kw):
        server = make_server(model, host="127.0.0.1", port=0, labels_only=labels_only, **kw)
        servers.append(server)
        return server, _start(server)

    yield start
    for server in servers:
        _stop(server)


def _post(url, body: bytes, ctype="application/json"):
    """POST -> (status, parsed JSON body)."""
    req = urllib.request.Request(url + "/predict", data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with NO_PROXY.open(req, timeout=HANG_GUARD_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url, path):
    try:
        with NO_PROXY.open(url + path, timeout=HANG_GUARD_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _b64_body(x: torch.Tensor) -> bytes:
    raw = x.numpy().astype("<f4").tobytes()
    return json.dumps({"images_b64": base64.b64encode(raw).decode(), "shape": list(x.shape)}).encode()


def _png(arr: np.ndarray, fmt="PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the server


def test_health(serve_model):
    server, url = serve_model()
    status, obj = _get(url, "/health")
    assert status == 200
    assert {k: obj[k] for k in ("status", "input_size", "num_classes", "labels_only")} == \
        {"status": "ok", "input_size": S, "num_classes": C, "labels_only": False}
    assert probe(url + "/predict")["num_classes"] == C  # a /predict URL is accepted too
    _, obj = _get(serve_model(labels_only=True)[1], "/health")
    assert obj["labels_only"] is True


def test_json_and_b64_match_in_process(serve_model, model, images):
    server, url = serve_model()
    x = images[:16]
    with torch.no_grad():
        want_labels = model(x).argmax(1).tolist()
        want_p = model.predict_proba(x)
    status, a = _post(url, json.dumps({"images": x.tolist()}).encode())
    assert status == 200
    status, b = _post(url, _b64_body(x))
    assert status == 200
    assert a["labels"] == b["labels"] == want_labels
    assert len(set(want_labels)) > 1  # the toy model does not answer a constant
    for obj in (a, b):
        p = torch.tensor(obj["probabilities"])
        assert p.shape == (16, C)
        assert torch.allclose(p.sum(1), torch.ones(16), atol=1e-5)
        assert torch.allclose(p, want_p, atol=1e-6)
        assert p.argmax(1).tolist() == want_labels
    assert server.predict_requests == 2 and server.images_served == 32


def test_image_bytes(serve_model, model):
    server, url = serve_model()
    arr = np.random.default_rng(0).integers(0, 256, size=(S, S, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1).float().div(255)[None]
    with torch.no_grad():
        want = model(x).argmax(1).tolist()
        want_p = model.predict_proba(x)
    status, obj = _post(url, _png(arr), "image/png")
    assert status == 200 and obj["labels"] == want
    assert torch.allclose(torch.tensor(obj["probabilities"]), want_p, atol=1e-6)
    big = np.random.default_rng(1).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)  # resized to S x S
    status, obj = _post(url, _png(big, "JPEG"), "image/jpeg")
    assert status == 200 and len(obj["labels"]) == 1 and len(obj["probabilities"][0]) == C
    status, obj = _post(url, b"\x89PNG not really", "image/png")
    assert status == 400 and "decode" in obj["error"]
    assert server.images_served == 2


def test_labels_only(serve_model, model, images):
    server, url = serve_model(labels_only=True)
    status, obj = _post(url, _b64_body(images[:5]))
    assert status == 200 and set(obj) == {"labels"}
    with torch.no_grad():
        assert obj["labels"] == model(images[:5]).argmax(1).tolist()
    remote = RemoteModel(url, query_budget=100)
    with pytest.raises(EndpointError, match="labels only"):
        remote.predict_proba(images[:3])
    assert remote.queries == 0 and server.images_served == 5
    assert remote.predict_label(images[:3]).tolist() == obj["labels"][:3]


@pytest.mark.parametrize("body,ctype,status,match", [
    (json.dumps({"images": torch.rand(2, 3, S + 1, S).tolist()}), "application/json", 400, "shape"),
    (json.dumps({"images": torch.rand(2, 1, S, S).tolist()}), "application/json", 400, "shape"),
    (json.dumps({"images": (torch.rand(2, 3, S, S) * 2).tolist()}), "application/json", 400, r"outside \[0, 1\]"),
    (json.dumps({"images": [[[[0.5, float("nan")]]]]}), "application/json", 400, "shape"),
    (json.dumps({"images": [[1, 2], [3]]}), "application/json", 400, "nested list"),
    (json.dumps({"images": [["a"]]}), "application/json", 400, "nested list"),
    ("{not json", "application/json", 400, "not valid JSON"),
    ("[1, 2]", "application/json", 400, "JSON object"),
    (json.dumps({"pixels": []}), "application/json", 400, "images"),
    (json.dumps({"images_b64": "@@@", "shape": [1, 3, S, S]}), "application/json", 400, "base64"),
    (json.dumps({"images_b64": base64.b64encode(b"\0" * 12).decode(), "shape": [1, 3, S, S]}), "application/json",
     400, "bytes"),
    (json.dumps({"images_b64": "", "shape": [0, 3, S, S]}), "application/json", 400, "no images"),
    (json.dumps({"images_b64": "", "shape": "1,3,8,8"}), "application/json", 400, "shape"),
    ("hello", "text/plain", 415, "Content-Type"),
])
def test_bad_requests(serve_model, body, ctype, status, match):
    server, url = serve_model()
    got, obj = _post(url, body.encode(), ctype)
    assert got == status
    assert set(obj) == {"error"} and "\n" not in obj["error"]
    assert re.search(match, obj["error"]), obj["error"]
    assert server.images_served == 0 and server.bad_requests == 1


def test_limits_and_paths(serve_model):
    server, url = serve_model(max_images=4, max_body_bytes=50_000)
    got, obj = _post(url, _b64_body(torch.rand(5, 3, S, S)))
    assert got == 400 and "at most 4" in obj["error"]
    got, obj = _post(url, b" " * 50_001)
    assert got == 413 and "limit" in obj["error"]
    nan = torch.rand(1, 3, S, S)
    nan[0, 0, 0, 0] = float("nan")
    got, obj = _post(url, _b64_body(nan))
    assert got == 400 and "outside" in obj["error"]
    assert _get(url, "/nope")[0] == 404
    assert _get(url, "/predict")[0] == 405
    req = urllib.request.Request(url + "/other", data=b"{}", headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        NO_PROXY.open(req, timeout=HANG_GUARD_S)
    assert e.value.code == 404
    assert server.images_served == 0


def test_concurrent_clients(serve_model, model, images):
    server, url = serve_model()
    with torch.no_grad():
        want = model(images).argmax(1)
    results, errors = {}, []

    def client(i):
        try:
            remote = RemoteModel(url, query_budget=64, batch_size=5)
            results[i] = remote.predict_label(images[i * 16 : (i + 1) * 16])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert torch.equal(torch.cat([results[i] for i in range(4)]), want)
    assert server.images_served == 64 and server.predict_requests == 4 * 4


# ----------------------------------------------------------------------------- the client and the query budget


def test_budget_is_exact(serve_model, images, secret):
    server, url = serve_model(labels_only=True)
    remote = RemoteModel(url, query_budget=99)
    verdict = verify_blackbox_label(remote.predict_label, secret, images[:49])
    assert verdict.details["queries"] == 99
    assert remote.queries == remote.answered == 99 and remote.remaining == 0
    assert server.images_served == 99
    with pytest.raises(EndpointError, match="query budget of 99 exhausted: 1 more queries needed"):
        remote.predict_label(images[:1])
    assert server.images_served == 99

    server2, url2 = serve_model(labels_only=True)
    remote = RemoteModel(url2, query_budget=98)
    with pytest.raises(EndpointError, match="query budget of 98 exhausted: 49 more queries needed"):
        verify_blackbox_label(remote.predict_label, secret, images[:49])
    assert server2.images_served <= 98
    assert server2.images_served == remote.queries == 50  # key + marked; the control batch was never sent


def test_budget_checked_before_sending_and_inputs_checked(serve_model, images):
    server, url = serve_model()
    remote = RemoteModel(url, query_budget=10, batch_size=4)
    with pytest.raises(EndpointError, match="query budget of 10 exhausted: 11 more"):
        remote.predict_label(images[:11])  # would fit in part; nothing is sent
    with pytest.raises(EndpointError, match="8 px"):
        remote.predict_label(torch.rand(2, 3, 16, 16))
    with pytest.raises(EndpointError, match=r"\[0, 1\]"):
        remote.predict_label(images[:2] * 3)
    assert remote.queries == 0 and server.images_served == 0
    assert remote.predict_label(images[:10]).shape == (10,)
    assert remote.requests == 3 and server.predict_requests == 3  # batches of 4, 4, 2
    assert remote.predict_label(images[:0]).shape == (0,)


def test_label_verdict_matches_in_process(serve_model, model, images, secret):
    server, url = serve_model()
    local = verify_blackbox_label(lambda b: model(b).argmax(1), secret, images[:40])
    remote = RemoteModel(url, query_budget=81, batch_size=256)
    via = verify_blackbox_label(remote.predict_label, secret, images[:40])
    assert via.image_p == local.image_p and via.effect == local.effect
    assert via.details == local.details and via.decision == local.decision

    local_s = verify_blackbox_score(model.predict_proba, secret, images[:20])
    remote_s = RemoteModel(url, query_budget=60, batch_size=256)
    via_s = verify_blackbox_score(remote_s.predict_proba, secret, images[:20])
    assert via_s.image_p == pytest.approx(local_s.image_p, rel=1e-6)
    assert remote_s.queries == 60


def test_server_down(images):
    url = f"http://127.0.0.1:{_free_port()}"
    remote = RemoteModel(url, query_budget=10, retries=2, backoff=0.05, timeout=2)
    t0 = time.monotonic()
    with pytest.raises(EndpointError) as e:
        remote.predict_label(images[:2])
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert url in msg and "3 attempts" in msg and "\n" not in msg
    assert remote.queries == 0  # refused connections never reached a server
    with pytest.raises(EndpointError, match=url):
        probe(url, retries=0)
    with pytest.raises(EndpointError, match="not an http"):
        RemoteModel("ftp://example.org", query_budget=1)


# ----------------------------------------------------------------------------- misbehaving servers


class _Fake(BaseHTTPRequestHandler):
    """Behaviour set on the server: ``server.mode`` and a count of POSTs in ``server.posts``."""

    def log_message(self, *args):
        pass

    def _reply(self, status, body: bytes, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        if self.server.mode == "no_health":
            self._reply(404, b'{"error": "no"}')
        else:
            self._reply(200, json.dumps({"status": "ok", "input_size": S, "num_classes": C,
                                         "labels_only": False}).encode())

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["shape"][0]
        self.server.posts += 1
        self.server.images += n
        mode = self.server.mode
        if mode == "not_json":
            self._reply(200, b"not json", "text/plain")
        elif mode == "wrong_count":
            self._reply(200, json.dumps({"labels": [0] * (n + 1)}).encode())
        elif mode == "out_of_range":
            self._reply(200, json.dumps({"labels": [C] * n}).encode())
        elif mode == "no_labels":
            self._reply(200, json.dumps({"answer": 3}).encode())
        elif mode == "float_labels":
            self._reply(200, json.dumps({"labels": [0.5] * n}).encode())
        elif mode == "bad_proba":
            self._reply(200, json.dumps({"probabilities": [[0.5] * C] * n, "labels": [0] * n}).encode())
        elif mode == "reject":
            self._reply(400, b'{"error": "go away"}')
        elif mode == "slow":
            time.sleep(1.0)
            self._reply(200, json.dumps({"labels": [0] * n}).encode())
        elif mode in ("flaky", "no_health"):
            if mode == "flaky" and self.server.posts == 1:
                self._reply(500, b'{"error": "overloaded"}')
            else:
                p = [[1.0 / C] * C] * n
                self._reply(200, json.dumps({"probabilities": p, "labels": [1] * n}).encode())


class _FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the "slow" mode writes to clients that gave up waiting


@pytest.fixture
def fake():
    servers = []

    def start(mode):
        server = _FakeServer(("127.0.0.1", 0), _Fake)
        server.mode, server.posts, server.images = mode, 0, 0
        servers.append(server)
        return server, _start(server)

    yield start
    for server in servers:
        _stop(server)


@pytest.mark.parametrize("mode,match", [
    ("not_json", "not JSON"),
    ("wrong_count", "got 5 labels for 4 images"),
    ("out_of_range", "label 10 is out of range"),
    ("no_labels", "no 'labels'"),
    ("float_labels", "integers"),
])
def test_garbage_answers(fake, images, mode, match):
    server, url = fake(mode)
    remote = RemoteModel(url, query_budget=100, backoff=0.01)
    with pytest.raises(EndpointError, match=match) as e:
        remote.predict_label(images[:4])
    assert "\n" not in str(e.value)
    assert server.posts == 1  # a well-formed HTTP answer with a bad body is not retried


def test_bad_probabilities(fake, images):
    server, url = fake("bad_proba")
    with pytest.raises(EndpointError, match="probability vectors"):
        RemoteModel(url, query_budget=100).predict_proba(images[:3])


def test_4xx_is_not_retried(fake, images):
    server, url = fake("reject")
    remote = RemoteModel(url, query_budget=100, backoff=0.01)
    with pytest.raises(EndpointError, match=r"HTTP 400\): go away"):
        remote.predict_label(images[:4])
    assert server.posts == 1 and remote.queries == 4


def test_500_then_ok_is_retried(fake, images):
    server, url = fake("flaky")
    remote = RemoteModel(url, query_budget=100, backoff=0.01)
    assert remote.predict_label(images[:4]).tolist() == [1] * 4
    assert server.posts == 2
    assert remote.queries == 8 and remote.answered == 4  # the failed attempt may have been seen: it counts


def test_retry_does_not_exceed_budget(images):
    # a fresh flaky server: the first attempt uses 4 of 6 queries, the retry would need 4 more
    server = _FakeServer(("127.0.0.1", 0), _Fake)
    server.mode, server.posts, server.images = "flaky", 0, 0
    url = _start(server)
    try:
        remote = RemoteModel(url, query_budget=6, backoff=0.01)
        with pytest.raises(EndpointError, match="budget of 6 exhausted.*cannot retry after: HTTP 500: overloaded"):
            remote.predict_label(images[:4])
        assert server.images == 4 and remote.queries == 4
    finally:
        _stop(server)


def test_timeout_is_retried_then_fails(fake, images):
    server, url = fake("slow")
    remote = RemoteModel(url, query_budget=100, timeout=0.2, retries=1, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match="2 attempts"):
        remote.predict_label(images[:2])
    # a hang guard, not a speed check: two 0.2 s timeouts take ~0.5 s (a client that ignored its timeout would
    # get the 1 s reply and no EndpointError, which pytest.raises catches)
    assert time.monotonic() - t0 < 6
    assert remote.queries == 4


def test_no_health_endpoint(fake, images):
    server, url = fake("no_health")
    remote = RemoteModel(url, query_budget=10)
    assert remote.info == {}
    assert remote.predict_proba(images[:2]).shape == (2, C)


# ----------------------------------------------------------------------------- serve() as a process


def test_serve_process_and_ctrl_c(model_path, images, model):
    code = ("import sys; from dist_awenc.server.app import serve; "
            "serve(sys.argv[1], host='127.0.0.1', port=0, labels_only=True)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # as from a terminal: a runner started in the background (`cmd &` without job control) ignores SIGINT, and a
    # child inherits that, so Python would install no KeyboardInterrupt handler and Ctrl-C would do nothing
    proc = subprocess.Popen([sys.executable, "-c", code, str(model_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith(f"serving {model_path} on http://127.0.0.1:") and line.endswith("/predict (labels only)")
        url = line.split(" on ", 1)[1].split(" ", 1)[0]
        remote = RemoteModel(url, query_budget=3)
        with torch.no_grad():
            assert torch.equal(remote.predict_label(images[:3]), model(images[:3]).argmax(1))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "3 images" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_cli_verify_against_a_live_endpoint(serve_model, model, model_path, secret, tmp_path, capsys):
    """`awenc verify --mode blackbox_label --endpoint URL`: at most 100 queries, same verdict as the saved model."""
    import json

    from dist_awenc.cli import main
    from dist_awenc.watermark.secret import save_secret

    save_secret(secret, tmp_path / "secret")
    server, url = serve_model(labels_only=True)
    # a hand-made secret carries no verification plan: verifying with it is exploratory, and said so
    common = [f"secret={tmp_path / 'secret.safetensors'}", f"run.out_dir={tmp_path}", "data.image_size=8",
              "verify.exploratory=true"]
    assert main(["verify", "--mode", "blackbox_label", "--endpoint", url + "/predict", "run.name=remote", *common]) == 0
    assert server.images_served <= 100
    remote = json.loads((tmp_path / "remote" / "verdict.json").read_text())
    assert remote["details"]["endpoint"]["queries"] == server.images_served == 99
    assert main(["verify", "--mode", "blackbox_label", f"suspect={model_path}", "run.name=local", *common]) == 0
    local = json.loads((tmp_path / "local" / "verdict.json").read_text())
    assert remote["p_value"] == local["p_value"] and remote["decision"] == local["decision"]
    # score mode against a labels-only server is a one-line error, not a traceback
    assert main(["verify", "--mode", "blackbox_score", "--endpoint", url, "run.name=bad", *common]) == 2
    assert "labels only" in capsys.readouterr().err
