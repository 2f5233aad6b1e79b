"""The evidence bundle of a black-box verification (#13): hash-chained query log, resume without re-asking, replay."""
from __future__ import annotations

import base64
import json
import shutil
import threading

import pytest
import torch

from dist_awenc.cli import main
from dist_awenc.data import build_dataset, make_splits
from dist_awenc.encoders.io import build_encoder, card_for
from dist_awenc.evaluate.downstream import load_downstream, save_downstream
from dist_awenc.evaluate.probe import DownstreamModel
from dist_awenc.server.app import make_server
from dist_awenc.verify import transport
from dist_awenc.verify.evidence import GENESIS, entry_hash
from dist_awenc.verify.plan import make_plan
from dist_awenc.watermark.secret import Secret, save_secret

S, C = 8, 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    encoder = build_encoder("tiny", {"width": 8, "norm": "group"}, [0.5] * 3, [0.5] * 3, S)
    m = DownstreamModel(encoder, encoder.feature_dim, C)
    with torch.no_grad():  # spread the logits so that labels vary from image to image
        m.head.weight.mul_(20)
    card = card_for(encoder, arch="tiny", arch_kwargs={"width": 8, "norm": "group"}, method="simclr", stage="pretrain",
                    parent=None)
    path = tmp_path_factory.mktemp("bundle") / "model"
    save_downstream(m, card, C, path)
    return load_downstream(path.with_suffix(".safetensors"))[0], path.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def secret_path(tmp_path_factory):
    """A small secret with a verification plan on digits at 8 px (so verify runs inside the plan)."""
    ds = build_dataset("digits", image_size=S, seed=0)
    splits = make_splits(len(ds), 0)
    plan = make_plan(dataset="digits", dataset_size=len(ds), image_size=S, split_seed=0,
                     holdout_indices=splits["holdout"],
                     n={"whitebox": 256, "blackbox_score": 99, "blackbox_label": 99, "blackbox_collapse": 99},
                     alpha=1e-3, alternatives=0, alternatives_sha256=None, primary_mode="blackbox_label")
    torch.manual_seed(2)
    secret = Secret(key=torch.rand(3, S, S), delta=(16 / 255) * torch.sign(torch.randn(3, S, S)), eps=16 / 255,
                    control_seed=1, plan=plan)
    path = tmp_path_factory.mktemp("secret") / "secret"
    save_secret(secret, path)
    return path.with_suffix(".safetensors")


@pytest.fixture
def serve(model):
    servers = []

    def start(labels_only=False):
        server = make_server(model[0], host="127.0.0.1", port=0, labels_only=labels_only)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        host, port = server.server_address[:2]
        return server, f"http://{host}:{port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _verify(url, secret_path, out, name, mode="blackbox_label", *extra):
    return main(["verify", "--mode", mode, "--endpoint", url, f"secret={secret_path}", f"run.out_dir={out}",
                 "data.image_size=8", f"run.name={name}", "verify.endpoint_batch_size=16", *extra])


def _entries(folder):
    return [json.loads(line) for line in (folder / "queries.jsonl").read_text().splitlines()]


def _rewrite(folder, entries, rechain=False):
    prev = GENESIS
    lines = []
    for e in entries:
        if rechain:
            body = {k: v for k, v in e.items() if k != "hash"}
            body["prev"] = prev
            e = {**body, "hash": entry_hash(prev, body)}
            prev = e["hash"]
        lines.append(json.dumps(e))
    (folder / "queries.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("mode,labels_only", [("blackbox_label", True), ("blackbox_score", False),
                                              ("blackbox_collapse", True)])
def test_bundle_written_and_replayed_offline(serve, secret_path, tmp_path, capsys, mode, labels_only):
    server, url = serve(labels_only=labels_only)
    # collapse is not the plan's primary for label access: alone, it runs only as exploratory, and says so
    extra = ["verify.exploratory=true"] if mode == "blackbox_collapse" else []
    assert _verify(url, secret_path, tmp_path, "v", mode, *extra) == 0
    run = tmp_path / "v"
    for name in ("bundle.json", "queries.jsonl", "verdict.json", "report.md", "config.yaml"):
        assert (run / name).is_file(), name
    verdict = json.loads((run / "verdict.json").read_text())
    entries = _entries(run)
    assert [e["index"] for e in entries] == list(range(99)) and server.images_served == 99
    assert len({e["image_sha256"] for e in entries}) == 99
    prev = GENESIS  # every entry chains to the one before it
    for e in entries:
        assert e["prev"] == prev and e["hash"] == entry_hash(prev, {k: v for k, v in e.items() if k != "hash"})
        prev = e["hash"]
    assert verdict["evidence"]["chain_sha256"] == prev and verdict["evidence"]["entries"] == 99
    manifest = json.loads((run / "bundle.json").read_text())
    assert manifest["secret_sha256"] == verdict["secret_sha256"] and manifest["plan"]["n"][mode] == 99
    server.shutdown()  # replay needs no network
    capsys.readouterr()
    assert main(["verify", "--replay", str(run)]) == 0
    out = capsys.readouterr().out
    assert "reproduce verdict.json exactly" in out and "queries checked against the hold-out" in out
    digest = verdict["secret_sha256"]
    assert main(["verify", "--replay", str(run), "--published-sha256", digest]) == 0
    assert main(["verify", "--replay", str(run), "--published-sha256", "0" * 64]) == 2
    assert "not the published" in capsys.readouterr().err


