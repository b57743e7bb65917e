"""Autoregressive decoding for ``jaxeff.models.llama``: jitted prefill, then a KV-cache decode loop.

:func:`generate` left-pads a batch of prompts (ragged lists are fine) into a ``[B, P]`` block,
runs the whole prompt once (*prefill*) writing every layer's keys and values into a cache of
``S = P + N`` slots, then decodes one token per step reading the cache (*decode*): each step costs
one token's forward instead of the whole prefix's. Row ``b``'s slot ``s`` holds position
``s - pad_b`` (positions start at 0 at the row's first real token, as without padding); query slot
``i`` sees key slot ``s`` iff ``s <= i`` and ``s`` is not padding. The per-step token is

    greedy (temperature 0):  v = argmax_v z_v
    sampling:                v ~ softmax(z / temperature) restricted to the top-p nucleus
                             (the smallest set of most likely tokens whose mass reaches top_p;
                             "The Curious Case of Neural Text Degeneration", Holtzman et al., 2020)

with key ``fold_in(key, step)``. Rows that emitted ``eos_id`` keep emitting it; the loop stops
when every row has (a ``lax.while_loop``), so a short answer costs a short loop.

``generate(..., prepack=True)`` prefills instead through :func:`prefill_packed`: the prompts
bin-packed into a few rows (``jaxeff.data.pack_prompts``; "Prepacking", Zhao et al., 2024), their
keys and values gathered into the same cache, so decoding is unchanged.

:func:`generate_eft` runs three models (large base, small fine-tuned, small base) in lock step,
each with its own cache, and samples from their EFT combination (``jaxeff.losses.eft_logprobs``).

The decoder blocks are ``llama.block`` itself: the cache is threaded through its
``attention_fn`` hook (the closure writes the new keys/values into the layer's cache slice and
attends over it), so whatever the block's projections do (dense, quantized or structured weights
through ``jaxeff.params.linear``) the cached decode does the same, with no second copy of the
model.

Shape letters: B batch, P prompt length, S cache slots, N layers, G KV heads, K head width,
H query heads, V vocabulary, D width.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff import kernels
from jaxeff._checks import check_bool, check_float, check_int, is_traced
from jaxeff.models import llama

if TYPE_CHECKING:
    from jaxeff.data import PackedPrompts

__all__ = ["KVCache", "init_cache", "prefill", "prefill_packed", "decode_step", "generate",
           "generate_eft", "sample_token"]


class KVCache(NamedTuple):
    """Keys and values of every layer at every slot, and which slots hold real tokens."""

    k_NxBxSxGxK: jax.Array
    v_NxBxSxGxK: jax.Array
    valid_BxS: jax.Array       # bool: slot written with a real (not padding) token
    pad_B: jax.Array           # int32: left padding of each row (position = slot - pad)


def init_cache(cfg: llama.LlamaConfig, batch: int, slots: int, pad_B=None) -> KVCache:
    """An empty cache of ``slots`` slots for ``batch`` rows (compute dtype)."""
    shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
    dt = jnp.dtype(cfg.compute_dtype)
    pad_B = jnp.zeros((batch,), jnp.int32) if pad_B is None else jnp.asarray(pad_B, jnp.int32)
    return KVCache(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, slots), bool),
                   pad_B)


def _cached_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, visible_BxTxS):
    B, T, H, K = q_BxTxHxK.shape
    G = k_BxSxGxK.shape[2]
    q_BxTxGxRxK = q_BxTxHxK.reshape(B, T, G, H // G, K)
    s_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK,
                             preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(K))
    s_BxGxRxTxS = jnp.where(visible_BxTxS[:, None, None], s_BxGxRxTxS, -1e30)
    p = jax.nn.softmax(s_BxGxRxTxS, axis=-1).astype(v_BxSxGxK.dtype)
    return jnp.einsum("bgrts,bsgk->btgrk", p, v_BxSxGxK).reshape(B, T, H, K)


def _step(params, cfg, cache: KVCache, tokens_BxT, slot, real_BxT):
    """Run ``tokens_BxT`` written at slots ``slot .. slot+T-1``; logits of the last one and the
    updated cache."""
    B, T = tokens_BxT.shape
    S = cache.valid_BxS.shape[1]
    slots_T = slot + jnp.arange(T, dtype=jnp.int32)
    positions_BxT = jnp.maximum(slots_T[None] - cache.pad_B[:, None], 0)
    valid_BxS = jax.lax.dynamic_update_slice_in_dim(cache.valid_BxS, real_BxT, slot, axis=1)
    visible_BxTxS = valid_BxS[:, None, :] & (jnp.arange(S)[None, None, :] <= slots_T[None, :, None])
    segments_BxT = jnp.ones((B, T), jnp.int32)      # unused by the cached attention

    def body(x_BxTxD, layer):
        lp, k_BxSxGxK, v_BxSxGxK = layer
        written = {}

        def attention(q, k, v, segment_ids, causal):
            del segment_ids, causal
            written["k"] = jax.lax.dynamic_update_slice_in_dim(
                k_BxSxGxK, k.astype(k_BxSxGxK.dtype), slot, axis=1)
            written["v"] = jax.lax.dynamic_update_slice_in_dim(
                v_BxSxGxK, v.astype(v_BxSxGxK.dtype), slot, axis=1)
            return _cached_attention(q, written["k"], written["v"], visible_BxTxS)

        x_BxTxD = llama.block(lp, x_BxTxD, cfg, segments_BxT, positions_BxT,
                              attention_fn=attention)
        return x_BxTxD, (written["k"], written["v"])

    x_BxTxD = llama.embed(params, tokens_BxT, cfg)
    x_BxTxD, (k, v) = jax.lax.scan(body, x_BxTxD,
                                   (params["layers"], cache.k_NxBxSxGxK, cache.v_NxBxSxGxK))
    logits_BxV = llama.logits(params, x_BxTxD[:, -1:], cfg)[:, 0]
    return logits_BxV, KVCache(k, v, valid_BxS, cache.pad_B)


def prefill(params, cfg: llama.LlamaConfig, tokens_BxP, real_BxP, slots: int):
    """Run a left-padded prompt block (``real_BxP`` marks real tokens) into a new cache of
    ``slots`` slots; returns ``(logits of the last prompt token [B, V], cache)``."""
    real_BxP = jnp.asarray(real_BxP, bool)
    pad_B = tokens_BxP.shape[1] - jnp.sum(real_BxP, axis=1).astype(jnp.int32)
    cache = init_cache(cfg, tokens_BxP.shape[0], slots, pad_B)
    return _step(params, cfg, cache, tokens_BxP, 0, real_BxP)


def prefill_packed(params, cfg: llama.LlamaConfig, packed: PackedPrompts, slots: int):
    """Prepacked prefill: run the packed prompt rows once, then gather every prompt's keys,
    values and last-token logits into the cache :func:`prefill` builds for the left-padded block.

    Paper: "Prepacking: A Simple Method for Fast Prefilling and Increased Throughput in Large
    Language Models" (Zhao et al., 2024). ``packed`` is ``jaxeff.data.pack_prompts(prompts,
    row_len)``: R rows of L tokens, segment ids keeping the prompts apart in the attention,
    positions restarting at 0 per prompt. With ``P = max_b n_b`` and ``pad_b = P - n_b``::

        cache slot s of prompt b  <-  packed token (row_B[b], start_B[b] + s - pad_b),
                                      pad_b <= s < P (other slots zero and masked)
        logits of prompt b        <-  packed token (row_B[b], start_B[b] + n_b - 1)

    so :func:`decode_step` continues at slot P exactly as after :func:`prefill` of the same
    prompts (equal to float tolerance: the packed pass attends with ``jaxeff.kernels.attention``
    over its row, the padded one over the cache). The prefill costs ``R * L`` token-forwards
    instead of ``B * P``. Returns ``(logits [B, V] float32, cache of `slots` slots)``.

    Raises ValueError for ``slots`` not an int >= the longest prompt (checked where the lengths
    are concrete, i.e. outside ``jit``).
    """
    slots = check_int("slots", slots, 1)
    if not is_traced(packed.length_B):
        # np.asarray first: np.max of a concrete jax.Array would call its traced .max method
        longest = int(np.max(np.asarray(packed.length_B)))
        if slots < longest:
            raise ValueError(f"slots={slots} is fewer than the longest prompt ({longest} tokens)")
    tokens_RxL = jnp.asarray(packed.tokens_RxL, jnp.int32)
    segments_RxL = jnp.asarray(packed.segment_ids_RxL, jnp.int32)
    positions_RxL = jnp.asarray(packed.positions_RxL, jnp.int32)
    row_B, start_B, length_B = (jnp.asarray(a, jnp.int32)
                                for a in (packed.row_B, packed.start_B, packed.length_B))
    L = tokens_RxL.shape[1]
    P = jnp.max(length_B)
    pad_B = P - length_B
    slot_S = jnp.arange(slots, dtype=jnp.int32)
    valid_BxS = (slot_S[None] >= pad_B[:, None]) & (slot_S[None] < P)
    col_BxS = jnp.clip(start_B[:, None] + slot_S[None] - pad_B[:, None], 0, L - 1)
    row_BxS = jnp.broadcast_to(row_B[:, None], col_BxS.shape)
    dt = jnp.dtype(cfg.compute_dtype)

    def to_cache(kv_RxLxGxK):
        kv_BxSxGxK = kv_RxLxGxK[row_BxS, col_BxS]
        return jnp.where(valid_BxS[..., None, None], kv_BxSxGxK, 0).astype(dt)

    def body(x_RxLxD, lp):
        kept = {}

        def attention(q, k, v, segment_ids, causal):
            kept["k"], kept["v"] = k, v
            return kernels.attention(q, k, v, segment_ids, causal=causal, impl=cfg.impl,
                                     interpret=cfg.interpret)

        x_RxLxD = llama.block(lp, x_RxLxD, cfg, segments_RxL, positions_RxL,
                              attention_fn=attention)
        return x_RxLxD, (to_cache(kept["k"]), to_cache(kept["v"]))

    x_RxLxD = llama.embed(params, tokens_RxL, cfg)
    x_RxLxD, (k, v) = jax.lax.scan(body, x_RxLxD, params["layers"])
    x_BxD = x_RxLxD[row_B, start_B + length_B - 1]
    logits_BxV = llama.logits(params, x_BxD[:, None], cfg)[:, 0]
    return logits_BxV, KVCache(k, v, valid_BxS, pad_B)


def decode_step(params, cfg: llama.LlamaConfig, cache: KVCache, token_B, slot):
    """One token per row at slot ``slot``: ``(logits [B, V], cache)``."""
    return _step(params, cfg, cache, token_B[:, None], slot,
                 jnp.ones((token_B.shape[0], 1), bool))


def sample_token(key, logits_BxV, temperature: float = 0.0, top_p: float = 1.0):
    """Next token per row: argmax at ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted to the top-p nucleus (``top_p == 1``: all)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    z_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order_BxV = jnp.argsort(-z_BxV, axis=-1)
        zs_BxV = jnp.take_along_axis(z_BxV, order_BxV, axis=-1)
        p_BxV = jax.nn.softmax(zs_BxV, axis=-1)
        before_BxV = jnp.cumsum(p_BxV, axis=-1) - p_BxV      # mass of the more likely tokens
        zs_BxV = jnp.where(before_BxV < top_p, zs_BxV, -jnp.inf)  # the top token always stays
        pick_B = jax.random.categorical(key, zs_BxV, axis=-1)
        return jnp.take_along_axis(order_BxV, pick_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, z_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfgs", "max_new_tokens", "temperature", "top_p",
                                             "eos_id"))
