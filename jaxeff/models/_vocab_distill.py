"""Contextualized weight distillation of new token embeddings (BIOptimus) for a LLaMA decoder.

"BIOptimus: Pre-training an Optimal Biomedical Language Model with Curriculum Learning for Named
Entity Recognition" (Pavlova & Makhlouf, 2023) initialises the embeddings of new domain tokens by
distilling the existing model "inside the context where the tokens were found". Here, for a
vocabulary extension from :func:`jaxeff.models.extend_bpe` and a tied-embedding
``jaxeff.models.llama`` model (SmolLM2), only the N new rows ``R`` are trained; the old model is
the teacher and sees each context in the old tokenization, the student is the same model with the
embedding ``[E; R]`` and sees the extended tokenization.

The exact objective. A sample is a window of ``L`` extended ids ``s_1..s_L`` containing a new
token; its teacher sequence is the expansion ``t = expand(s)`` (each new token replaced by its old
pieces, :meth:`VocabExtension.expand`), and ``pi(j)`` is the teacher index of the *last* piece of
``s_j``, so student position ``j`` and teacher position ``pi(j)`` have read the same text and
predict the same next byte. With ``z = rms_norm(h_final)`` (the hidden state the output head
reads), ``M`` the positions from the first new token of the window on (before it, student and
teacher see identical inputs), ``first(v)`` the first old piece of a new token ``v``::

    J(R) = w_h * mean_{j in M} ||z_S(j) - z_T(pi(j))||^2 / mean_{j in M} ||z_T(pi(j))||^2
         + w_kl * mean_{j in M} KL( p_T(. | pi(j)) || q_S(. | j) )

    q_S(x | j) = p_S(x | j) + sum_{v new, first(v) = x} p_S(v | j)      (x in the old vocabulary)

The first term asks that the model fed the new token carries on with the representations the old
model built from its sub-pieces (at the token and every position after it); the second that the
student's next-token distribution, with each new token counted as the old piece it starts with
(the event "the next text starts with x"), is the teacher's. The second term also reaches the
new rows through the tied output head. Deviations from the paper: BIOptimus distils a BERT
encoder's masked-LM representations; this is the decoder analogue (final-layer states and
next-token distributions), trained with Adam from a given start (e.g. the sub-piece mean).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxeff._checks import check_bool, check_float, check_int, check_learning_rate
from jaxeff.losses._distill import hidden_state_loss, kd_loss, masked_mean
from jaxeff.models import llama
from jaxeff.models._extend_tokenizer import VocabExtension
from jaxeff.params._embedding import extend_embedding

__all__ = ["DistillSamples", "DistillResult", "distillation_samples", "distillation_objective",
           "distill_new_rows"]


class DistillSamples(NamedTuple):
    """Contexts for :func:`distill_new_rows` (NumPy int32 arrays, B samples).

    ``student_ids [B, L]`` extended ids; ``teacher_ids [B, T]`` their expansion, right-padded;
    ``teacher_segments [B, T]`` 1 on text, 0 on padding; ``align [B, L]`` the teacher index of the
    last piece of each student token; ``mask [B, L]`` 1 from the first new token of the row on.
    """

    student_ids: np.ndarray
    teacher_ids: np.ndarray
    teacher_segments: np.ndarray
    align: np.ndarray
    mask: np.ndarray


class DistillResult(NamedTuple):
    """``rows [N, D]`` after distillation and the objective ``J`` (and its two terms) per step,
    evaluated on each step's batch before its update."""

    rows: jax.Array
    objective: np.ndarray
    hidden: np.ndarray
    kl: np.ndarray


def _check_extension(extension):
    if not isinstance(extension, VocabExtension):
        raise TypeError(f"extension must be a VocabExtension (from extend_bpe); got "
                        f"{type(extension).__name__}")


