"""experiments/common.py: the helpers the continued-pre-training and real-model studies share
(replay batches, chunking, held-out token rows), and the distillation study's embedding
projection (no model, no training)."""
import jax
import numpy as np
import pytest

from experiments import common
from experiments.study_distill_smollm2 import projected_embedding
from jaxeff.data import ByteTokenizer, Document
from jaxeff.models import llama


def _batches(value, rows, n=3):
    return iter([{"inputs": np.full((rows, 4), value + i), "targets": np.full((rows, 4), -1)}
                 for i in range(n)])


def test_concat_batches_keeps_the_first_rows_of_a_then_b():
    out = list(common.concat_batches(_batches(0, 4), _batches(100, 1), rows_a=3))
    assert len(out) == 3
    for i, b in enumerate(out):
        assert b["inputs"].shape == (4, 4) and b["targets"].shape == (4, 4)
        np.testing.assert_array_equal(b["inputs"][:3], i)        # rows of the unmixed batch
        np.testing.assert_array_equal(b["inputs"][3], 100 + i)   # the replay row
    full = next(common.concat_batches(_batches(0, 2), _batches(9, 2)))
    assert full["inputs"].shape == (4, 4)


def test_chunk_documents_round_trips_the_text_at_line_ends():
    text = "".join(f"line {i:03d}\n" for i in range(100))          # 900 characters
    docs = common.chunk_documents([Document(text, {"id": "a"}), Document("short", {"id": "b"})],
                                  size=200)
    parts = [d for d in docs if d.meta["id"].startswith("a#")]
    assert "".join(d.text for d in parts) == text
    assert all(len(d.text) <= 200 and d.text.endswith("\n") for d in parts)
    assert [d.meta["id"] for d in parts] == [f"a#{k}" for k in range(len(parts))]
    assert docs[-1].text == "short" and docs[-1].meta["id"] == "b"


def test_token_rows_cut_skip_and_raise():
    tok = ByteTokenizer()
    docs = [Document("abcdef", {}), Document("xy", {}), Document("0123456789", {})]
    rows = common.token_rows(docs, tok, 5)
    assert rows.dtype == np.int32 and rows.shape == (2, 5)       # "xy" is too short
    np.testing.assert_array_equal(rows[0], tok.encode("abcde"))
    with pytest.raises(ValueError, match="none of the 3 documents has 50 tokens"):
        common.token_rows(docs, tok, 50)


def test_rows_loss_is_the_mean_over_every_prediction():
    cfg = llama.PRESETS["tiny"]
    params = llama.init_params(jax.random.key(0), cfg)
    rows = np.random.default_rng(0).integers(0, 256, (5, 9)).astype(np.int32)
    fn = jax.jit(lambda p, r: llama.next_token_loss(p, r, cfg))
    whole = float(fn(params, rows))
    assert common.rows_loss(fn, params, rows, 2) == pytest.approx(whole, rel=1e-5)  # 2 + 2 + 1


def test_projected_embedding_keeps_the_top_directions_at_the_init_std():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    e = (rng.normal(size=(200, 12)) * np.linspace(5, 0.1, 12)) @ basis.T   # known spectrum
    p = np.asarray(projected_embedding(e, 3))
    assert p.shape == (200, 3)
    assert np.std(p) == pytest.approx(0.02, rel=1e-4)
    # the projection's Gram matrix is the rank-3 truncation's (signs aside), up to one scale
    u, s, _ = np.linalg.svd(e, full_matrices=False)
    g3 = (u[:, :3] * s[:3]) @ (u[:, :3] * s[:3]).T
    gp = p @ p.T
    np.testing.assert_allclose(gp, np.trace(gp) / np.trace(g3) * g3, atol=1e-4 * np.abs(gp).max())


def test_run_record_names_the_command_and_the_costs():
    import time
    rec = common.run_record("study_x", ["--steps", "3"], time.perf_counter() - 1.0,
                            common.cpu_seconds(), 2.5)
    assert rec["command"] == "python -m experiments.study_x --steps 3"
    assert rec["total_wall_s"] >= 1.0 and rec["total_cpu_s"] >= 0.0
    assert rec["loadavg_1min"][0] == 2.5 and len(rec["loadavg_1min"]) == 2
    assert {"platform", "cpus", "devices"} <= set(rec["machine"])