def _generate(params_models, tokens_BxP, real_BxP, key, beta, packed, *, cfgs, max_new_tokens,
              temperature, top_p, eos_id):
    """One model: its logits. Three models (EFT): ``eft_logprobs`` of their logits with ``beta``.
    ``packed`` (a ``PackedPrompts`` of the same prompts, or None): prefill with it."""
    B, P = tokens_BxP.shape
    N = max_new_tokens

    def combine(logits):
        if len(logits) == 1:
            return logits[0]
        from jaxeff.losses import eft_logprobs
        return eft_logprobs(*logits, beta=beta)

    if packed is None:
        firsts = [prefill(p, c, tokens_BxP, real_BxP, P + N) for p, c in zip(params_models, cfgs)]
    else:
        firsts = [prefill_packed(p, c, packed, P + N) for p, c in zip(params_models, cfgs)]
    caches = tuple(c for _, c in firsts)
    first_B = sample_token(jax.random.fold_in(key, 0), combine([l for l, _ in firsts]),
                           temperature, top_p)
    out_BxN = jnp.zeros((B, N), jnp.int32).at[:, 0].set(first_B)
    done_B = (first_B == eos_id) if eos_id is not None else jnp.zeros((B,), bool)

    def cond(state):
        t, _, _, done_B = state
        return (t < N) & ~jnp.all(done_B)

    def body(state):
        t, caches, out_BxN, done_B = state
        steps = [decode_step(p, c, cache, out_BxN[:, t - 1], P + t - 1)
                 for p, c, cache in zip(params_models, cfgs, caches)]
        nxt_B = sample_token(jax.random.fold_in(key, t), combine([l for l, _ in steps]),
                             temperature, top_p)
        if eos_id is not None:
            nxt_B = jnp.where(done_B, eos_id, nxt_B)
            done_B = done_B | (nxt_B == eos_id)
        return t + 1, tuple(c for _, c in steps), out_BxN.at[:, t].set(nxt_B), done_B

    t, _, out_BxN, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), caches, out_BxN, done_B))
    if eos_id is not None:   # rows stopped early: fill the untouched tail with eos
        out_BxN = jnp.where(jnp.arange(N)[None] < t, out_BxN, eos_id)
    return out_BxN