def distillation_samples(extension: VocabExtension, texts: Sequence[str], *, seq_len: int,
                         n_samples: int, seed: int = 0) -> DistillSamples:
    """``n_samples`` windows of ``seq_len`` extended ids that contain a new token, drawn
    uniformly (document, then start) from ``texts`` with ``numpy.random.default_rng(seed)``.

    Raises:
      TypeError: ``extension`` is not a :class:`VocabExtension`; ``texts`` is a str.
      ValueError: bad ``seq_len`` / ``n_samples``; no text of ``texts`` has a window of
        ``seq_len`` tokens with a new token (after 50 tries per sample).
    """
    _check_extension(extension)
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of str, not one str")
    seq_len = check_int("seq_len", seq_len, 2)
    n_samples = check_int("n_samples", n_samples, 1)
    V = extension.old_vocab_size
    docs = [extension.tokenizer.encode(t) for t in texts]
    docs = [d for d in docs if d.size >= seq_len and (d >= V).any()]
    if not docs:
        raise ValueError(f"no text in texts has {seq_len} tokens and a new token")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(50 * n_samples):
        d = docs[rng.integers(len(docs))]
        start = int(rng.integers(d.size - seq_len + 1))
        w = d[start:start + seq_len]
        if (w >= V).any():
            rows.append(w)
            if len(rows) == n_samples:
                break
    if len(rows) < n_samples:
        raise ValueError(f"found {len(rows)} of n_samples={n_samples} windows with a new token")
    lengths = [np.asarray([len(extension.pieces[i - V]) if i >= V else 1 for i in r])
               for r in rows]
    T = max(int(n.sum()) for n in lengths)
    teacher = np.zeros((n_samples, T), np.int32)
    segments = np.zeros((n_samples, T), np.int32)
    align = np.zeros((n_samples, seq_len), np.int32)
    mask = np.zeros((n_samples, seq_len), np.int32)
    for b, (r, n) in enumerate(zip(rows, lengths)):
        t = extension.expand(r)
        teacher[b, :t.size], segments[b, :t.size] = t, 1
        align[b] = np.cumsum(n) - 1
        mask[b, int(np.argmax(r >= V)):] = 1
    return DistillSamples(np.stack(rows).astype(np.int32), teacher, segments, align, mask)


def _log_first_piece_marginal(logits_BxLxW, first_N, V):
    """``log q(x)`` over the old vocabulary: new tokens' probabilities added to their first
    pieces' (a grouped logsumexp, finite where a group is empty)."""
    logz = jax.nn.logsumexp(logits_BxLxW, axis=-1, keepdims=True)
    old, new = logits_BxLxW[..., :V], logits_BxLxW[..., V:]
    has = jnp.zeros((V,), bool).at[first_N].set(True)
    newT = jnp.moveaxis(new, -1, 0)                                   # [N, B, L]
    m = jax.ops.segment_max(newT, first_N, num_segments=V)            # [V, B, L]
    m = jnp.where(has[:, None, None], m, 0.0)
    s = jax.ops.segment_sum(jnp.exp(newT - m[first_N]), first_N, num_segments=V)
    lse = jnp.moveaxis(m + jnp.log(jnp.where(has[:, None, None], s, 1.0)), 0, -1)
    merged = jnp.where(has, jnp.logaddexp(old, lse), old)
    return merged - logz


def _check(params, cfg, extension, rows_NxD):
    _check_extension(extension)
    if not isinstance(cfg, llama.LlamaConfig):
        raise TypeError(f"cfg must be a llama.LlamaConfig; got {type(cfg).__name__}")
    if not cfg.tie_embeddings:
        raise ValueError("distill_new_rows needs tie_embeddings=True (the new rows are input and "
                         "output vectors); got an untied config")
    V, D = params["embed"].shape
    if V != extension.old_vocab_size or cfg.vocab_size != V:
        raise ValueError(f"params['embed'] has {V} rows and cfg.vocab_size={cfg.vocab_size}, but "
                         f"the extension starts at old_vocab_size={extension.old_vocab_size}; pass "
                         "the old (unextended) model")
    rows_NxD = jnp.asarray(rows_NxD)
    if rows_NxD.shape != (extension.n_new, D):
        raise ValueError(f"rows_NxD must have shape {(extension.n_new, D)}; got "
                         f"{tuple(rows_NxD.shape)}")
    return rows_NxD


def _objective(rows_NxD, params, batch, cfg, first_N, hidden_weight, kl_weight):
    V = params["embed"].shape[0]
    ext_cfg = cfg.replace(vocab_size=V + rows_NxD.shape[0])
    lt, ht = llama.forward(params, batch["teacher_ids"], cfg,
                           segment_ids=batch["teacher_segments"], return_hidden=True)
    zt = llama.rms_norm(ht, params["final_norm"], cfg.norm_eps)
    idx = batch["align"][..., None]
    zt = jax.lax.stop_gradient(jnp.take_along_axis(zt, idx, axis=1))
    lt = jax.lax.stop_gradient(jnp.take_along_axis(lt, idx, axis=1))
    student = extend_embedding(params, rows_NxD)
    ls, hs = llama.forward(student, batch["student_ids"], ext_cfg, return_hidden=True)
    zs = llama.rms_norm(hs, params["final_norm"], cfg.norm_eps)
    mask = batch["mask"]
    scale = masked_mean(jnp.mean(jnp.square(zt), -1), mask)
    hidden = hidden_state_loss(zs, zt, mask) / jnp.maximum(scale, 1e-12)
    kl = kd_loss(_log_first_piece_marginal(ls, first_N, V), lt, mask)
    return hidden_weight * hidden + kl_weight * kl, (hidden, kl)


_objective_jit = jax.jit(_objective, static_argnames=("cfg", "hidden_weight", "kl_weight"))


