"""Run folders: reuse, resume and refusal (issue #14). A complete run is never deleted; cosmetic settings
(progress bars, logging and checkpoint intervals, loader workers) never make a run "different"."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_overrides
from dist_awenc.config import PretrainConfig, load_config
from dist_awenc.errors import ConfigError
from dist_awenc.runs import COSMETIC, first_difference, open_run, reuse_or_run, run_dir_of, status

COSMETIC_CHANGES = ["train.progress=true", "train.log_every=1", "train.checkpoint_every=7", "train.keep_checkpoints=5",
                    "train.trackers=[tensorboard]", "data.num_workers=2"]


def cfg_of(tmp_path: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [f"run.out_dir={tmp_path}", "run.name=f0", "train.progress=false", *extra])


class FakeStage:
    """A stage that trains (a checkpoint, then the weights) unless told to fail first; counts its runs."""

    def __init__(self) -> None:
        self.runs = 0
        self.fail_at: str = ""  # "start": before any output; "checkpoint": after the first checkpoint

    def __call__(self, cfg) -> Path:
        self.runs += 1
        with open_run(cfg, "pretrain") as run_dir:
            if self.fail_at == "start":
                raise ValueError("no such dataset")
            ckpt = run_dir / "checkpoints" / "step_00000001"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "model.safetensors").write_text(f"weights at step 1 of run {self.runs}")
            if self.fail_at == "checkpoint":
                raise RuntimeError("node lost")
            (run_dir / "encoder.safetensors").write_text(f"weights of run {self.runs}")
        return run_dir / "encoder.safetensors"


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_cosmetic_change_reuses_the_complete_run(tmp_path):
    stage = FakeStage()
    first = reuse_or_run(cfg_of(tmp_path), stage, "encoder.safetensors")
    before = snapshot(first.parent)
    for change in COSMETIC_CHANGES + [",".join(COSMETIC_CHANGES)]:
        again = reuse_or_run(cfg_of(tmp_path, *change.split(",")), stage, "encoder.safetensors")
        assert again == first
    assert stage.runs == 1  # never retrained
    assert snapshot(first.parent) == before  # config.yaml included: the folder still says what made it


def test_a_real_change_is_refused_naming_the_field_and_nothing_is_deleted(tmp_path):
    stage = FakeStage()
    out = reuse_or_run(cfg_of(tmp_path), stage, "encoder.safetensors")
    before = snapshot(out.parent)
    for change, named in [("train.epochs=11", "train.epochs was 10, now 11"), ("optim.lr=0.5", "optim.lr was 0.002, now 0.5"),
                          ("run.seed=3", "run.seed was 0, now 3"), ("encoder.norm=batch", "encoder.norm was 'group', now 'batch'")]:
        with pytest.raises(ConfigError) as e:
            reuse_or_run(cfg_of(tmp_path, "train.progress=true", change), stage, "encoder.safetensors")
        msg = str(e.value)
        assert named in msg and "\n" not in msg and "nothing was deleted" in msg, msg
    assert stage.runs == 1
    assert snapshot(out.parent) == before and status(out.parent)["state"] == "complete"


def test_an_unfinished_run_resumes_with_a_cosmetic_change_and_refuses_a_real_one(tmp_path):
    stage = FakeStage()
    stage.fail_at = "checkpoint"
    with pytest.raises(RuntimeError, match="node lost"):
        reuse_or_run(cfg_of(tmp_path), stage, "encoder.safetensors")
    run_dir = run_dir_of(cfg_of(tmp_path))
    before = snapshot(run_dir)
    stage.fail_at = ""
    with pytest.raises(ConfigError, match=r"unfinished pretrain run with another config \(train.epochs was 10, now 3\)"):
        reuse_or_run(cfg_of(tmp_path, "train.epochs=3"), stage, "encoder.safetensors")
    assert snapshot(run_dir) == before  # the checkpoint is kept
    # the same run with a progress bar resumes
    out = reuse_or_run(cfg_of(tmp_path, "train.progress=true"), stage, "encoder.safetensors")
    assert out.read_text() == "weights of run 3" and status(run_dir)["state"] == "complete"


def test_a_run_that_failed_before_its_first_step_does_not_block_the_corrected_command(tmp_path):
    stage = FakeStage()
    stage.fail_at = "start"
    with pytest.raises(ValueError, match="no such dataset"):
        reuse_or_run(cfg_of(tmp_path, "data.name=typo"), stage, "encoder.safetensors")
    run_dir = run_dir_of(cfg_of(tmp_path))
    assert status(run_dir)["state"] == "failed" and (run_dir / "config.yaml").exists()
    (run_dir / "slurm").mkdir()  # `awenc submit`'s job folder is no output
    (run_dir / "slurm" / "jobs.json").write_text(json.dumps({"submissions": []}))
    stage.fail_at = ""
    out = reuse_or_run(cfg_of(tmp_path), stage, "encoder.safetensors")
    assert out.exists() and status(run_dir)["state"] == "complete"
    assert "name: digits" in (run_dir / "config.yaml").read_text() and (run_dir / "slurm" / "jobs.json").exists()


def test_a_run_that_may_still_be_running_is_not_taken_over(tmp_path):
    """status "running" and no outputs yet: possibly a live job before its first step, so a new config is refused."""
    cfg = cfg_of(tmp_path)
    run_dir = run_dir_of(cfg)
    with pytest.raises(KeyboardInterrupt):
        with open_run(cfg, "pretrain"):
            raise KeyboardInterrupt
    (run_dir / "status.json").write_text(json.dumps({"stage": "pretrain", "state": "running", "started": 0}))
    with pytest.raises(ConfigError, match="train.epochs was 10, now 2"):
        with open_run(cfg_of(tmp_path, "train.epochs=2"), "pretrain"):
            pass
    assert status(run_dir)["state"] == "running"


def test_first_difference():
    old = {"run": {"name": "a", "out_dir": "x", "seed": 0}, "train": {"progress": False, "epochs": 1},
           "pretrain": {"progress": True}, "data": {"num_workers": 0, "name": "digits"},
           "encoders": {"progress": "/a.safetensors"}}
    same = {"run": {"name": "b", "out_dir": "/abs/x", "seed": 0}, "train": {"progress": True, "epochs": 1},
            "pretrain": {"progress": False}, "data": {"num_workers": 8, "name": "digits"},
            "encoders": {"progress": "/a.safetensors"}}
    sections = ["run", "train", "pretrain", "data"]
    assert first_difference(old, same, sections) is None
    # a cosmetic name counts only as a section's field, not as a key of a mapping (a sweep target named "progress")
    assert first_difference(old, {**same, "encoders": {"progress": "/b.safetensors"}}, sections) == (
        "encoders.progress", "/a.safetensors", "/b.safetensors")
    assert first_difference(old, {**same, "run": {**same["run"], "seed": 1}}, sections) == ("run.seed", 0, 1)
    assert first_difference(old, {**same, "extra": 1}, sections) == ("extra", "<absent>", 1)
    assert first_difference(old, same)[0] == "train.progress"  # without sections, only dotted paths are cosmetic
    assert {"progress", "checkpoint_every", "num_workers", "run.name"} <= COSMETIC and "epochs" not in COSMETIC


def test_real_pretraining_is_reused_with_a_progress_bar(tmp_path):
    """The case of issue #14: a finished pre-training rerun with train.progress=true is reused, not wiped."""
    from dist_awenc.ssl.pretrain import pretrain

    base = tiny_overrides(tmp_path, "f0", **{"train.max_steps": 3})
    out = reuse_or_run(load_config(PretrainConfig, None, base), pretrain, "encoder.safetensors")
    before = snapshot(out.parent)

    def must_not_train(cfg):
        raise AssertionError("retrained")

    again = reuse_or_run(load_config(PretrainConfig, None, base + ["train.progress=true", "train.log_every=2"]),
                         must_not_train, "encoder.safetensors")
    assert again == out and snapshot(out.parent) == before


