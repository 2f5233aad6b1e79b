"""`awenc ablation`: the comparison table reads robustness runs, their calibrations and the stages' cost."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dist_awenc.cli import main
from dist_awenc.config import to_yaml
from dist_awenc.encoders.io import build_encoder, card_for, save_encoder
from dist_awenc.robustness import RobustnessConfig
from dist_awenc.verify.calibration import CALIBRATION_FORMAT
from dist_awenc.verify.core import MODES


def _status(folder: Path, seconds: float, state: str = "complete") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "status.json").write_text(json.dumps({"state": state, "seconds": seconds}))


def _variant(root: Path, name: str, detected: dict[str, int], of: int, probe: float, heldout_fp: int) -> Path:
    """A collected robustness run and its calibration, measured in the modes ``detected`` names."""
    modes = list(detected)
    cal = root / f"cal_{name}" / "calibration.json"
    cal.parent.mkdir(parents=True)
    cal.write_text(json.dumps({"format": CALIBRATION_FORMAT, "conditions": {}, "modes": {
        m: {"threshold": 0.01, "heldout": {"false_positive_families": heldout_fp, "families": 15,
                                           "heldout_fpr_upper_95": 0.181}} for m in modes}}))
    rob = root / f"rob_{name}"
    rob.mkdir()
    cfg = RobustnessConfig()
    cfg.verify.calibration = str(cal)
    (rob / "config.yaml").write_text(to_yaml(cfg))
    (rob / "robustness.json").write_text(json.dumps({"thresholds": {m: 0.01 for m in modes}, "modes": {
        m: {"tpr": detected[m] / of, "detected": detected[m], "of": of, "missed": ["distill@30"] * (of - detected[m])}
        for m in modes}}))
    with (rob / "robustness.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["attack", "strength", "seed", "linear_probe", "knn"])
        w.writeheader()
        w.writerow({"attack": "none", "strength": 0, "seed": 0, "linear_probe": probe, "knn": probe - 0.05})
        w.writerow({"attack": "distill", "strength": 30, "seed": 0, "linear_probe": 0.5, "knn": 0.5})
    for stage, s in (("watermark", 30.0), ("embed", 20.0)):
        _status(root / f"{name}_{stage}", s)
    return rob


def test_ablation_table_compares_variants_against_the_clean_encoder(tmp_path):
    f0 = tmp_path / "f0"
    enc = build_encoder("tiny", {"width": 4, "norm": "group"}, [0.5] * 3, [0.5] * 3, 16)
    f0.mkdir()
    save_encoder(enc, f0 / "encoder", card_for(enc, arch="tiny", arch_kwargs={"width": 4, "norm": "group"},
                                               method="simclr", stage="pretrain", parent=None))
    _status(f0, 100.0)
    # plain was measured before collapse mode existed: its column reads n/a, and both's is filled
    plain = _variant(tmp_path, "plain", {"whitebox": 3, "blackbox_score": 2, "blackbox_label": 1}, 4, 0.97, 0)
    both = _variant(tmp_path, "both", {"whitebox": 4, "blackbox_score": 2, "blackbox_label": 3,
                                       "blackbox_collapse": 4}, 4, 0.96, 1)
    assert set(MODES) == {"whitebox", "blackbox_score", "blackbox_label", "blackbox_collapse"}
    args = ["ablation", f"run.out_dir={tmp_path}", f"clean={f0}", "probe.epochs=2",
            f"variants.plain.robustness={plain}", f"variants.plain.stages=[{tmp_path / 'plain_watermark'},{tmp_path / 'plain_embed'}]",
            f"variants.both.robustness={both}", f"variants.both.stages=[{tmp_path / 'both_watermark'}]"]
    assert main(args) == 0
    report = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    rows = {v["variant"]: v for v in report["variants"]}
    assert rows["plain"]["tpr"]["whitebox"] == 0.75 and rows["both"]["tpr"]["blackbox_label"] == 0.75
    assert rows["plain"]["seconds"] == 50.0 and rows["plain"]["cost_fraction_of_pretraining"] == 0.5
    assert rows["both"]["seconds"] == 30.0
    assert rows["both"]["best_blackbox_tpr"] == 1.0
    assert rows["both"]["calibration"]["whitebox"]["heldout_positive"] == 1
    assert rows["plain"]["probe_change"] == pytest.approx(0.97 - report["clean"]["linear_probe"])
    md = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "| plain |" in md and "plain, whitebox: distill@30" in md and "(0.50x)" in md
    assert "| TPR collapse |" in md and "| 0/15, 0/15, 0/15, n/a |" in md and "| 1.00 (4/4) † |" in md
    assert rows["plain"]["best_blackbox_tpr"] == 0.5 and "blackbox_collapse" not in rows["plain"]["tpr"]
    assert (tmp_path / "ablation" / "ablation.png").stat().st_size > 0


def test_ablation_refuses_an_unfinished_stage_and_an_uncollected_run(tmp_path, capsys):
    assert main(["ablation", f"run.out_dir={tmp_path}", f"clean={tmp_path}", f"variants.a.robustness={tmp_path / 'nope'}"]) == 2
    assert "holds no collected robustness run" in capsys.readouterr().err
