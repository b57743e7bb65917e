"""Optimizer-state bytes of GaLore, 8-bit GaLore and FP8 (COAT) Adam vs AdamW on real LLaMA shapes.

    python -m experiments.memory_optimizer_states                  # 125m, 350m, 1b; f32 and bf16
    python -m experiments.memory_optimizer_states --out runs/mem_optimizer_states.json

Nothing is allocated: parameters come from ``jaxeff.models.llama.abstract_params`` (cast to the
parameter dtype) and every optimizer state from ``jax.eval_shape`` of its ``init``. The bytes are
the whole state (moments, projectors, quantization scales, counters), so the ratio to AdamW is
the optimizer-state memory ratio.

Methods (GaLore on the attention and MLP projections ``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)``,
rank 1/4 of each matrix's smaller dimension, 'std' projection; embeddings, head and norms get
plain Adam as in the paper):

* ``adamw``: ``optax.adamw`` (moments in the parameter dtype).
* ``galore-r1/4``: ``jaxeff.optim.galore`` with Adam in projected space (paper: "up to 65.5%"
  less optimizer memory).
* ``galore-r1/4-8bit``: the same with ``compress_state(scale_by_adam, 'int8')`` as the inner
  transform (block-wise int8 + DRE, groups of 128, tensors >= 4096 values; paper: 82.5% less).
* ``adam-fp8``: COAT-style FP8 E4M3 moments with dynamic range expansion, no projection.
* ``adam-int8``: block-wise int8 moments, no projection (8-bit Adam).

Paper reference numbers are for their own settings (BF16 weights, 8-bit Adam from bitsandbytes
with block 2048); the table states what these implementations store.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import jax
import jax.numpy as jnp
import optax

from experiments.common import write_json
from jaxeff.models import llama
from jaxeff.optim import compress_state
from jaxeff.optim import galore
from jaxeff.params import tree_bytes

SELECT = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
SIZES = ("125m", "350m", "1b")


def _compressed_adam(fmt):
    return optax.chain(compress_state(optax.scale_by_adam(), fmt),
                       optax.add_decayed_weights(0.1), optax.scale_by_learning_rate(1e-3))


METHODS = {
    "adamw": lambda: optax.adamw(1e-3, weight_decay=0.1),
    "galore-r1/4": lambda: galore(1e-3, rank=0.25, select=SELECT, weight_decay=0.1),
    "galore-r1/4-8bit": lambda: galore(1e-3, compress_state(optax.scale_by_adam(), "int8"),
                                       rank=0.25, select=SELECT, weight_decay=0.1),
    "adam-fp8": lambda: _compressed_adam("fp8"),
    "adam-int8": lambda: _compressed_adam("int8"),
}


def account(size: str, dtype: str) -> list[dict]:
    """Rows for one model size and parameter dtype (abstract shapes only)."""
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                          llama.abstract_params(llama.PRESETS[size]))
    n_params = llama.param_count(params)
    rows, base = [], None
    for name, make in METHODS.items():
        state = jax.eval_shape(make().init, params)
        nbytes = tree_bytes(state)
        base = nbytes if name == "adamw" else base
        rows.append({"size": size, "dtype": dtype, "method": name, "params": n_params,
                     "state_bytes": nbytes, "bytes_per_param": nbytes / n_params,
                     "ratio_to_adamw": nbytes / base, "reduction": 1 - nbytes / base})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default="runs/memory_optimizer_states.json")
    args = ap.parse_args(argv)
    rows = [r for d in args.dtypes.split(",") for s in args.sizes.split(",") for r in account(s, d)]
    print(f"{'size':<5} {'dtype':<9} {'method':<17} {'state MB':>10} {'B/param':>8} "
          f"{'x adamw':>8} {'reduction':>9}")
    for r in rows:
        print(f"{r['size']:<5} {r['dtype']:<9} {r['method']:<17} {r['state_bytes'] / 2**20:>10.1f} "
              f"{r['bytes_per_param']:>8.3f} {r['ratio_to_adamw']:>8.3f} {r['reduction']:>9.1%}")
    out = {"command": " ".join(["python -m experiments.memory_optimizer_states"] +
                               (argv if argv is not None else sys.argv[1:])),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": rows}
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