def _folder_from_before(tmp_path, name: str, cfg, *fields: str):
    """A run folder whose config.yaml is ``cfg``'s without ``fields`` (dotted paths): written before they existed."""
    import yaml

    from dist_awenc.config import to_yaml

    old = yaml.safe_load(to_yaml(cfg))
    for path in fields:
        *parents, last = path.split(".")
        node = old
        for key in parents:
            node = node[key]
        del node[last]
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(old))
    return tmp_path / name


def test_a_folder_from_before_a_field_existed_is_the_same_run_at_its_default(tmp_path):
    """data.splits, verify.classes and downstream's classes were added later at the values old runs used."""
    from dist_awenc.config import DownstreamConfig
    from dist_awenc.runs import config_difference

    cfg = load_config(DownstreamConfig, None, [f"run.out_dir={tmp_path}", "run.name=d", "encoder=f0.safetensors"])
    _folder_from_before(tmp_path, "d", cfg, "data.splits", "classes")
    assert config_difference(tmp_path / "d", cfg) is None
    other = load_config(DownstreamConfig, None, [f"run.out_dir={tmp_path}", "run.name=d", "encoder=f0.safetensors",
                                                 "data.splits=[0.8,0.1,0.1]"])
    assert config_difference(tmp_path / "d", other)[0] == "data.splits"
    two = load_config(DownstreamConfig, None, [f"run.out_dir={tmp_path}", "run.name=d", "encoder=f0.safetensors", "classes=2"])
    assert config_difference(tmp_path / "d", two)[0] == "classes"


