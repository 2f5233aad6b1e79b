"""The serving path (#27 item 3): answers as class names and top-k lists, JPEG-only APIs, and `awenc serve`'s own
JPEG re-encoding and resizing, each through a live HTTP server and the evidence bundle's replay."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import yaml

from dist_awenc.cli import main
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.errors import ConfigError
from dist_awenc.server.app import make_server
from dist_awenc.server.requests import jpeg_roundtrip, serving_path
from dist_awenc.verify.adapter import Adapter, label_id
from dist_awenc.verify.core import verify_blackbox_label
from dist_awenc.verify.endpoint import EndpointError, RemoteModel
from dist_awenc.watermark.secret import load_secret

from test_bundle import C, S, _entries, _verify, model, secret_path, serve  # noqa: F401  (fixtures)

NAMES = [f"digit {i}" for i in range(C)]  # the class names a product answers with


def _answer(style: str, labels: list[int]) -> dict:
    """The same top-1 labels in another API's words."""
    second = [(v + 1) % C for v in labels]
    per_image = {
        "ints": labels,
        "names": [NAMES[v] for v in labels],
        "topk_ints": [[v, w] for v, w in zip(labels, second)],
        "topk_names": [[NAMES[v], NAMES[w]] for v, w in zip(labels, second)],
        "topk_dicts": [[{"label": NAMES[v], "score": 0.9}, {"label": NAMES[w], "score": 0.1}]
                       for v, w in zip(labels, second)],
    }[style]
    return {"model": "v3", "predictions": per_image}


class _NamesApi(BaseHTTPRequestHandler):
    """An API in awenc serve's float32 request format that answers in ``server.style``."""

    def log_message(self, *args):
        pass

    def do_POST(self):  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        x = torch.from_numpy(np.frombuffer(base64.b64decode(req["images_b64"]), "<f4").reshape(req["shape"]).copy())
        with torch.no_grad():
            labels = self.server.model(x).argmax(1).tolist()
        body = json.dumps(_answer(self.server.style, labels)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def names_api(model):  # noqa: F811
    servers = []

    def start(style):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _NamesApi)
        server.daemon_threads, server.model, server.style = True, model[0], style
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _adapter_file(tmp_path, name, **fields):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


@pytest.mark.parametrize("style,item", [("names", None), ("topk_ints", None), ("topk_names", None),
                                        ("topk_dicts", "0.label")])
def test_class_names_and_top_k_lists_give_the_integer_labels_verdict(names_api, serve, secret_path, tmp_path,  # noqa: F811
                                                                     capsys, style, item):
    _, url = serve(labels_only=True)  # the reference: awenc serve's integer labels
    assert _verify(url, secret_path, tmp_path, "ints") == 0
    ref = json.loads((tmp_path / "ints" / "verdict.json").read_text())
    server, url = names_api(style)
    adapter = _adapter_file(tmp_path, style, format="serve", health_path=None, labels="predictions",
                            probabilities=None, info={"input_size": S, "labels_only": True},
                            **({"label_item": item} if item else {}))
    assert _verify(url, secret_path, tmp_path, style, "blackbox_label", f"verify.adapter={adapter}") == 0
    got = json.loads((tmp_path / style / "verdict.json").read_text())
    # label mode compares labels for equality only: renaming the classes changes no number
    for key in ("p_value", "image_p", "effect", "n", "decision"):
        assert got[key] == ref[key], key
    assert got["details"]["labels_seen"] == ref["details"]["labels_seen"]
    if "names" in style or "dicts" in style:
        assert got["details"]["key_label"] == label_id(NAMES[ref["details"]["key_label"]])
        assert set(got["details"]["label_names"]) <= set(NAMES)
        assert got["details"]["label_names_seen"] == ref["details"]["labels_seen"]
        assert "labels answered as names" in (tmp_path / style / "report.md").read_text()
    else:
        assert got["details"]["key_label"] == ref["details"]["key_label"] and "label_names" not in got["details"]
    server.shutdown()
    capsys.readouterr()
    assert main(["verify", "--replay", str(tmp_path / style)]) == 0  # the logged raw answers are re-parsed
    assert "reproduce verdict.json exactly" in capsys.readouterr().out


def test_label_ids_are_stable_and_bad_labels_are_one_line():
    assert label_id("even") == int.from_bytes(hashlib.sha256(b"even").digest()[:8], "big") >> 1
    assert 0 <= label_id("odd") < 2**63 and label_id("even") != label_id("odd")
    remote = RemoteModel("http://127.0.0.1:9", query_budget=0, adapter=Adapter(name="t", labels="y",
                                                                                 probabilities=None))
    remote._info = {"num_classes": 2}
    ok = remote._parse(json.dumps({"y": ["even", "odd", 1, [0, 1], ["odd"]]}).encode(), 5, False)
    assert ok.tolist() == [label_id("even"), label_id("odd"), 1, 0, label_id("odd")]  # no range check on names
    assert remote.label_names == {label_id("even"): "even", label_id("odd"): "odd"}
    for bad, hint in (([1.5], ""), ([None], ""), ([[]], ""), ([True], ""), ([{"label": 1}], "label_item")):
        with pytest.raises(EndpointError, match="labels must be integers or strings, or top-k lists of them") as e:
            remote._parse(json.dumps({"y": bad}).encode(), 1, False)
        assert "\n" not in str(e.value) and hint in str(e.value)
    with pytest.raises(EndpointError, match="label 2 is out of range"):  # integers are still class indices
        remote._parse(json.dumps({"y": [[2, 0]]}).encode(), 1, False)