def _left_pad(prompt_ids, pad_id):
    if isinstance(prompt_ids, (list, tuple)):
        rows = [np.asarray(r).reshape(-1) for r in prompt_ids]
        if not rows or any(r.size == 0 for r in rows):
            raise ValueError("prompt_ids must be a non-empty list of non-empty token sequences")
        P = max(r.size for r in rows)
        tokens = np.full((len(rows), P), pad_id, np.int64)
        real = np.zeros((len(rows), P), bool)
        for b, r in enumerate(rows):
            tokens[b, P - r.size:], real[b, P - r.size:] = r, True
    else:
        tokens = np.asarray(prompt_ids)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"prompt_ids must be [B, P >= 1] (or a list of sequences); got "
                             f"shape {tokens.shape}")
        real = np.ones(tokens.shape, bool)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"prompt_ids must hold integer token ids; got dtype {tokens.dtype}")
    return tokens, real


def generate(params, cfg: llama.LlamaConfig, prompt_ids: Union[Sequence, np.ndarray, jax.Array],
             max_new_tokens: int, *, key: Optional[jax.Array] = None, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = None, pad_id: int = 0,
             prepack: bool = False, row_len: Optional[int] = None) -> jax.Array:
    """Generate ``max_new_tokens`` tokens after each prompt with a KV cache (jitted, batched).

    Args:
      params, cfg: a ``jaxeff.models.llama`` model.
      prompt_ids: int ``[B, P]`` (or ``[P]``), or a list of B token sequences of any lengths
        (left-padded internally; each row's positions start at 0 at its first token, so the
        result equals generating each prompt alone).
      max_new_tokens: N >= 1.
      key: a ``jax.random`` key; required when ``temperature > 0``.
      temperature: 0 (default) greedy; > 0 samples from ``softmax(logits / temperature)``.
      top_p: nucleus mass in (0, 1] (default 1: no truncation); used only when sampling.
      eos_id: stop token (e.g. ``tokenizer.eos_id``): a row that emits it keeps emitting it and
        decoding stops once every row has; None (default) always decodes N tokens.
      pad_id: the id written into the padding of ragged prompts (masked out; default 0).
      prepack: prefill the prompts bin-packed into rows (:func:`prefill_packed`, "Prepacking",
        Zhao et al., 2024) instead of padded to the longest; same tokens (default False).
      row_len: with ``prepack``, the packed row length (default: the longest prompt).

    Returns int32 ``[B, N]``: the new tokens only (``tokenizer.decode`` drops a trailing eos).

    Raises:
      ValueError / TypeError naming the argument: a bad prompt, ``max_new_tokens < 1``,
      ``P + N > cfg.max_seq_len``, a negative temperature, ``top_p`` outside (0, 1], a missing
      ``key`` when sampling, ids outside the vocabulary, a non-bool ``prepack``, ``row_len``
      without ``prepack`` or shorter than the longest prompt.
    """
    return _run([(params, cfg)], prompt_ids, max_new_tokens, key=key, temperature=temperature,
                top_p=top_p, eos_id=eos_id, pad_id=pad_id, beta=0.0, prepack=prepack,
                row_len=row_len)


