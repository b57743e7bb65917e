"""Small helpers shared by the benchmark and study scripts in ``experiments/``."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np


def random_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict:
    """A batch of uniformly random byte tokens in the standard batch format (one segment per
    row, no padding) -- for timing and memory benchmarks, where the data does not matter."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(0, min(cfg.vocab_size, 256), (batch, seq + 1), dtype=np.int32)
    return {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]),
            "segment_ids": jnp.ones((batch, seq), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}


def write_json(obj, path: str) -> None:
    """Write a results file (creating its folder) and say where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
    print(f"wrote {path}")