def distillation_objective(params, cfg: llama.LlamaConfig, extension: VocabExtension, rows_NxD,
                           samples: DistillSamples, *, hidden_weight: float = 1.0,
                           kl_weight: float = 1.0):
    """``(J, hidden term, KL term)`` of the module docstring on all of ``samples`` (floats).

    ``params``/``cfg``: the old tied-embedding llama model (the teacher; ``V`` rows);
    ``rows_NxD``: candidate new rows. Raises as :func:`distill_new_rows`.
    """
    rows_NxD = _check(params, cfg, extension, rows_NxD)
    batch = {k: jnp.asarray(v) for k, v in samples._asdict().items()}
    j, (h, kl) = _objective_jit(rows_NxD, params, batch, cfg, jnp.asarray(extension.first_pieces()),
                            hidden_weight, kl_weight)
    return float(j), float(h), float(kl)


def distill_new_rows(params, cfg: llama.LlamaConfig, extension: VocabExtension, rows_NxD,
                     samples: DistillSamples, *, steps: int, batch_size: int = 4,
                     learning_rate: float = 1e-3, hidden_weight: float = 1.0,
                     kl_weight: float = 1.0, only_present: bool = True) -> DistillResult:
    """Contextualized weight distillation (BIOptimus): Adam on the new rows only, minimising
    ``J(R)`` of the module docstring, starting from ``rows_NxD`` (e.g.
    ``jaxeff.params.mean_rows``); the old model is the frozen teacher.

    Step ``k`` uses samples ``[k * batch_size, (k + 1) * batch_size)`` (cyclically). With
    ``only_present`` (default) a step updates only the rows of new tokens that occur in its
    batch's inputs: the KL term gives every new row a small gradient through the tied output
    head, and Adam's normalised step would otherwise move all N rows by about the learning rate
    from a handful of contexts (BIOptimus distils each token from the contexts it occurs in).

    Args:
      params, cfg: the old tied-embedding ``jaxeff.models.llama`` model (``V`` rows).
      extension: the :class:`VocabExtension` (``V`` = its ``old_vocab_size``).
      rows_NxD: the start for the ``N`` new rows.
      samples: :func:`distillation_samples` of the extension.
      steps: optimizer steps, >= 1. batch_size: samples per step, in [1, #samples].
      learning_rate: Adam's (default 1e-3). hidden_weight, kl_weight: ``w_h``, ``w_kl`` >= 0.
      only_present: update only the rows of new tokens in the step's batch (default True).

    Returns: a :class:`DistillResult`.

    Raises:
      TypeError: wrong types of ``cfg`` / ``extension`` / numbers.
      ValueError: an untied config; params / cfg / extension sizes that disagree; rows of the
        wrong shape; bad ``steps`` / ``batch_size`` / rates / weights (both weights 0 included).
    """
    rows_NxD = _check(params, cfg, extension, rows_NxD)
    if not isinstance(samples, DistillSamples):
        raise TypeError(f"samples must be DistillSamples (from distillation_samples); got "
                        f"{type(samples).__name__}")
    steps = check_int("steps", steps, 1)
    n = samples.student_ids.shape[0]
    batch_size = check_int("batch_size", batch_size, 1, n)
    lr = check_learning_rate("learning_rate", learning_rate, allow_zero=False)
    hw = check_float("hidden_weight", hidden_weight, 0.0)
    kw = check_float("kl_weight", kl_weight, 0.0)
    only_present = check_bool("only_present", only_present)
    if hw == 0 and kw == 0:
        raise ValueError("hidden_weight and kl_weight are both 0: nothing to distil")
    first_N = jnp.asarray(extension.first_pieces())
    tx = optax.adam(lr)

    V, N = extension.old_vocab_size, extension.n_new

    @jax.jit
    def step(rows, opt_state, params, batch):
        (j, terms), g = jax.value_and_grad(_objective, has_aux=True)(
            rows, params, batch, cfg, first_N, hw, kw)
        updates, opt_state = tx.update(g, opt_state, rows)
        if only_present:   # rows of new tokens absent from the batch's inputs stay put
            present_N = jnp.zeros((N + 1,), bool).at[
                jnp.clip(batch["student_ids"] - V + 1, 0).reshape(-1)].set(True)[1:]
            updates = jnp.where(present_N[:, None], updates, 0.0)
        return optax.apply_updates(rows, updates), opt_state, j, terms

    rows, opt_state = rows_NxD.astype(jnp.float32), tx.init(rows_NxD.astype(jnp.float32))
    arrays = samples._asdict()
    history = []
    for k in range(steps):
        sel = (np.arange(batch_size) + k * batch_size) % n
        batch = {key: jnp.asarray(v[sel]) for key, v in arrays.items()}
        rows, opt_state, j, (h, kl) = step(rows, opt_state, params, batch)
        history.append((float(j), float(h), float(kl)))
    hist = np.asarray(history, np.float64)
    return DistillResult(rows.astype(rows_NxD.dtype), hist[:, 0], hist[:, 1], hist[:, 2])