def _run(models, prompt_ids, max_new_tokens, *, key, temperature, top_p, eos_id, pad_id, beta,
         prepack=False, row_len=None):
    cfg = models[0][1]
    prepack = check_bool("prepack", prepack)
    if row_len is not None and not prepack:
        raise ValueError(f"row_len={row_len!r} is used only with prepack=True; pass prepack=True "
                         f"or drop row_len")
    N = check_int("max_new_tokens", max_new_tokens, 1)
    temperature = check_float("temperature", temperature, 0.0)
    top_p = check_float("top_p", top_p, 0.0, 1.0, min_open=True)
    if eos_id is not None:
        eos_id = check_int("eos_id", eos_id, 0, cfg.vocab_size - 1)
    pad_id = check_int("pad_id", pad_id, 0, cfg.vocab_size - 1)
    tokens, real = _left_pad(prompt_ids, pad_id)
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"prompt_ids must be in [0, {cfg.vocab_size}); got values in "
                         f"[{tokens.min()}, {tokens.max()}]")
    for _, c in models:
        if tokens.shape[1] + N > c.max_seq_len:
            raise ValueError(f"prompt length {tokens.shape[1]} + max_new_tokens {N} exceeds "
                             f"cfg.max_seq_len={c.max_seq_len}")
    if temperature > 0 and key is None:
        raise ValueError("key is required when temperature > 0 (sampling); pass "
                         "key=jax.random.key(seed)")
    key = jax.random.key(0) if key is None else key
    packed = None
    if prepack:
        from jaxeff.data import pack_prompts     # lazily: `import jaxeff.models` skips Grain
        rows = [t[r] for t, r in zip(tokens, real)]
        packed = jax.tree.map(jnp.asarray, pack_prompts(rows, row_len, pad_id=pad_id))
    return _generate(tuple(p for p, _ in models), jnp.asarray(tokens, jnp.int32),
                     jnp.asarray(real), key, jnp.asarray(beta, jnp.float32), packed,
                     cfgs=tuple(c for _, c in models), max_new_tokens=N,
                     temperature=temperature, top_p=top_p, eos_id=eos_id)


