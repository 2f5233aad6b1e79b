"""A stand-in for a pirate's prediction API, for the README's verifier path and docs/in-the-wild.md.

Not part of dist_awenc and written without its server: plain ``http.server``, its own JSON layout
(``{"input": {"image": <base64 PNG>}, "model": ...}`` in, ``{"result": {"prediction": {"class_id": ...}}}`` out),
one image per request, an API key in ``X-Api-Key`` and no health route. The model behind it is any downstream
model saved by ``awenc downstream`` (the pirate's product in the walkthrough).

    PIRATE_API_KEY=... python docs/examples/pirate_api.py MODEL_DIR --port 8765
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch
from PIL import Image

from dist_awenc.evaluate.downstream import load_downstream


class PirateApi(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _reply(self, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20))
        if self.path != "/v2/classify":
            return self._reply(404, {"message": "no such route"})
        if self.headers.get("X-Api-Key") != self.server.key:
            return self._reply(401, {"error": "bad API key"})
        try:
            png = base64.b64decode(json.loads(body)["input"]["image"])
            img = Image.open(io.BytesIO(png)).convert("RGB")
        except Exception:  # a bad request from a client, whatever it is
            return self._reply(400, {"error": "expected {\"input\": {\"image\": <base64 PNG>}}"})
        x = torch.from_numpy(np.asarray(img).copy()).float().div(255).permute(2, 0, 1)[None]
        with torch.no_grad():
            label = int(self.server.model(x).argmax(1)[0])
        self.server.requests += 1
        self._reply(200, {"result": {"prediction": {"class_id": label, "name": f"class {label}"}}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a downstream model (awenc downstream's run folder or model.safetensors)")
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    key = os.environ.get("PIRATE_API_KEY")
    if not key:
        raise SystemExit("pirate_api.py: set PIRATE_API_KEY (the key clients must send in X-Api-Key)")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), PirateApi)
    server.daemon_threads = True
    server.model, server.key, server.requests = load_downstream(args.model)[0].eval(), key, 0
    print(f"pirate API on http://127.0.0.1:{args.port}/v2/classify", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly on kill, too
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        print(f"served {server.requests} requests", flush=True)
        server.server_close()


if __name__ == "__main__":
    main()
