"""Small helpers shared by the benchmark and study scripts in ``experiments/``."""
from __future__ import annotations

import json
import os
import resource

import jax.numpy as jnp
import numpy as np

from jaxeff.data import Document


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


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads): on a shared machine the wall
    clock depends on the load, this does not."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def concat_batches(it_a, it_b, rows_a: int | None = None):
    """The first ``rows_a`` rows (default all) of each batch of ``it_a`` followed by the rows of
    the matching batch of ``it_b``: a fixed per-batch mixture (replay). With ``rows_a`` the
    ``it_a`` part is a row subset of the batches another run sees unmixed."""
    for a, b in zip(it_a, it_b):
        yield {k: np.concatenate([a[k][:rows_a], b[k]]) for k in a}


def chunk_documents(docs, size: int):
    """Split documents longer than ``size`` characters at line ends into parts with ids
    ``<id>#<k>`` (the split hashes ids, so every part lands in train or validation)."""
    out = []
    for d in docs:
        t, start, k = d.text, 0, 0
        if len(t) <= size:
            out.append(d)
            continue
        while start < len(t):
            end = min(len(t), start + size)
            if end < len(t):
                nl = t.rfind("\n", start + size // 2, end)
                end = nl + 1 if nl >= 0 else end
            out.append(Document(t[start:end], {**d.meta, "id": f"{d.meta['id']}#{k}"}))
            start, k = end, k + 1
    return out


def eval_docs(corpus, n: int, seq_len: int):
    """``n`` evenly spaced documents of ``corpus``, each cut to ``seq_len - 1`` characters (one
    row of a byte-level model): the evaluation covers many modules instead of the first few."""
    idx = np.unique(np.linspace(0, len(corpus) - 1, num=min(n, len(corpus))).round().astype(int))
    return [Document(corpus[int(i)].text[:seq_len - 1], corpus[int(i)].meta) for i in idx]


def token_rows(docs, tokenizer, n_tokens: int) -> np.ndarray:
    """The first ``n_tokens`` tokens (no BOS) of each document as int32 rows ``[N, n_tokens]``,
    for a plain-token-stream loss such as ``llama.next_token_loss``; shorter documents are
    skipped. Raises ValueError when no document is long enough."""
    rows = [ids[:n_tokens] for ids in (np.asarray(tokenizer.encode(d.text)) for d in docs)
            if ids.size >= n_tokens]
    if not rows:
        raise ValueError(f"token_rows: none of the {len(docs)} documents has {n_tokens} tokens")
    return np.stack(rows).astype(np.int32)


def rows_loss(loss_fn, params, rows_NxT: np.ndarray, batch_size: int) -> float:
    """Mean of ``loss_fn(params, rows[i:i + batch_size])`` over equal-length row batches,
    weighted by the rows in each (= the mean over every prediction: all rows have T tokens)."""
    tot = 0.0
    for i in range(0, len(rows_NxT), batch_size):
        chunk = rows_NxT[i:i + batch_size]
        tot += float(loss_fn(params, chunk)) * len(chunk)
    return tot / len(rows_NxT)


def run_record(module: str, argv, t_start: float, c_start: float, load_start: float) -> dict:
    """The fields every real-model study's results JSON carries about its run: the date, the
    exact command, total wall and CPU seconds since ``t_start`` / ``c_start`` (``perf_counter``
    / :func:`cpu_seconds`), the 1-minute load average at the start and now, the machine."""
    import datetime
    import platform
    import sys
    import time

    import jax
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": f"python -m experiments.{module} "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "total_wall_s": time.perf_counter() - t_start, "total_cpu_s": cpu_seconds() - c_start,
        "loadavg_1min": [load_start, os.getloadavg()[0]],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "devices": str(jax.devices())},
        "note": "wall times on a shared 2-core machine under load are inflated 3-5x; CPU "
                "seconds (all threads) are the comparable cost"}


def machine_line() -> str:
    """Machine and current 1-minute load average, for a results file (times on a shared
    machine are noisy: say so next to them)."""
    import platform
    return (f"{platform.machine()} {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f} "
            f"at the end (shared machine: noisy times)")
