"""UniPT: a light parallel network on a frozen backbone's per-layer features.

Paper: "UniPT: Universal Parallel Tuning for Transfer Learning with Efficient Parameter and
Memory" (Diao et al., 2023; reference code Paranioar/UniPT, ``CLIP4Clip/modules/module_adapter.py``,
the transformer variant that adds its output to the backbone's). Almost every parameter-efficient
method (LoRA, adapters, prompts) still back-propagates through the whole backbone; UniPT's side
network reads the backbone's layer outputs as constants (``jax.lax.stop_gradient``), so the
backward pass never enters the backbone: no backbone activations are kept for it, no backbone
gradient is computed. The features can also be computed once and cached.

The side network, exactly (features ``h_n [B, L, D]`` for ``n = 1..N``, the anchor ``h_a`` =
the backbone's output, by default ``h_N``; width ``R``; ``m`` the padding mask)::

    a   = relu(h_a) W_a + b_a                           [B, L, R]  anchor down-projection
    t_n = relu(h_n) W_n + b_n                           [B, L, R]  one down-projection per layer
    # parallel interaction module: each anchor token gathers from layer n's tokens
    S_n[i, j] = relu(a_i . t_n,j) m_j                   [B, L, L]
    c_n,i = sum_j S_n[i, j] / max(sum_j S_n[i, j], 1e-6) t_n,j  +  t_n,0       (t_n,0: [CLS])
    # confidence aggregation module: a softmax over layers of a learned gate
    g_n = w_g . (a_0 * mean_m(t_n))                     [B]  (masked mean over tokens)
    z_i = sum_n softmax_n(g)_n c_n,i                    [B, L, R]
    out = h_a + relu(z) W_up + b_up                     [B, L, D]

Deviations from the reference, each on purpose: ``W_up, b_up`` start at zero, so at
initialisation ``out == h_a`` exactly (the frozen model's output; the reference uses PyTorch's
default init); the gate has no bias (a bias shared by all layers cancels in the softmax over
layers: the reference's gets no gradient); all layers share one width ``D`` (stacked ``W_n``).
``causal=True`` (for a decoder, where token ``i`` must not see later tokens, a case the paper's
encoders do not have) restricts the interaction to ``j <= i``, uses the token itself instead of
``t_n,0`` and the anchor token ``a_i`` with the prefix mean of ``t_n`` in the gate, so ``g`` and
``z`` are per token.

Side parameters (``R`` = width, ``N`` = n_features, ``D`` = d_model)::

    {'down_w': [N, D, R], 'down_b': [N, R], 'anchor_w': [D, R], 'anchor_b': [R],
     'gate_w': [R], 'up_w': [R, D], 'up_b': [D]}    # N*D*R + N*R + 2*D*R + 2*R + D scalars

Example (BERT; ``bert.forward(..., return_layers=True)`` returns the ``N = n_layers + 1``
states of one pass)::

    side_net = unipt(cfg.n_layers + 1, cfg.d_model, width=96)
    side = side_net.init(key)
    h, layers = bert.forward(params, ids, cfg, mask, return_layers=True)
    out = side_net.apply(side, layers, mask)        # [B, L, D]; grads reach `side` only
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxeff._checks import check_bool, check_float_dtype, check_int, check_key, check_same_shapes
from jaxeff.params._structured import uniform

__all__ = ["UniPT", "unipt"]


def _masked_mean(t_NxBxLxR, m_BxL, causal):
    """Mean over tokens of the unmasked ones (``sum / max(count, 1)``, as the reference); with
    ``causal`` the prefix mean at every token, ``[N, B, L, R]``, else ``[N, B, 1, R]``."""
    m = m_BxL[None, :, :, None]
    if causal:
        return jnp.cumsum(t_NxBxLxR * m, axis=2) / jnp.maximum(jnp.cumsum(m, axis=2), 1.0)
    return (jnp.sum(t_NxBxLxR * m, axis=2, keepdims=True)
            / jnp.maximum(jnp.sum(m, axis=2, keepdims=True), 1.0))


@dataclasses.dataclass(frozen=True)
class UniPT:
    """The UniPT side network (built by :func:`unipt`); its formula is in the module docstring."""

    n_features: int
    d_model: int
    width: int
    causal: bool = False

    def param_count(self) -> int:
        """``N*D*R + N*R + 2*D*R + 2*R + D``: every side parameter is trainable."""
        N, D, R = self.n_features, self.d_model, self.width
        return N * D * R + N * R + 2 * D * R + 2 * R + D

    def init(self, key, dtype=jnp.float32) -> dict:
        """Side parameters: ``W_n, b_n, W_a, b_a, w_g ~ U(+-1/sqrt(fan_in))`` (PyTorch's
        ``nn.Linear`` default, as the reference), ``W_up = b_up = 0`` (output = anchor).

        Raises TypeError naming ``key`` / ``dtype`` for a bad key or a non-floating dtype.
        """
        key = check_key("key", key)
        dtype = check_float_dtype("dtype", dtype, allow_none=False)
        N, D, R = self.n_features, self.d_model, self.width
        k = jax.random.split(key, 5)
        bd, br = 1.0 / math.sqrt(D), 1.0 / math.sqrt(R)
        return {"down_w": uniform(k[0], (N, D, R), dtype, -bd, bd),
                "down_b": uniform(k[1], (N, R), dtype, -bd, bd),
                "anchor_w": uniform(k[2], (D, R), dtype, -bd, bd),
                "anchor_b": uniform(k[3], (R,), dtype, -bd, bd),
                "gate_w": uniform(k[4], (R,), dtype, -br, br),
                "up_w": jnp.zeros((R, D), dtype), "up_b": jnp.zeros((D,), dtype)}

    def apply(self, side: dict, layers_NxBxLxD, mask_BxL=None, anchor_BxLxD=None) -> jax.Array:
        """The adapted output ``h_a + relu(z) W_up + b_up`` ``[B, L, D]`` (float32 or wider).

        ``layers_NxBxLxD``: the backbone's ``N`` per-layer states; ``mask_BxL``: 1 = real token
        (default all real); ``anchor_BxLxD``: the output to adapt (default ``layers[-1]``). Both
        pass through ``jax.lax.stop_gradient``: no gradient reaches the backbone, and JAX does not
        even build the backbone's backward pass.

        Raises ValueError for features of another rank, count or width, a mask or anchor of
        another shape, or ``side`` not shaped as :meth:`init` makes it.
        """
        h = jnp.asarray(layers_NxBxLxD)
        N, D = self.n_features, self.d_model
        if h.ndim != 4 or h.shape[0] != N or h.shape[-1] != D:
            raise ValueError(f"layers_NxBxLxD must be [n_features={N}, batch, length, "
                             f"d_model={D}]; got shape {h.shape}")
        _, B, L, _ = h.shape
        check_same_shapes("side", side, jax.eval_shape(self.init, jax.random.key(0)),
                          "UniPT.init's parameters")
        if mask_BxL is not None and tuple(jnp.shape(mask_BxL)) != (B, L):
            raise ValueError(f"mask_BxL must have shape {(B, L)}; got {tuple(jnp.shape(mask_BxL))}")
        if anchor_BxLxD is not None and tuple(jnp.shape(anchor_BxLxD)) != (B, L, D):
            raise ValueError(f"anchor_BxLxD must have shape {(B, L, D)}; got "
                             f"{tuple(jnp.shape(anchor_BxLxD))}")
        cd = jnp.result_type(h.dtype, side["up_w"].dtype, jnp.float32)
        h = jax.lax.stop_gradient(h).astype(cd)
        anchor = h[-1] if anchor_BxLxD is None else \
            jax.lax.stop_gradient(jnp.asarray(anchor_BxLxD)).astype(cd)
        m_BxL = (jnp.ones((B, L), cd) if mask_BxL is None
                 else (jnp.asarray(mask_BxL) > 0).astype(cd))
        p = jax.tree.map(lambda x: x.astype(cd), side)

        a_BxLxR = jax.nn.relu(anchor) @ p["anchor_w"] + p["anchor_b"]
        t_NxBxLxR = (jnp.einsum("nbld,ndr->nblr", jax.nn.relu(h), p["down_w"])
                     + p["down_b"][:, None, None, :])
        s_NxBxLxL = jax.nn.relu(jnp.einsum("blr,nbjr->nblj", a_BxLxR, t_NxBxLxR))
        s_NxBxLxL = s_NxBxLxL * m_BxL[None, :, None, :]
        if self.causal:
            s_NxBxLxL = s_NxBxLxL * jnp.tril(jnp.ones((L, L), cd))
        w_NxBxLxL = s_NxBxLxL / jnp.maximum(jnp.sum(s_NxBxLxL, -1, keepdims=True), 1e-6)
        c_NxBxLxR = jnp.einsum("nblj,nbjr->nblr", w_NxBxLxL, t_NxBxLxR)
        pooled = _masked_mean(t_NxBxLxR, m_BxL, self.causal)      # [N, B, L or 1, R]
        if self.causal:
            c_NxBxLxR = c_NxBxLxR + t_NxBxLxR
            g_NxBxL = jnp.einsum("nblr,r->nbl", a_BxLxR[None] * pooled, p["gate_w"])
        else:
            c_NxBxLxR = c_NxBxLxR + t_NxBxLxR[:, :, :1]
            g_NxBxL = jnp.einsum("nblr,r->nbl", a_BxLxR[None, :, :1] * pooled, p["gate_w"])
        conf_NxBxL = jax.nn.softmax(g_NxBxL, axis=0)
        z_BxLxR = jnp.sum(conf_NxBxL[..., None] * c_NxBxLxR, axis=0)
        return anchor + jax.nn.relu(z_BxLxR) @ p["up_w"] + p["up_b"]


def unipt(n_features: int, d_model: int, width: int, *, causal: bool = False) -> UniPT:
    """Build the UniPT side network (formula and paper in the module docstring).

    Args:
      n_features: N >= 1, how many per-layer states feed it (``n_layers + 1`` for the reference
        models' ``return_layers``: the embedding output and every layer's).
      d_model: D >= 1, their width.
      width: R >= 1, the side network's width (the reference: ``D // downsample_D_factor``).
      causal: True for a decoder (token i sees only tokens <= i), False (default) for an encoder.
    Raises TypeError/ValueError naming the argument.
    """
    return UniPT(check_int("n_features", n_features, 1), check_int("d_model", d_model, 1),
                 check_int("width", width, 1), check_bool("causal", causal))
