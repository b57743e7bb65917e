"""Memory accounting of structured weights and sparse training on real LLaMA shapes (abstract).

    python -m experiments.memory_structured                       # 125m, 350m, 1b in float32
    python -m experiments.memory_structured --dtype bfloat16 --out runs/mem

Nothing is allocated: parameters come from ``jax.eval_shape`` of the reference model's init, and
each method's factors and AdamW state from ``jax.eval_shape`` of its init. For each model size
and method the table gives dense parameters, stored parameters and bytes, trainable parameters,
AdamW state bytes and their ratios to dense AdamW training.

Methods (on the attention and MLP projections ``layers/(wq|wk|wv|wo|w_gate|w_up|w_down)``;
embeddings, head and norms stay dense, as in the SLTrain paper):
* ``dense``: the baseline.
* ``sltrain``: "SLTrain" (Han et al., 2024) with the paper's rank/alpha/delta for the size.
* ``lowrank-only``: the same rank, no sparse part.
* ``sparse-75``: ``jaxeff.optim.prune`` with the Journey-Matters schedule to 75%: the weights are
  stored dense with a bool mask (the savings are in non-zeros/FLOPs with a sparse kernel, not in
  stored bytes); ``mean nnz`` is the average non-zero count ``N_bar`` over training.
* ``lora-r8``: LoRA adapters (rank 8) on a frozen base, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff.models import llama
from jaxeff.optim import journey_schedule, prune
from jaxeff.params import param_report, tree_bytes
from jaxeff.params import lora
from jaxeff.params import lowrank
from jaxeff.params import sltrain, sltrain_preset
from jaxeff.params import partition

SELECT = "layers/(wq|wk|wv|wo|w_gate|w_up|w_down)$"
PAPER_SIZE = {"125m": "130m", "350m": "350m", "1b": "1b"}   # SLTrain preset per model size


def _adamw_bytes(trainable) -> int:
    return tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, trainable))


def account(size: str, dtype: str = "float32", total_steps: int = 10_000) -> list[dict]:
    """Rows of the memory table for one model size (abstract shapes only)."""
    cfg = llama.PRESETS[size]
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype)),
                          llama.abstract_params(cfg))
    key = jax.random.key(0)
    pre = sltrain_preset(PAPER_SIZE[size])
    methods = {
        "dense": lambda p: p,
        "sltrain": lambda p: sltrain(**pre, select=SELECT).init(key, p),
        "lowrank-only": lambda p: lowrank(pre["rank"], select=SELECT).init(key, p),
        "lora-r8": lambda p: lora(8, 16.0, select=SELECT).from_dense(key, p),
    }
    rows = []
    base = None
    for name, fn in methods.items():
        tree = jax.eval_shape(fn, params)
        rep = param_report(tree)
        trainable, _ = partition(tree)
        row = dict(model=size, method=name, dense_params=rep.dense_params,
                   stored_params=rep.stored_params, stored_bytes=rep.stored_bytes,
                   trainable_params=rep.trainable_params, opt_bytes=_adamw_bytes(trainable),
                   mean_nonzero=rep.dense_params if name == "dense" else None)
        rows.append(row)
        base = base or row
    sched = journey_schedule(0.75, total_steps=total_steps)
    tx = prune(optax.adamw(1e-3), sched, select=SELECT)
    state = jax.eval_shape(tx.init, params)
    n_sel = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.masks) if x.ndim)
    mean_density = float(1.0 - np.mean(np.asarray(jax.jit(jax.vmap(sched))(
        jnp.arange(total_steps)))))
    rep = param_report(params)
    rows.append(dict(model=size, method="sparse-75", dense_params=rep.dense_params,
                     stored_params=rep.stored_params, stored_bytes=rep.stored_bytes,
                     trainable_params=rep.trainable_params, opt_bytes=tree_bytes(state),
                     mean_nonzero=int(rep.dense_params - n_sel * (1 - mean_density))))
    for r in rows:
        dense_total = base["stored_bytes"] + base["opt_bytes"]
        r["stored_ratio"] = r["stored_bytes"] / base["stored_bytes"]
        r["opt_ratio"] = r["opt_bytes"] / base["opt_bytes"]
        r["total_ratio"] = (r["stored_bytes"] + r["opt_bytes"]) / dense_total
        r["mean_nonzero_ratio"] = (None if r["mean_nonzero"] is None
                                   else r["mean_nonzero"] / base["dense_params"])
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| model | method | stored params | trainable | stored MB | AdamW state MB | "
            "stored x | state x | total x | mean nnz x |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['stored_params'] / 1e6:.1f}M | "
            f"{r['trainable_params'] / 1e6:.1f}M | {r['stored_bytes'] / 2**20:.0f} | "
            f"{r['opt_bytes'] / 2**20:.0f} | {r['stored_ratio']:.2f} | {r['opt_ratio']:.2f} | "
            f"{r['total_ratio']:.2f} | {_fmt(r['mean_nonzero_ratio'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="125m,350m,1b")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=None, help="directory for memory_structured.json")
    args = p.parse_args(argv)
    rows = [r for m in args.models.split(",") for r in account(m.strip(), args.dtype)]
    text = table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memory_structured.json"), "w") as f:
            json.dump({"command": "python -m experiments.memory_structured", "dtype": args.dtype,
                       "rows": rows, "table": text}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
