"""Any prediction API through an adapter (#13): another wire format, nested answers, one image per request, an API key."""
from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_awenc.cli import main
from dist_awenc.verify.adapter import SERVE, load_adapter
from dist_awenc.verify.core import verify_blackbox_label
from dist_awenc.verify.endpoint import EndpointError, RemoteModel

from test_bundle import S, model, secret_path  # noqa: F401  (fixtures: the served model, a secret with a plan)

KEY = "k-3f9a-not-in-any-file"
ROOT = Path(__file__).resolve().parent.parent


class _Api(BaseHTTPRequestHandler):
    """A third-party API: POST /v2/classify {"input": {"image": <b64 PNG>}} -> {"result": {"prediction": {...}}}."""

    def log_message(self, *args):
        pass

    def _reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):  # noqa: N802
        from PIL import Image

        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/v2/classify":
            return self._reply(404, {"message": "no such route"})
        if self.headers.get("X-Api-Key") != KEY:
            return self._reply(401, {"error": "bad API key"})
        req = json.loads(body)
        png = base64.b64decode(req["input"]["image"])
        img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy()).float()
        x = (img / 255).permute(2, 0, 1)[None]
        with torch.no_grad():
            label = int(self.server.model(x).argmax(1)[0])
        self.server.requests += 1
        self.server.seen.add(png)
        self._reply(200, {"result": {"prediction": {"class_id": label, "name": f"class {label}"}},
                          "model": req.get("model")})


@pytest.fixture
def api(model):  # noqa: F811
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    server.daemon_threads = True
    server.model, server.requests, server.seen = model[0], 0, set()
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def adapter_file(tmp_path):
    text = (ROOT / "configs" / "adapters" / "example_json_png.yaml").read_text()
    text = text.replace("input_size: 32", f"input_size: {S}").replace("rate_limit: 2", "rate_limit: 0")
    path = tmp_path / "pirate.yaml"
    path.write_text(text.replace("PIRATE_API_KEY", "TEST_PIRATE_API_KEY"))
    return path


def _quantised(x):
    """What the API sees: the PNG's 8-bit values (the client rounds as adapter._png does), over 255 in float32."""
    return (x.double() * 255).round().clamp(0, 255).to(torch.uint8).float() / 255


def test_serve_yaml_is_the_default():
    assert load_adapter(ROOT / "configs" / "adapters" / "serve.yaml") == SERVE == load_adapter("")


def test_label_mode_through_an_adapter(api, adapter_file, model, secret_path, tmp_path, monkeypatch, capsys):  # noqa: F811
    server, url = api
    monkeypatch.setenv("TEST_PIRATE_API_KEY", KEY)
    common = ["verify", "--mode", "blackbox_label", "--endpoint", url, f"secret={secret_path}",
              f"run.out_dir={tmp_path}", "data.image_size=8", f"verify.adapter={adapter_file}"]
    assert main([*common, "run.name=remote"]) == 0
    remote = json.loads((tmp_path / "remote" / "verdict.json").read_text())
    assert server.requests == len(server.seen) == 99 <= 100  # one image per request, each asked once
    # in process, the same model on the same (8-bit) images: the same verdict, p-value included
    from dist_awenc.data import build_dataset, make_splits
    from dist_awenc.watermark.secret import load_secret

    ds = build_dataset("digits", image_size=S, seed=0)
    x = ds.get_batch(make_splits(len(ds), 0)["holdout"][:49])[0]
    net = model[0]
    with torch.no_grad():
        local = verify_blackbox_label(lambda b: net(_quantised(b)).argmax(1), load_secret(secret_path), x)
        floats = verify_blackbox_label(lambda b: net(b).argmax(1), load_secret(secret_path), x)
    assert (remote["p_value"], remote["effect"], remote["decision"]) == (local.p_value, local.effect, local.decision)
    assert remote["decision"] == floats.decision
    # the key's value is in no file of the run folder; its variable's name is in the bundle
    for f in (tmp_path / "remote").iterdir():
        assert KEY not in f.read_text(errors="replace"), f
    assert "TEST_PIRATE_API_KEY" in (tmp_path / "remote" / "bundle.json").read_text()
    server.shutdown()
    assert main(["verify", "--replay", str(tmp_path / "remote")]) == 0  # the adapter's answers replay offline
    capsys.readouterr()


def test_missing_or_wrong_key(api, adapter_file, secret_path, tmp_path, monkeypatch, capsys):  # noqa: F811
    server, url = api
    common = ["verify", "--mode", "blackbox_label", "--endpoint", url, f"secret={secret_path}",
              f"run.out_dir={tmp_path}", "data.image_size=8", f"verify.adapter={adapter_file}"]
    monkeypatch.delenv("TEST_PIRATE_API_KEY", raising=False)
    assert main([*common, "run.name=nokey"]) == 2
    err = capsys.readouterr().err.strip()
    assert "TEST_PIRATE_API_KEY" in err and "not set" in err and "\n" not in err
    monkeypatch.setenv("TEST_PIRATE_API_KEY", "wrong")
    assert main([*common, "run.name=wrongkey"]) == 2
    err = capsys.readouterr().err.strip()
    assert "HTTP 401" in err and "wrong" not in err.split("HTTP 401")[1]
    assert server.requests == 0
    # score mode needs probabilities, which this adapter does not have
    assert main([*common, "--mode", "blackbox_score", "run.name=score"]) == 2


def test_hardening_applies_to_adapters(api, adapter_file, monkeypatch):
    server, url = api
    monkeypatch.setenv("TEST_PIRATE_API_KEY", KEY)
    adapter = load_adapter(adapter_file)
    x = torch.rand(3, 3, S, S)
    remote = RemoteModel(url, query_budget=2, adapter=adapter)
    with pytest.raises(EndpointError, match="budget of 2"):
        remote.predict_label(x)
    assert server.requests == 0
    tiny = RemoteModel(url, query_budget=3, adapter=adapter)
    tiny._answer_limit = lambda n: 10  # an answer over the cap is refused, whatever the format
    with pytest.raises(EndpointError, match="at most 10"):
        tiny.predict_label(x)


def test_raw_and_multipart_bodies():
    from email.parser import BytesParser
    from email.policy import HTTP

    from dist_awenc.verify.adapter import Adapter

    x = torch.rand(2, 3, S, S)
    raw = Adapter(name="r", format="raw", batch=False)
    wires = raw.wire(x[:1])
    assert raw.request(x[:1], wires) == (wires[0], "image/png") and wires[0].startswith(b"\x89PNG")
    multi = Adapter(name="m", format="multipart", field="file", batch=True)
    wires = multi.wire(x)
    body, ctype = multi.request(x, wires)
    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
    parts = list(msg.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == ["file", "file"]
    assert [p.get_payload(decode=True) for p in parts] == wires
    with pytest.raises(Exception, match="one image per request"):
        Adapter(name="bad", format="raw", batch=True)