def test_replay_names_a_tampered_response(serve, secret_path, tmp_path, capsys):
    _, url = serve(labels_only=True)
    assert _verify(url, secret_path, tmp_path, "v") == 0
    run = tmp_path / "v"
    entries = _entries(run)
    holder = next(e for e in entries if "response" in e and e["index"] > 0)
    answer = json.loads(base64.b64decode(holder["response"]))
    answer["labels"][0] = (answer["labels"][0] + 1) % C
    holder["response"] = base64.b64encode(json.dumps(answer).encode()).decode()
    bad = tmp_path / "edited"
    shutil.copytree(run, bad)
    _rewrite(bad, entries)
    capsys.readouterr()
    assert main(["verify", "--replay", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    line = entries.index(holder) + 1
    assert f"entry {line} (query {holder['index']}) was changed" in err and "\n" not in err
    # re-chaining the edited log hides the edit from the chain, not from verdict.json's final digest
    _rewrite(bad, entries, rechain=True)
    assert main(["verify", "--replay", str(bad)]) == 2
    assert "final digest" in capsys.readouterr().err
    # an entry removed breaks the chain at the next one
    shutil.rmtree(bad)
    shutil.copytree(run, bad)
    _rewrite(bad, _entries(run)[:5] + _entries(run)[6:])
    assert main(["verify", "--replay", str(bad)]) == 2
    assert "entry 6 (query 6) does not chain" in capsys.readouterr().err


def test_replay_names_a_tampered_secret(serve, secret_path, tmp_path, capsys):
    _, url = serve(labels_only=True)
    assert _verify(url, secret_path, tmp_path, "v") == 0
    run = tmp_path / "v"
    # the secret file edited: refused against its own record
    edited = tmp_path / "s1" / "secret.safetensors"
    edited.parent.mkdir()
    shutil.copy(secret_path, edited)
    shutil.copy(secret_path.with_suffix(".json"), edited.with_suffix(".json"))
    data = bytearray(edited.read_bytes())
    data[-1] ^= 1
    edited.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", "--replay", str(run), f"secret={edited}"]) == 2
    err = capsys.readouterr().err
    assert str(edited) in err and "modified" in err
    # another secret, consistent with its own record: refused against the bundle's hash
    from dist_awenc.watermark.secret import load_secret

    other = load_secret(secret_path)
    other.delta = -other.delta
    (tmp_path / "s2").mkdir()
    save_secret(other, tmp_path / "s2" / "secret")
    assert main(["verify", "--replay", str(run), f"secret={tmp_path / 's2' / 'secret.safetensors'}"]) == 2
    err = capsys.readouterr().err
    assert "s2/secret" in err and "not the bundle's" in err


def test_interrupted_verification_never_asks_twice(serve, secret_path, tmp_path, monkeypatch, capsys):
    server, url = serve(labels_only=True)
    exchange = transport._Transport.exchange
    posts = {"n": 0}

    def dies_after_three(self, url, body=None, **kw):
        if body is not None:
            posts["n"] += 1
            if posts["n"] > 3:
                raise transport.EndpointError("simulated crash of the client")
        return exchange(self, url, body, **kw)

    monkeypatch.setattr(transport._Transport, "exchange", dies_after_three)
    assert _verify(url, secret_path, tmp_path, "v") == 2
    assert "simulated crash" in capsys.readouterr().err
    asked = server.images_served
    assert 0 < asked < 99 and len(_entries(tmp_path / "v")) == asked
    monkeypatch.setattr(transport._Transport, "exchange", exchange)
    assert _verify(url, secret_path, tmp_path, "v") == 0  # the same command resumes from the log
    entries = _entries(tmp_path / "v")
    assert server.images_served == len({e["image_sha256"] for e in entries}) == 99  # no query asked twice
    verdict = json.loads((tmp_path / "v" / "verdict.json").read_text())
    assert verdict["details"]["endpoint"]["answered_from_log"] == asked
    # the same verdict as an uninterrupted run
    assert _verify(url, secret_path, tmp_path, "fresh") == 0
    fresh = json.loads((tmp_path / "fresh" / "verdict.json").read_text())
    assert (verdict["p_value"], verdict["effect"], verdict["decision"]) == (fresh["p_value"], fresh["effect"],
                                                                            fresh["decision"])
    assert main(["verify", "--replay", str(tmp_path / "v")]) == 0


def test_resume_refuses_a_broken_chain(serve, secret_path, tmp_path, monkeypatch, capsys):
    server, url = serve(labels_only=True)
    exchange = transport._Transport.exchange

    def dies(self, url, body=None, **kw):
        if body is not None and server.predict_requests >= 2:
            raise transport.EndpointError("simulated crash of the client")
        return exchange(self, url, body, **kw)

    monkeypatch.setattr(transport._Transport, "exchange", dies)
    assert _verify(url, secret_path, tmp_path, "v") == 2
    monkeypatch.setattr(transport._Transport, "exchange", exchange)
    entries = _entries(tmp_path / "v")
    entries[3]["time"] = "2000-01-01T00:00:00.000Z"
    _rewrite(tmp_path / "v", entries)
    asked = server.images_served
    capsys.readouterr()
    assert _verify(url, secret_path, tmp_path, "v") == 2
    err = capsys.readouterr().err.strip()
    assert "entry 4 (query 3) was changed" in err and "\n" not in err
    assert server.images_served == asked  # nothing was asked


def test_calibration_copy_is_checked(serve, secret_path, tmp_path, capsys):
    """A sealed calibration: the verdict carries its conformal encoder-level p, the held-out bound and the image-level
    p apart, report.md shows all three, replay reproduces them, and a changed copy is refused."""
    import shutil

    from dist_awenc.files import sha256_file
    from dist_awenc.verify.calibration import CALIBRATION_FORMAT, conditions
    from dist_awenc.watermark.secret import load_secret, seal_calibration

    own = tmp_path / "secret"
    own.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(secret_path.with_suffix(suffix), (own / "secret").with_suffix(suffix))
    secret = load_secret(own)
    ds = build_dataset("digits", image_size=S, seed=0)
    cond = conditions(secret_sha256=secret.sha256, alpha=1e-3, n={"blackbox_label": 99}, dataset="digits",
                      dataset_size=len(ds), split_seed=0, holdout_indices=make_splits(len(ds), 0)["holdout"])
    null = [{"encoder": f"e{i}", "family": f"f{i}", "heldout": i >= 19, "tau_star": 0.01 * i} for i in range(34)]
    cal = tmp_path / "cal" / "calibration.json"
    cal.parent.mkdir()
    cal.write_text(json.dumps({"format": CALIBRATION_FORMAT, "conditions": cond, "modes": {"blackbox_label": {
        "threshold": 0.05, "null": null,
        "heldout": {"false_positive_families": 0, "families": 15, "heldout_fpr_upper_95": 0.181}}}}))
    assert seal_calibration(own, sha256_file(cal), cal) == "sealed"
    assert load_secret(own).plan["calibration"] == {"sha256": sha256_file(cal), "sealed_from": secret.sha256}
    _, url = serve(labels_only=True)
    assert _verify(url, own / "secret.safetensors", tmp_path, "v", "blackbox_label") == 0  # the sealed one, unnamed
    run = tmp_path / "v"
    verdict = json.loads((run / "verdict.json").read_text())
    assert verdict["threshold"] == 0.05 and (run / "calibration.json").read_bytes() == cal.read_bytes()
    assert verdict["p_floor"] == pytest.approx(1 / 20) and verdict["heldout_fpr_upper_95"] == 0.181
    t = verdict["details"]["tau_star"]
    assert verdict["p_value"] == pytest.approx((1 + sum(0.01 * i >= t - 1e-12 for i in range(19))) / 20)
    assert verdict["decision"] is False and verdict["overall"]["left_out"]  # 1/20 cannot reach alpha = 1e-3
    report = (run / "report.md").read_text()
    assert "encoder-level p" in report and "cannot reach alpha = 0.001" in report
    assert "image-level p" in report and "not a false-positive rate" in report and "FPR <= 0.181" in report
    capsys.readouterr()
    assert main(["verify", "--replay", str(run)]) == 0
    copy = json.loads((run / "calibration.json").read_text())
    copy["modes"]["blackbox_label"]["threshold"] = 0.0
    (run / "calibration.json").write_text(json.dumps(copy))
    assert main(["verify", "--replay", str(run)]) == 2
    err = capsys.readouterr().err
    assert "calibration.json" in err and "was changed" in err
