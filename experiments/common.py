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


def stdlib_docstrings(*, min_chars: int = 200, max_chars: int = 600):
    """English prose from the Python stdlib corpus: every module, class and function docstring
    of ``min_chars..max_chars`` characters (``ast.get_docstring``, cleaned), one document each,
    in corpus order. Meta: ``id`` = ``'<module>:<qualified name>'`` (``'<module>:'`` for the
    module's own), ``domain`` = the module's top-level package. Used by the WRAP and curriculum
    studies: informative technical English, the kind of passage a rephrase keeps the content of.
    """
    import ast

    from jaxeff.data import Corpus, Document, load_stdlib_corpus

    out = []
    for doc in load_stdlib_corpus("all"):
        try:
            tree = ast.parse(doc.text)
        except SyntaxError:
            continue
        stack = [(tree, "")]
        while stack:
            node, name = stack.pop(0)
            text = ast.get_docstring(node, clean=True)
            if text and min_chars <= len(text) <= max_chars:
                out.append(Document(text, {"id": f"{doc.meta['id']}:{name}",
                                           "domain": doc.meta["domain"]}))
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    stack.append((child, f"{name}.{child.name}" if name else child.name))
    return Corpus(out, "stdlib-docstrings")


def adamw_wsd(lr: float, steps: int):
    """The studies' optimizer: global-norm clip 1.0, AdamW (0.9, 0.95, weight decay 0.1) under
    a WSD schedule (10% warmup, 1-sqrt decay over the last 20%)."""
    import optax

    from jaxeff import schedules

    sched = schedules.wsd(lr, total_steps=steps, warmup=max(1, steps // 10),
                          decay_fraction=0.2, shape="1-sqrt")
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1))


def cost_footer(wall0: float, cpu0: float) -> dict:
    """A study's total wall and CPU seconds since ``(time.perf_counter(), time.process_time())``
    were ``(wall0, cpu0)``, with the load that inflates the wall time."""
    import time

    return {"total_wall_s": time.perf_counter() - wall0,
            "total_cpu_s": time.process_time() - cpu0,
            "load_avg_1min_end": os.getloadavg()[0], "cpus": os.cpu_count(),
            "note": "wall times on a shared 2-core machine under load are inflated 3-10x; CPU-s "
                    "are the comparable cost"}


def machine_line() -> str:
    """Machine and current 1-minute load average, for a results file (times on a shared
    machine are noisy: say so next to them)."""
    import platform
    return (f"{platform.machine()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} "
            f"at the end (shared machine: noisy times)")
