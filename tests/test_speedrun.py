"""The main job's quick mode runs end to end and writes its table, summary and plot."""
import json
import os

import numpy as np
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
    # epoch accounting: the trained target tokens over the split's unique target tokens
    unique = s["unique_train_tokens"]
    assert unique > 1_000_000
    assert s["planned_epochs"] == pytest.approx(4 * 4 * 64 / unique)
    assert 0 < s["rows"][0]["extra"]["epochs"] <= s["planned_epochs"] + 1e-4


def test_train_data_counts_and_warns_on_repeats(tmp_path):
    from jaxeff import data as jdata
    from jaxeff.data import RepeatedDataWarning
    ctx = speedrun.build_context(speedrun.parse_args(["--quick", "--out", str(tmp_path)]))
    small = jdata.Corpus(list(ctx.train_corpus)[:2], "two-docs")
    it = ctx.train_data(corpus=small)
    with pytest.warns(RepeatedDataWarning, match="two-docs"):
        for _ in range(200):
            next(it)
            if it.counter.epochs > 1.0:
                break
    assert it.counter.epochs > 1.0


def test_unknown_recipe_is_an_error():
    with pytest.raises(SystemExit, match="unknown"):
        speedrun.main(["--quick", "--recipes", "nope"])


@pytest.mark.slow
def test_mesh_run_matches_single_device(tmp_path):
    """`--mesh data=2,fsdp=4` on the 8 simulated CPU devices trains to the single-device losses."""
    args = ["--quick", "--recipes", "baseline", "--steps", "3", "--batch-size", "8",
            "--no-progress"]
    one = speedrun.main(args + ["--out", str(tmp_path / "one")])
    eight = speedrun.main(args + ["--out", str(tmp_path / "eight"), "--mesh", "data=2,fsdp=4"])
    assert eight["machine"]["devices"] == 8
    a = [h["val_loss"] for h in one["histories"]["baseline"]]
    b = [h["val_loss"] for h in eight["histories"]["baseline"]]
    np.testing.assert_allclose(b, a, rtol=2e-5)


def test_ci_runs_the_readme_test_command():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    ci = [line.strip() for line in open(os.path.join(root, ".ci", "run"))
          if line.strip().startswith("python -m pytest")]
    assert len(ci) == 1 and ("&& " + ci[0] + "\n") in readme
