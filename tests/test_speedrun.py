"""The main job's quick mode runs end to end and writes its table, summary and plot."""
import json
import os

import jax
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
    """Two seeds (the --seeds path) at the quick size: per-seed rows, intervals, machine info."""
    out = tmp_path / "run"
    summary = speedrun.main(["--quick", "--recipes", "baseline", "--steps", "4", "--seeds", "2",
                             "--out", str(out), "--no-progress"])
    assert os.path.exists(out / "val_loss.png") and os.path.exists(out / "summary.json")
    assert os.path.exists(out / "seed0" / "baseline.jsonl")
    assert summary["seeds"] == [0, 1] and set(summary["per_seed"]) == {"0", "1"}
    a, b = (summary["per_seed"][k]["histories"]["baseline"][-1]["val_loss"] for k in ("0", "1"))
    assert a != b                                   # the seed changes init and data order
    row = summary["rows"][0]
    assert row["per_seed"]["final_val_loss"] == [a, b]
    ci = row["ci95"]["final_val_loss"]
    assert ci["lo"] < ci["mean"] < ci["hi"] and ci["mean"] == pytest.approx((a + b) / 2)
    assert row["ci95"]["tokens_ratio"]["mean"] == pytest.approx(1.0)  # paired: own baseline
    s = json.load(open(out / "summary.json"))
    assert s["rows"][0]["recipe"] == "baseline" and s["rows"][0]["tokens"] == 4 * 4 * 64
    assert len(s["corpus"]["fingerprint"]) == 64 and "cpu_flags" in s["machine"]
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


def test_unknown_recipe_and_bad_seeds_are_errors():
    with pytest.raises(SystemExit, match="unknown"):
        speedrun.main(["--quick", "--recipes", "nope"])
    with pytest.raises(SystemExit, match="--seeds"):
        speedrun.main(["--quick", "--seeds", "0"])


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
    # every install step of CI after pip's own upgrade is in the README's command too
    installs = [line.strip().replace("python -m pip", "pip").replace(" -q", "")
                for line in open(os.path.join(root, ".ci", "run"))
                if line.strip().startswith("python -m pip install") and "--upgrade pip" not in line]
    assert installs and all(("&& " + i + " &&") in readme for i in installs), installs


def test_t_interval_matches_the_formula():
    v = [1.0, 2.0, 4.0]
    ci = speedrun.t_interval(v)
    s = np.std(v, ddof=1)
    half = 4.302652729911275 * s / np.sqrt(3)     # t_{0.975, 2}
    assert ci["mean"] == pytest.approx(7 / 3) and ci["n"] == 3 and ci["missing"] == 0
    assert ci["lo"] == pytest.approx(7 / 3 - half) and ci["hi"] == pytest.approx(7 / 3 + half)
    assert "student-t" in ci["method"]
    one = speedrun.t_interval([2.0])                  # n = 1: mean, no interval
    assert one["mean"] == 2.0 and one["lo"] is None and one["std"] is None
    miss = speedrun.t_interval([1.0, None, 3.0])      # a target not reached: no interval
    assert miss["mean"] == 2.0 and miss["missing"] == 1 and miss["lo"] is None


def test_aggregate_pairs_rows_by_recipe():
    row = lambda name, loss, ratio: {"recipe": name, "final_val_loss": loss, "tokens_to_target": 10.0,
                                     "tokens_ratio": ratio, "wall_to_target_s": 1.0,
                                     "wall_ratio": 1.0, "steps_per_s": 2.0, "wall_s": 3.0}
    rows = speedrun.aggregate({0: [row("baseline", 2.0, 1.0), row("x", 1.8, 0.5)],
                               1: [row("baseline", 2.2, 1.0), row("x", 2.0, 0.7)]})
    x = rows[1]
    assert x["recipe"] == "x" and x["seeds"] == [0, 1]
    assert x["final_val_loss"] == pytest.approx(1.9) and x["per_seed"]["tokens_ratio"] == [0.5, 0.7]
    assert x["ci95"]["tokens_ratio"]["lo"] < 0.6 < x["ci95"]["tokens_ratio"]["hi"]
    assert rows[0]["ci95"]["tokens_ratio"]["std"] == 0.0


def test_machine_info_records_versions_and_cpu():
    info = speedrun.machine_info()
    for k in ("jax", "jaxlib", "numpy", "blas", "env", "cpu_model", "cpu_flags", "device_kind"):
        assert k in info
    assert info["jax"] == jax.__version__
