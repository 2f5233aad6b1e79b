"""The ``awenc`` command line: one-line errors with a non-zero exit, run folders, a successful pre-training."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_overrides
from dist_awenc.cli import STAGES, main
from dist_awenc.config import PretrainConfig, load_config
from dist_awenc.encoders.io import build_encoder, card_for, save_encoder
from dist_awenc.engine.loop import Interrupted
from dist_awenc.ssl.pretrain import pretrain
from dist_awenc.watermark.secret import Secret, save_secret

AWENC = Path(sys.executable).with_name("awenc")


def _one_error_line(err: str, stage: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith(f"awenc {stage}: error:"), lines[0]
    return lines[0]


def _fails(capsys, argv: list[str]) -> str:
    """Run ``main(argv)`` in-process; it must exit 2 with one error line on stderr. Returns that line."""
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, f"exit code {rc}; stderr: {captured.err}"
    return _one_error_line(captured.err, argv[0])


def _no_complete_run(root: Path) -> None:
    for status in root.rglob("status.json"):
        assert json.loads(status.read_text())["state"] != "complete", status
    assert not list(root.rglob("encoder.safetensors"))


# ----------------------------------------------------------------------------- config errors


def test_unknown_key_lists_valid_keys(capsys, tmp_path):
    line = _fails(capsys, ["pretrain", f"run.out_dir={tmp_path}", "train.epoch=3"])
    assert "unknown config key 'train.epoch'" in line
    assert "epochs" in line and "batch_size" in line
    assert not any(tmp_path.iterdir())


def test_unknown_key_in_yaml_names_the_file(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    line = _fails(capsys, ["pretrain", "--config", str(cfg)])
    assert str(cfg) in line and "'train.epoch'" in line and "epochs" in line


def test_wrong_type(capsys):
    line = _fails(capsys, ["pretrain", "train.epochs=abc"])
    assert "train.epochs" in line and "abc" in line


def test_missing_yaml_file(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    line = _fails(capsys, ["pretrain", "--config", str(missing)])
    assert str(missing) in line and "does not exist" in line


def test_override_without_equals(capsys):
    line = _fails(capsys, ["pretrain", "train.epochs"])
    assert "'train.epochs'" in line and "key.sub=value" in line


# ----------------------------------------------------------------------------- stage errors


def test_missing_dataset_root(capsys, tmp_path):
    line = _fails(capsys, ["pretrain", f"run.out_dir={tmp_path}", "data.name=cifar10", "data.root=/nonexistent",
                           "data.image_size=8", "encoder.width=8"])
    assert "cifar10" in line and "/nonexistent" in line
    assert "download" in line and "data.root=" in line
    _no_complete_run(tmp_path)


def test_interrupted_pretraining_leaves_no_complete_run(tmp_path):
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, "cut"))
    with pytest.raises(Interrupted):
        pretrain(cfg, interrupt_at=3)
    assert json.loads((tmp_path / "cut" / "status.json").read_text())["state"] == "failed"
    _no_complete_run(tmp_path)


def _tiny_encoder_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    kw = {"width": 8, "norm": "group"}
    enc = build_encoder("tiny", kw, [0.5] * 3, [0.5] * 3, 8)
    card = card_for(enc, arch="tiny", arch_kwargs=kw, method="simclr", stage="pretrain", parent=None)
    (tmp_path / "enc").mkdir()
    save_encoder(enc, tmp_path / "enc" / "encoder", card)
    return tmp_path / "enc" / "encoder.safetensors"


def test_downstream_with_encoder_of_wrong_architecture(capsys, tmp_path):
    path = _tiny_encoder_file(tmp_path)
    card_path = path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["arch_kwargs"]["width"] = 16  # the card now promises a wider net than the weights hold
    card_path.write_text(json.dumps(card))
    line = _fails(capsys, ["downstream", f"encoder={path}", f"run.out_dir={tmp_path / 'runs'}", "data.image_size=8"])
    assert "do not fit architecture" in line and str(path) in line
    runs = tmp_path / "runs"
    assert not runs.exists() or not list(runs.rglob("model.safetensors"))
    if runs.exists():
        _no_complete_run(runs)


def _tampered_secret(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    eps = 16 / 255
    secret = Secret(key=torch.rand(3, 8, 8, generator=g), delta=eps * torch.sign(torch.randn(3, 8, 8, generator=g)),
                    eps=eps, control_seed=1)
    save_secret(secret, tmp_path / "secret")
    path = tmp_path / "secret.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def test_verify_with_tampered_secret(capsys, tmp_path):
    secret = _tampered_secret(tmp_path)
    suspect = _tiny_encoder_file(tmp_path)
    line = _fails(capsys, ["verify", f"secret={secret}", f"suspect={suspect}", f"run.out_dir={tmp_path / 'runs'}"])
    assert "SHA-256" in line and "modified" in line
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("verdict.json"))


# ----------------------------------------------------------------------------- real processes


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


@pytest.mark.parametrize("cmd,stage,expect", [
    ([str(AWENC), "pretrain", "train.epoch=3"], "pretrain", "epochs"),
    ([sys.executable, "-m", "dist_awenc", "pretrain", "data.name=cifar10", "data.root=/nonexistent",
      "data.image_size=8", "encoder.width=8"], "pretrain", "download"),
], ids=["console-script-config-error", "module-dataset-error"])
def test_subprocess_exit_code_and_one_line(tmp_path, cmd, stage, expect):
    proc = subprocess.run(cmd + [f"run.out_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=_env())
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr, stage)
    assert expect in line
    _no_complete_run(tmp_path)


def test_subprocess_tampered_secret(tmp_path):
    secret = _tampered_secret(tmp_path)
    proc = subprocess.run([str(AWENC), "verify", "--mode", "whitebox", f"secret={secret}", f"suspect={tmp_path}",
                           f"run.out_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=_env())
    assert proc.returncode == 2
    assert "modified" in _one_error_line(proc.stderr, "verify")


# ----------------------------------------------------------------------------- success and help


def test_tiny_pretrain_succeeds(capsys, tmp_path):
    rc = main(["pretrain", *tiny_overrides(tmp_path, "ok")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = tmp_path / "ok"
    for name in ("config.yaml", "metrics.jsonl", "status.json", "encoder.safetensors", "encoder.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert (run / "checkpoints").is_dir() and any((run / "checkpoints").iterdir())
    card = json.loads((run / "encoder.json").read_text())
    assert card["arch"] == "tiny" and card["input_size"] == 8 and card["method"] == "simclr"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 6 and saved["run"]["name"] == "ok"
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # the same command again refuses to overwrite the complete run
    assert main(["pretrain", *tiny_overrides(tmp_path, "ok")]) == 2
    assert "already holds a complete" in _one_error_line(capsys.readouterr().err, "pretrain")


def test_config_prints_yaml(capsys, tmp_path):
    assert main(["config", "pretrain", "train.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "batch_size" in out
    parsed = yaml.safe_load(out)
    assert parsed["train"]["batch_size"] == 32
    assert set(parsed) == {"run", "data", "views", "encoder", "ssl", "optim", "train"}
    # what it prints is a valid config file for the stage
    f = tmp_path / "c.yaml"
    f.write_text(out)
    assert load_config(PretrainConfig, f).train.batch_size == 32


def test_config_with_bad_key_fails(capsys):
    line = _fails(capsys, ["config", "pretrain", "train.epoch=3"])
    assert "epochs" in line


def test_help_lists_stages(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for stage in (*STAGES, "config"):
        assert stage in out


def test_no_stage_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    assert "usage: awenc" in capsys.readouterr().err


# ----------------------------------------------------------------------------- known bugs (documented, not fixed here)


def test_malformed_yaml_is_one_line(capsys, tmp_path):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("train:\n  epochs: [3\n")
    line = _fails(capsys, ["pretrain", "--config", str(cfg)])
    assert str(cfg) in line


def test_missing_yaml_path_printed_once(capsys, tmp_path):
    missing = tmp_path / "nope.yaml"
    line = _fails(capsys, ["pretrain", "--config", str(missing)])
    assert line.count(str(missing)) == 1


def test_yaml_section_given_a_scalar_names_the_section(capsys, tmp_path):
    cfg = tmp_path / "scalar.yaml"
    cfg.write_text("train: 3\n")
    line = _fails(capsys, ["pretrain", "--config", str(cfg)])
    assert "'train'" in line and "'None'" not in line


def test_verify_with_corrupt_downstream_card_is_one_line(capsys, tmp_path):
    g = torch.Generator().manual_seed(0)
    eps = 16 / 255
    save_secret(Secret(key=torch.rand(3, 8, 8, generator=g), delta=eps * torch.sign(torch.randn(3, 8, 8, generator=g)),
                       eps=eps, control_seed=1), tmp_path / "secret")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    (model / "model.json").write_text("{not json")
    line = _fails(capsys, ["verify", "--mode", "blackbox_score", f"secret={tmp_path / 'secret.safetensors'}",
                           f"suspect={model}", f"run.out_dir={tmp_path / 'runs'}"])
    assert "model.json" in line


def test_overrides_and_options_mix_in_any_order(capsys, tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("train: {epochs: 7}\n")
    assert main(["config", "pretrain", "run.name=before", "--config", str(cfg), "train.batch_size=32"]) == 0
    out = capsys.readouterr().out
    assert "name: before" in out and "epochs: 7" in out and "batch_size: 32" in out
    with pytest.raises(SystemExit) as e:
        main(["config", "pretrain", "--config", str(cfg), "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_secret_of_another_format_is_named_as_given(capsys, tmp_path):
    (tmp_path / "secret.pt").write_bytes(b"\x80\x04not really")
    line = _fails(capsys, ["verify", f"secret={tmp_path / 'secret.pt'}", f"suspect={tmp_path}",
                           f"run.out_dir={tmp_path / 'runs'}"])
    assert "secret.pt" in line and "safetensors" in line and "does not exist" not in line


def test_bad_generation_settings_leave_no_run_folder(capsys, tmp_path):
    line = _fails(capsys, ["watermark", "encoder=whatever", "generation.eps=-0.1", f"run.out_dir={tmp_path}"])
    assert "eps" in line
    assert not (tmp_path / "watermark").exists()