def test_a_folder_from_before_the_robust_section_is_the_same_run_as_robust_off(tmp_path):
    """A run written before `robust:` existed is reused by a config holding it at its defaults (off), not with it on."""
    from dist_awenc.config import WatermarkConfig
    from dist_awenc.runs import config_difference

    cfg = load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=wm", "encoder=f0.safetensors"])
    _folder_from_before(tmp_path, "wm", cfg, "robust")
    assert config_difference(tmp_path / "wm", cfg) is None
    on = load_config(WatermarkConfig, None, [f"run.out_dir={tmp_path}", "run.name=wm", "encoder=f0.safetensors",
                                             "robust.transforms=[jpeg]"])
    assert config_difference(tmp_path / "wm", on)[0] == "robust"


def test_a_folder_from_before_reference_archs_is_the_same_run_without_them(tmp_path):
    """rehearsal.reference_archs was added at [] (references of f0's architecture only), in watermark and calibrate
    configs alike (a calibration's secret_i folders are watermark runs); a listed architecture is another run."""
    from dist_awenc.config import WatermarkConfig
    from dist_awenc.runs import config_difference

    base = [f"run.out_dir={tmp_path}", "run.name=wm", "encoder=f0.safetensors", "rehearsal.references=2"]
    cfg = load_config(WatermarkConfig, None, base)
    _folder_from_before(tmp_path, "wm", cfg, "rehearsal.reference_archs")
    assert config_difference(tmp_path / "wm", cfg) is None
    more = load_config(WatermarkConfig, None, base + ["rehearsal.reference_archs=[tiny_resnet:16]"])
    assert config_difference(tmp_path / "wm", more)[0] == "rehearsal.reference_archs"


def test_a_pretraining_folder_from_before_views_crop_is_the_same_run_at_device(tmp_path):
    """views.crop was added at ``device``, how every earlier run cut its views; ``decode`` is another run."""
    from dist_awenc.runs import config_difference

    base = [f"run.out_dir={tmp_path}", "run.name=p"]
    cfg = load_config(PretrainConfig, None, base)
    _folder_from_before(tmp_path, "p", cfg, "views.crop")
    assert config_difference(tmp_path / "p", cfg) is None
    assert config_difference(tmp_path / "p", load_config(PretrainConfig, None, base + ["views.crop=decode"]))[0] == "views.crop"


def test_a_folder_from_before_data_bad_files_is_the_same_run_at_skip(tmp_path):
    """data.bad_files was added at ``skip``, which reads every readable file as before; ``refuse`` is another run."""
    from dist_awenc.runs import config_difference

    base = [f"run.out_dir={tmp_path}", "run.name=p"]
    cfg = load_config(PretrainConfig, None, base)
    _folder_from_before(tmp_path, "p", cfg, "data.bad_files")
    assert config_difference(tmp_path / "p", cfg) is None
    refuse = load_config(PretrainConfig, None, base + ["data.bad_files=refuse"])
    assert config_difference(tmp_path / "p", refuse)[0] == "data.bad_files"