def generate_eft(models: Sequence, prompt_ids, max_new_tokens: int, *, beta: float = 1.0,
                 key: Optional[jax.Array] = None, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id: Optional[int] = None, pad_id: int = 0) -> jax.Array:
    """EFT up-scaling decode with three KV caches: each step samples from
    ``log_softmax(log p_Lb + beta (log p_Sft - log p_Sb))`` (``jaxeff.losses.eft_logprobs``).

    Paper: "An Emulator for Fine-Tuning Large Language Models using Small Language Models"
    (Mitchell et al., 2023). ``models`` is ``[(params, cfg)]`` for (large base, small fine-tuned,
    small base); the configs may differ but must share the vocabulary. The cached counterpart of
    ``jaxeff.losses.eft_generate`` (which recomputes the prefix each step); the other arguments
    and the result are as in :func:`generate`.

    Raises what :func:`generate` raises; ValueError for not three models or differing
    vocabularies; ValueError for a non-finite ``beta``.
    """
    if not isinstance(models, (list, tuple)) or len(models) != 3 or not all(
            isinstance(m, (list, tuple)) and len(m) == 2
            and isinstance(m[1], llama.LlamaConfig) for m in models):
        raise ValueError("models must be three (params, LlamaConfig) pairs: (large base, small "
                         "fine-tuned, small base)")
    vocab = {m[1].vocab_size for m in models}
    if len(vocab) != 1:
        raise ValueError(f"the three models must share the vocabulary; got sizes {sorted(vocab)}")
    beta = check_float("beta", beta)
    return _run(list(models), prompt_ids, max_new_tokens, key=key, temperature=temperature,
                top_p=top_p, eos_id=eos_id, pad_id=pad_id, beta=beta)
