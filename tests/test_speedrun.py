"""The main job's quick mode runs end to end and writes its table, summary and plot."""
import json
import os

import pytest

from experiments import speedrun
from experiments.recipes import available


def test_reach_interpolates():
    hist = [{"tokens": 0, "val_loss": 4.0, "wall_s": 0.0}, {"tokens": 100, "val_loss": 2.0, "wall_s": 10.0}]
    assert speedrun.reach(hist, 3.0) == (50.0, 5.0)
    assert speedrun.reach(hist, 1.0) == (None, None)


def test_baseline_registered_first():
    assert available()[0] == "baseline"


@pytest.mark.slow
def test_quick_baseline(tmp_path):
    out = tmp_path / "run"
    summary = speedrun.main(["--quick", "--recipes", "baseline", "--steps", "4", "--out", str(out),
                             "--no-progress"])
    assert os.path.exists(out / "val_loss.png") and os.path.exists(out / "summary.json")
    s = json.load(open(out / "summary.json"))
    assert s["rows"][0]["recipe"] == "baseline" and s["rows"][0]["tokens"] == 4 * 4 * 64
    assert len(s["corpus"]["fingerprint"]) == 64
    assert summary["target_val_loss"] == s["target_val_loss"]


def test_unknown_recipe_is_an_error():
    with pytest.raises(SystemExit, match="unknown"):
        speedrun.main(["--quick", "--recipes", "nope"])
