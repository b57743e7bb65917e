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


def compiled_memory(compiled) -> dict:
    """Bytes an XLA executable reserves per call (``compiled.memory_analysis()``): ``temp``
    (activations, gradients and scratch), ``args`` (inputs), and ``peak`` = args + outputs -
    aliased + temp."""
    m = compiled.memory_analysis()
    temp = int(m.temp_size_in_bytes)
    peak = int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + temp)
    return {"temp": temp, "peak": peak, "args": int(m.argument_size_in_bytes)}


def write_json(obj, path: str) -> None:
    """Write a results file (creating its folder) and say where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
    print(f"wrote {path}")
