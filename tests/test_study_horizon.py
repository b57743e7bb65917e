"""experiments/study_horizon.py: the verdict rules, the plan and its time estimate (no training;
the end-to-end path is `python -m experiments.study_horizon --smoke`)."""
import pytest

from experiments import speedrun, study_horizon as sh


def _row(name, ratios, bytes_ratio=1.0):
    return {"recipe": name, "final_val_loss": 2.0, "bytes_ratio": bytes_ratio,
            "ci95": {"tokens_ratio": speedrun.t_interval(ratios)}}


BASE = {"recipe": "baseline", "final_val_loss": 2.0}


def test_speedup_verdicts_follow_the_interval():
    d0 = speedrun.t_interval([0.0, 0.01])
    assert sh.verdict("sophia", _row("sophia", [0.5, 0.52, 0.55]), BASE, d0)[0] == \
        "reproduced in direction"
    assert sh.verdict("sophia", _row("sophia", [1.5, 1.6, 1.55]), BASE, d0)[0] == "not reproduced"
    assert sh.verdict("meco", _row("meco", [0.8, 1.2]), BASE, d0)[0] == "inconclusive"
    # a target missed in one seed: decided by the final-loss difference
    worse = speedrun.t_interval([0.3, 0.31])
    assert sh.verdict("gstack", _row("gstack", [0.9, None]), BASE, worse)[0] == "not reproduced"
    assert sh.verdict("gstack", _row("gstack", [0.9, None]), BASE, d0)[0] == "inconclusive"


def test_equal_loss_verdicts_need_less_memory_and_the_margin():
    close = speedrun.t_interval([0.001, 0.003, 0.002])          # within 1% of 2.0 = 0.02
    far = speedrun.t_interval([0.05, 0.06, 0.07])
    wide = speedrun.t_interval([-0.05, 0.06])
    r = _row("galore", [1.0, 1.0], bytes_ratio=0.5)
    assert sh.verdict("galore", r, BASE, close)[0] == "reproduced in direction"
    assert sh.verdict("galore", r, BASE, far)[0] == "not reproduced"
    assert sh.verdict("galore", r, BASE, wide)[0] == "inconclusive"
    assert sh.verdict("sltrain", _row("sltrain", [1.0], bytes_ratio=1.2), BASE, close)[0] == \
        "not reproduced"


def test_cpu_setting_meets_the_mechanism_constraints():
    s = sh.SETTINGS["cpu"]
    from experiments.recipes.sophia import K
    from experiments.recipes.meco import COOLDOWN
    from experiments.recipes import gstack
    steps = s.steps["tiny"]
    assert steps // K >= 100                       # >= 100 Sophia Hessian refreshes
    assert COOLDOWN == 0.1 and s.seeds >= 2 and len(s.sweep_mults) == 3
    assert round(gstack.rule_fraction() * steps) >= 40   # the small phase has room
    gpu = sh.SETTINGS["gpu"]
    assert gpu.seeds == 3 and set(gpu.models) == {"tiny", "small"}
    for m in gpu.models:   # ~20 tokens per parameter
        from jaxeff.models import llama
        import jax
        n = llama.param_count(jax.eval_shape(lambda: llama.init_params(jax.random.key(0),
                                                                       llama.PRESETS[m])))
        tokens = gpu.steps[m] * sh.GPU_BATCH[m] * gpu.seq_len
        assert 18 <= tokens / n <= 22, (m, tokens / n)


def test_plan_projects_time_from_smoke_timings():
    s = sh.SETTINGS["cpu"]
    calib = {r: {"per_step_s": 0.1, "fixed_s": 5.0, "per_eval_s": 0.5} for r in sh.RECIPES}
    p = sh.plan(s, list(sh.RECIPES), calib)
    assert sum(r["runs"] for r in p["runs"]) == len(sh.RECIPES) * (3 + s.seeds)
    long = next(r for r in p["runs"] if r["recipe"] == "baseline" and r["kind"] == "long")
    assert long["est_s"] == pytest.approx(2 * (5.0 + 1000 * 0.1 + 21 * 0.5))
    sel = next(r for r in p["runs"] if r["recipe"] == "select" and r["kind"] == "long")
    assert sel["est_s"] == pytest.approx(2 * (5.0 + 2 * (1000 * 0.1 + 21 * 0.5)))
    assert sh.plan(s, ["baseline"], None)["est_total_s"] is None


def test_bad_arguments():
    with pytest.raises(SystemExit, match="baseline"):
        sh.main(["--plan", "--recipes", "sophia"])
    with pytest.raises(SystemExit, match="--seeds"):
        sh.main(["--plan", "--seeds", "0"])