def test_adapter_checks_its_encoding():
    for bad, match in (({"encoding": "webp"}, "encoding 'webp'"), ({"encoding": "jpeg", "jpeg_quality": 0}, "1..95"),
                       ({"encoding": "jpeg", "jpeg_quality": 96}, "1..95"), ({"format": "serve", "batch": True, "encoding": "jpeg"},
                                                                             "format serve sends float32")):
        with pytest.raises(ConfigError, match=match):
            Adapter(name="a", **{"format": "raw", "batch": False, **bad})


def test_jpeg_queries_are_real_jpeg_and_replay_reproduces_their_bytes(serve, model, secret_path, tmp_path,  # noqa: F811
                                                                    capsys):
    from PIL import Image

    server, url = serve(labels_only=True)
    adapter = _adapter_file(tmp_path, "jpeg", format="raw", batch=False, encoding="jpeg", jpeg_quality=75,
                            labels="labels.0", probabilities=None)  # awenc serve answers a list, of one here
    assert _verify(url, secret_path, tmp_path, "jpeg", "blackbox_label", f"verify.adapter={adapter}") == 0
    got = json.loads((tmp_path / "jpeg" / "verdict.json").read_text())
    assert server.images_served == 99
    # the verifier's own queries, encoded as the adapter does: JPEG bytes, and the hashes the log holds
    secret = load_secret(secret_path)
    ds = build_dataset("digits", image_size=S, seed=0)
    x = ds.get_batch(make_splits(len(ds), 0)["holdout"][:49])[0]
    a = Adapter(name="j", format="raw", batch=False, encoding="jpeg", jpeg_quality=75, probabilities=None)
    queries = torch.cat([secret.key[None], secret.mark(x), secret.mark_control(x)])
    wires = a.wire(queries)
    assert all(w.startswith(b"\xff\xd8\xff") for w in wires) and a.request(queries[:1], wires[:1])[1] == "image/jpeg"
    assert {hashlib.sha256(w).hexdigest() for w in wires} == {e["image_sha256"] for e in _entries(tmp_path / "jpeg")}
    # what the model saw is the decoded JPEG: the in-process verdict on decoded JPEGs is the same
    net = model[0]

    def decoded(b):
        imgs = [np.asarray(Image.open(io.BytesIO(w)).convert("RGB")) for w in a.wire(b)]
        return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255

    with torch.no_grad():
        local = verify_blackbox_label(lambda b: net(decoded(b)).argmax(1), secret, x)
    assert (got["p_value"], got["image_p"], got["effect"]) == (local.p_value, local.image_p, local.effect)
    server.shutdown()
    capsys.readouterr()
    assert main(["verify", "--replay", str(tmp_path / "jpeg")]) == 0  # re-encoded, byte for byte the logged hashes
    assert "queries checked against the hold-out images" in capsys.readouterr().out


def test_serve_reencodes_as_jpeg_and_resizes(model):  # noqa: F811
    from PIL import Image

    net = model[0]
    g = torch.Generator().manual_seed(5)
    x = torch.rand(3, 3, S, S, generator=g)
    big = torch.rand(2, 3, 2 * S, 2 * S, generator=g)
    server = make_server(net, port=0, jpeg_quality=75, resize=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    plain = make_server(net, port=0)
    threading.Thread(target=plain.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        remote = RemoteModel(server.url, query_budget=20)
        assert remote.info["serving_path"] == {"jpeg_quality": 75, "resize": True}
        assert "serving_path" not in RemoteModel(plain.url, query_budget=0).info
        # arrays: each image rounded to 8 bits, re-encoded as a real PIL JPEG at q75, decoded: what the model gets
        want = []
        for img in x:
            arr = (img.permute(1, 2, 0).double() * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            back = np.asarray(jpeg_roundtrip(Image.fromarray(arr, "RGB"), 75))
            want.append(torch.from_numpy(back.copy()).permute(2, 0, 1).float() / 255)
        with torch.no_grad():
            expect = net(torch.stack(want)).softmax(1)
            assert torch.allclose(remote.predict_proba(x), expect, atol=1e-5)
            assert not torch.allclose(expect, net(x).softmax(1), atol=1e-3)  # the JPEG step changed the answers
            # another size: resized to the model's (after the JPEG step)
            remote._info = {**remote.info, "input_size": 2 * S}
            assert torch.allclose(remote.predict_proba(big), net(serving_path(big, S, 75)).softmax(1), atol=1e-5)
        # image files: the JPEG step before the (always made) resize
        png = Adapter(name="p", format="raw", batch=False, labels="labels.0", probabilities="probabilities.0")
        files = RemoteModel(server.url, query_budget=1, adapter=png)
        img = Image.open(io.BytesIO(png.wire(x[:1])[0])).convert("RGB")
        ref = torch.from_numpy(np.asarray(jpeg_roundtrip(img, 75).resize((S, S), Image.BILINEAR)).copy())
        with torch.no_grad():
            assert torch.allclose(files.predict_proba(x[:1]), net(ref.permute(2, 0, 1)[None].float() / 255).softmax(1),
                                  atol=1e-5)
        # without --resize another size is refused, as before
        other = RemoteModel(plain.url, query_budget=2)
        other._info = {**other.info, "input_size": 2 * S}
        with pytest.raises(EndpointError, match="HTTP 400.*must have shape"):
            other.predict_proba(big)
    finally:
        for s in (server, plain):
            s.shutdown()
            s.server_close()
    with pytest.raises(ConfigError, match="1..95"):
        make_server(net, port=0, jpeg_quality=100)
    assert main(["serve", "missing.safetensors", "--jpeg-quality", "75", "--resize"]) == 2  # the options parse
