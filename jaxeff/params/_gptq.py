"""GPTQ: second-order post-training quantization of one weight from its input Hessian.

"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (Frantar,
Ashkboos, Hoefler, Alistarh, ICLR 2023). For a linear layer ``y = x @ W`` (``W [IN, OUT]``) with
calibration inputs ``X [n, IN]`` GPTQ minimises ``||X W - X Q||^2`` row by row of ``W`` (= column
by column of the paper's ``[OUT, IN]`` weight), feeding each row's rounding error forward through
the inverse Hessian ``H = (2/n) X^T X``:

1. dead inputs (``H_dd = 0``, an input channel that was always zero): ``H_dd = 1`` and
   ``W[d, :] = 0`` (as the reference). An all-zero Hessian (a layer that saw no calibration
   token) is no evidence at all: it is replaced by ``H = I``, which makes the solve exactly RTN
   of the original weight (:func:`gptq` warns, naming the layer);
2. act-order (optional): permute rows by ``diag(H)`` descending;
3. damping: ``H += percdamp * mean(diag(H)) * I``;
4. ``U`` = upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``);
5. for each row ``i``: ``q_i = quant(w_i)``, ``e_i = (w_i - q_i) / U_ii``, later rows of the block
   ``w_j -= U_ij e_i``; after each block of ``block_size`` rows (lazy batch update) all later rows
   ``W[i2:] -= U[i1:i2, i2:]^T E``.
6. Groups: scale/zero of each group of ``group_size`` rows are computed from the error-updated
   rows when the solve reaches the group.

The quantizer, the packed leaf and its layout are those of ``jaxeff.params.quantized``.

The OBS update above is independent of the grid the rows are rounded to: :func:`gptq_solve_grid`
takes a pluggable per-column quantizer, a hashable object (a static argument under ``jit``) with
two methods (``OUT`` is the number of output columns)::

    params(rows [gs, OUT]) -> tuple of [OUT] arrays    # from a group's error-updated rows
    quantize(x [OUT], params) -> (code [OUT], x_hat [OUT])   # code: integer-valued float

An all-zero group must keep its params finite and zero rows must quantize to ``x_hat = 0``
(padding rows rely on it). :class:`UniformGrid` is GPTQ's asymmetric/symmetric int grid
(:func:`gptq_solve`, :func:`gptq`); ``jaxeff.params.Pow2Grid`` the power-of-two grid
(``jaxeff.params.pow2_gptq``). This file is the one home of the OBS update.
Defaults follow the reference code (IST-DASLab ``gptq.py``): ``block_size=128, percdamp=0.01,
group_size=None, act_order=False``. Everything is jit-able: nested ``lax.fori_loop``s over groups,
blocks and rows, ``lax.map`` over stacked matrices.

Deviation, documented: the reference reads a group's parameters from its global ``W``, which
misses the in-block updates when ``group_size`` and ``block_size`` are not aligned, so its result
depends on the block size. Here the block size is shrunk to align with the groups (largest divisor
of ``group_size`` not above ``block_size``, or the largest multiple of ``group_size`` not above it),
so group parameters always see the fully updated rows and the result is block-size independent.

Singularity test (deviation: the reference only relies on ``torch.linalg.cholesky`` raising):
the factor is rejected when it is not finite or when a pivot of the damped Hessian is lost in
rounding, ``piv_i <= n * eps * Hd_ii`` with ``Hd`` the damped diagonal actually factorised
(``piv_i = Hd_ii - sum_k L_ik^2`` is computed with an error of at most ``~n eps Hd_ii``). A test
against ``n eps max(diag)`` (used before) is unsound: a dead channel (``Hd_ii = 1 + damp``)
beside an outlier channel (``max/mean diag`` ~ 1e3 in real LLMs) fails it on well-conditioned
Hessians.

Hessians are accumulated streaming in float32 with :func:`hessian_update` (a running mean over
tokens, so the activations are never kept): ``H_n = (c/(c+m)) H_c + (2/(c+m)) sum_t x_t x_t^T``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxeff.params._quantized import (QuantizedWeight, check_quant_args, find_params, pack,
                                      quantize_codes)

__all__ = ["HessianState", "hessian_init", "hessian_update", "hessian_update_all", "GPTQResult",
           "UniformGrid", "gptq_solve_grid", "gptq_solve", "map_solve", "gptq_weight", "gptq",
           "check_ok", "check_hessian", "check_solver_args", "check_gptq_inputs",
           "aligned_block_size", "quant_error"]

_HI = jax.lax.Precision.HIGHEST


class HessianState(NamedTuple):
    """Running ``H = (2/count) sum_t x_t x_t^T`` (float32 ``[..., IN, IN]``) and token ``count``."""

    h: jax.Array
    count: jax.Array


def hessian_init(in_dim: int, batch_shape: tuple = ()) -> HessianState:
    """Zero Hessian state for inputs of width ``in_dim`` (optionally a batch of them)."""
    if not isinstance(in_dim, (int, np.integer)) or in_dim <= 0:
        raise ValueError(f"in_dim must be a positive int; got {in_dim!r}")
    return HessianState(jnp.zeros((*batch_shape, in_dim, in_dim), jnp.float32),
                        jnp.zeros(batch_shape, jnp.float32))


def hessian_update(state: HessianState, x: jax.Array, mask: Optional[jax.Array] = None
                   ) -> HessianState:
    """Fold activations ``x [..., IN]`` (all leading axes are tokens) into the running Hessian.

    ``H' = (c / (c + m)) H + (2 / (c + m)) sum_t mask_t x_t x_t^T`` with ``m = sum_t mask_t``,
    computed in float32 at HIGHEST matmul precision. ``mask`` (same leading shape as ``x``; e.g.
    ``segment_ids > 0``) drops padding tokens. Raises ``ValueError`` on a width or mask-shape
    mismatch.
    """
    d = state.h.shape[-1]
    if x.shape[-1] != d:
        raise ValueError(f"x has width {x.shape[-1]} but the Hessian is for width {d}")
    x = x.reshape(-1, d).astype(jnp.float32)
    if mask is None:
        m = jnp.ones((x.shape[0],), jnp.float32)
    else:
        if int(np.prod(mask.shape)) != x.shape[0]:
            raise ValueError(f"mask shape {mask.shape} does not match the token axes of x "
                             f"({x.shape[0]} tokens)")
        m = mask.reshape(-1).astype(jnp.float32)
    total = state.count + jnp.sum(m)
    safe = jnp.maximum(total, 1.0)
    kw = {}
    sharding = getattr(jax.typeof(x), "sharding", None)
    if sharding is not None and any(s is not None for s in getattr(sharding, "spec", ())):
        # Explicitly sharded tokens (data parallel): partial sums all-reduced to a replicated H.
        kw["out_sharding"] = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    xtx = jnp.matmul((x * m[:, None]).T, x, precision=_HI, **kw)
    h = jnp.where(total > 0, state.h * (state.count / safe) + (2.0 / safe) * xtx, state.h)
    return HessianState(h, total)


def hessian_update_all(states: dict, captured: dict, mask: Optional[jax.Array] = None) -> dict:
    """:func:`hessian_update` of every ``states[k]`` with its captured input ``captured[k]``.

    The one accumulation step of the model-level drivers (:func:`jaxeff.params.gptq_model`,
    :func:`jaxeff.params.gptq_nnx`): ``H_k' = (c/(c+m)) H_k + (2/(c+m)) sum_t mask_t x_kt
    x_kt^T`` for each key. ``mask`` (e.g. ``segment_ids > 0``) must have the leading (token)
    shape of every captured input. Raises ``ValueError`` naming the key on a missing input or
    a mask that does not fit it.
    """
    out = dict(states)
    for k in states:
        if k not in captured:
            raise ValueError(f"no captured input for {k!r}; captured: {sorted(captured)[:12]}")
        x = captured[k]
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"token_mask shape {tuple(mask.shape)} does not match the captured "
                             f"input {k!r} of shape {tuple(x.shape)}")
        out[k] = hessian_update(states[k], x, mask)
    return out


class GPTQResult(NamedTuple):
    """Output of :func:`gptq_solve` for one matrix ``[IN, OUT]``.

    ``codes`` int32 ``[IN, OUT]`` in stored (permuted) row order, ``scale``/``zero`` float32
    ``[G, OUT]``, ``perm`` int32 ``[IN]`` (stored row r = original row perm[r]), ``ok`` bool:
    False when the damped Hessian is numerically singular (the result is then garbage).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    perm: jax.Array
    ok: jax.Array


def aligned_block_size(block_size: int, group_size: int) -> int:
    """The block size actually used: aligned with the groups (module docstring, deviation)."""
    if group_size >= block_size:
        return max(d for d in range(1, block_size + 1) if group_size % d == 0)
    return (block_size // group_size) * group_size


def _inverse_hessian_factor(h, percdamp):
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1`` and a non-singularity flag."""
    # With J the row reversal and J H J = L L^T: H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J is
    # upper-triangular with a positive diagonal, so it *is* the upper Cholesky factor of H^-1
    # (one factorisation and one triangular inverse instead of the reference's three steps).
    n = h.shape[0]
    eye = jnp.eye(n, dtype=h.dtype)
    h = h + percdamp * jnp.mean(jnp.diagonal(h)) * eye
    hr = h[::-1, ::-1]
    low = jnp.linalg.cholesky(hr)
    u = jax.scipy.linalg.solve_triangular(low, eye, lower=True)[::-1, ::-1]
    piv = jnp.diagonal(low) ** 2
    # Each pivot against its own damped diagonal (module docstring: singularity test).
    tol = n * jnp.finfo(h.dtype).eps * jnp.diagonal(hr)
    ok = jnp.all(jnp.isfinite(u)) & jnp.all(jnp.isfinite(low)) & jnp.all(piv > tol)
    return u, ok


@dataclasses.dataclass(frozen=True)
class UniformGrid:
    """GPTQ's integer grid as a per-column quantizer for :func:`gptq_solve_grid`.

    ``params(rows) = (scale, zero)`` by ``jaxeff.params.find_params`` over the group's rows;
    ``quantize(x) = (q, scale * (q - zero))`` with ``q = clip(round(x / scale) + zero, 0,
    2**bits - 1)`` (module docstring of ``jaxeff.params.quantized``).
    """

    bits: int
    sym: bool = False
    scale_dtype: Any = jnp.float32

    def params(self, rows):
        s, z = find_params(rows, self.bits, self.sym, self.scale_dtype, axis=0)
        return s[0], z[0]

    def quantize(self, x, params):
        s, z = params
        q = quantize_codes(x, s, z, self.bits)
        return q, s * (q - z)


@functools.partial(jax.jit, static_argnames=("quantizer", "group_size", "block_size",
                                             "act_order"))
def gptq_solve_grid(w: jax.Array, h: jax.Array, percdamp=0.01, *, quantizer,
                    group_size: Optional[int] = None, block_size: int = 128,
                    act_order: bool = False):
    """The GPTQ (OBS) solve for one matrix ``w [IN, OUT]`` onto any per-column grid (jit-able).

    Algorithm in the module docstring (an all-zero ``h`` gives round-to-nearest of ``w``);
    ``quantizer`` follows the protocol there (:class:`UniformGrid`, ``jaxeff.params.Pow2Grid``).
    ``group_size`` must already be valid for ``IN`` (:func:`jaxeff.params.check_quant_args`); a
    ragged last group is handled as zero rows with a decoupled unit Hessian. Computes in float32
    (float64 when ``w`` is float64).

    Returns ``(codes, params, perm, ok)``: codes ``[IN, OUT]`` (integer-valued, ``w``'s compute
    dtype) in stored (permuted) row order; ``params`` the quantizer's tuple, each ``[G, OUT]``;
    ``perm`` int32 ``[IN]``; ``ok`` False when the damped Hessian is numerically singular (the
    result is then garbage). Never raises on singular Hessians.
    """
    n_in, n_out = w.shape
    ct = jnp.promote_types(w.dtype, jnp.float32)
    w = w.astype(ct)
    h = h.astype(ct)

    diag = jnp.diagonal(h)
    empty = jnp.all(diag == 0)          # no calibration token: H = I, i.e. RTN of w
    dead = (diag == 0) & ~empty
    h = jnp.where(empty, jnp.eye(n_in, dtype=ct), h + jnp.diag(dead.astype(ct)))
    w = jnp.where(dead[:, None], 0.0, w)
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True).astype(jnp.int32)
        w = w[perm]
        h = h[perm][:, perm]
    else:
        perm = jnp.arange(n_in, dtype=jnp.int32)
    u, ok = _inverse_hessian_factor(h, jnp.asarray(percdamp, ct))

    grouped = group_size is not None and group_size < n_in
    if grouped:
        gs = group_size
        bs = aligned_block_size(block_size, gs)
        n_pad = -(-n_in // gs) * gs
        n_pad = -(-n_pad // bs) * bs
    else:  # one group over everything; zero pad rows never change a grid's params (protocol)
        bs = min(block_size, n_in)
        n_pad = -(-n_in // bs) * bs
        gs = n_pad
    # Pad rows: W = 0, U = I (decoupled), so they quantize to zero with zero error.
    w = jnp.pad(w, ((0, n_pad - n_in), (0, 0)))
    u = jax.scipy.linalg.block_diag(u, jnp.eye(n_pad - n_in, dtype=ct)) if n_pad > n_in else u
    n_groups = n_pad // gs
    params_of = quantizer.params

    def row_step(i, carry):
        """Quantize row i of the block, push its error into the later rows of the block."""
        w1, q1, e1, u1, p = carry
        x = w1[i]
        q, x_hat = quantizer.quantize(x, p)
        err = (x - x_hat) / u1[i, i]
        w1 = w1 - u1[i][:, None] * err[None, :]       # U upper-triangular: rows < i untouched
        return w1, q1.at[i].set(q.astype(ct)), e1.at[i].set(err), u1, p

    def block_step(i1, w, q_all, rows_fn, extra):
        """Rows i1 .. i1+bs: ``rows_fn`` quantizes them on a working copy (threading ``extra``),
        then the block's errors update all later rows at once (lazy batch update)."""
        w1 = jax.lax.dynamic_slice(w, (i1, 0), (bs, n_out))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (bs, bs))
        zeros = jnp.zeros_like(w1)          # *_like: keeps an explicit OUT sharding of w
        w1, q1, e1, extra = rows_fn(w1, u1, zeros, zeros, extra)
        q_all = jax.lax.dynamic_update_slice(q_all, q1, (i1, 0))
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (bs, n_pad))
        # Earlier rows get zeros (U is upper-triangular); the block's own rows are done.
        w = w - jnp.matmul(u_rows.T, e1, precision=_HI)
        return w, q_all, extra

    def put(p_all, g, p):
        return tuple(a.at[g].set(b.astype(ct)) for a, b in zip(p_all, p))

    q_all = jnp.zeros_like(w)
    shapes = jax.eval_shape(params_of, w[:gs])
    p_all = tuple(jnp.broadcast_to(jnp.zeros_like(w[0]), (n_groups, n_out)) for _ in shapes)

    if gs >= bs:  # groups span whole blocks: params at the group start, all rows updated
        def group_body(g, carry):
            w, q_all, p_all = carry
            p = params_of(jax.lax.dynamic_slice(w, (g * gs, 0), (gs, n_out)))

            def rows_fn(w1, u1, q1, e1, extra):
                w1, q1, e1, _, _ = jax.lax.fori_loop(0, bs, row_step, (w1, q1, e1, u1, p))
                return w1, q1, e1, extra

            def blk(b, c):
                return block_step(g * gs + b * bs, c[0], c[1], rows_fn, ())[:2]

            w, q_all = jax.lax.fori_loop(0, gs // bs, blk, (w, q_all))
            return w, q_all, put(p_all, g, p)

        _, q_all, p_all = jax.lax.fori_loop(0, n_groups, group_body, (w, q_all, p_all))
    else:  # several groups per block: params from the block's updated working copy
        per_block = bs // gs

        def blk(b, carry):
            w, q_all, p_all = carry

            def rows_fn(w1, u1, q1, e1, p_all):
                def grp(k, c):
                    w1, q1, e1, p_all = c
                    p = params_of(jax.lax.dynamic_slice(w1, (k * gs, 0), (gs, n_out)))

                    def row(j, cc):
                        return row_step(k * gs + j, cc)

                    w1, q1, e1, _, _ = jax.lax.fori_loop(0, gs, row, (w1, q1, e1, u1, p))
                    return w1, q1, e1, put(p_all, b * per_block + k, p)

                return jax.lax.fori_loop(0, per_block, grp, (w1, q1, e1, p_all))

            return block_step(b * bs, w, q_all, rows_fn, p_all)

        _, q_all, p_all = jax.lax.fori_loop(0, n_pad // bs, blk, (w, q_all, p_all))

    n_real_groups = -(-n_in // gs) if grouped else 1
    return q_all[:n_in], tuple(p[:n_real_groups] for p in p_all), perm, ok


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "block_size", "act_order",
                                             "sym", "scale_dtype"))
def gptq_solve(w: jax.Array, h: jax.Array, percdamp=0.01, *, bits: int,
               group_size: Optional[int] = None, block_size: int = 128,
               act_order: bool = False, sym: bool = False, scale_dtype=jnp.float32) -> GPTQResult:
    """The GPTQ solve for one matrix ``w [IN, OUT]`` onto the int grid (jit-able).

    :func:`gptq_solve_grid` with ``UniformGrid(bits, sym, scale_dtype)`` (GPTQ's quantizer;
    an all-zero ``h`` gives RTN of ``w``). ``group_size`` must already be valid for ``IN``
    (:func:`jaxeff.params.check_quant_args`). Returns a :class:`GPTQResult`; never raises on
    singular Hessians (see ``ok``).
    """
    grid = UniformGrid(int(bits), bool(sym), jnp.dtype(scale_dtype))
    codes, (scale, zero), perm, ok = gptq_solve_grid(
        w, h, percdamp, quantizer=grid, group_size=group_size, block_size=block_size,
        act_order=act_order)
    return GPTQResult(codes=codes.astype(jnp.int32), scale=scale.astype(jnp.float32),
                      zero=jnp.clip(zero, 0, 2 ** bits - 1).astype(jnp.float32), perm=perm,
                      ok=ok)


def map_solve(solve, w: jax.Array, h: jax.Array):
    """``solve(w_i, h_i)`` for each matrix of ``w [..., IN, OUT]`` / ``h [..., IN, IN]``.

    One matrix at a time (``lax.map``: the memory of one solve, and a smaller program than
    ``vmap``); the result pytree gets ``w``'s leading axes back.
    """
    batch, n_in = w.shape[:-2], w.shape[-2]
    wf, hf = w.reshape(-1, *w.shape[-2:]), h.reshape(-1, n_in, n_in)
    if wf.shape[0] == 1:
        res = jax.tree.map(lambda x: x[None], solve(wf[0], hf[0]))
    else:
        res = jax.lax.map(lambda wh: solve(wh[0], wh[1]), (wf, hf))
    return jax.tree.map(lambda x: x.reshape(*batch, *x.shape[1:]), res)


@functools.partial(jax.jit, static_argnames=("bits", "group_size", "stored_group_size",
                                             "block_size", "act_order", "sym", "scale_dtype"))
def gptq_weight(w, h, percdamp=0.01, *, bits, group_size, stored_group_size, block_size=128,
                act_order=False, sym=False, scale_dtype=jnp.float32):
    """Jit-able GPTQ of ``w [..., IN, OUT]`` into ``(QuantizedWeight, ok)``, without checks.

    :func:`gptq_solve` mapped over the leading axes (:func:`map_solve`), then packed.
    ``stored_group_size`` is the validated group size (``IN`` when ungrouped); ``ok`` is False
    when a Hessian is singular.
    Use :func:`gptq` outside ``jit``: it validates arguments and raises on ``not ok``.
    """
    solve = functools.partial(gptq_solve, percdamp=percdamp, bits=bits, group_size=group_size,
                              block_size=block_size, act_order=act_order, sym=sym,
                              scale_dtype=scale_dtype)
    res = map_solve(solve, w, h)
    qw = QuantizedWeight(
        packed=pack(res.codes, bits), scale=res.scale.astype(scale_dtype),
        zero=res.zero.astype(jnp.uint8), perm=res.perm, shape=tuple(w.shape),
        dtype=jnp.dtype(w.dtype).name, bits=bits, group_size=stored_group_size,
        act_order=act_order)
    return qw, res.ok


def check_gptq_inputs(w, h, bits, group_size, block_size, percdamp, pad, name=None):
    """The host-side checks of :func:`gptq` (and ``jaxeff.params.pow2_gptq``) before a solve.

    Returns ``(w, h, stored_group_size)`` with ``h`` unwrapped from a :class:`HessianState`.
    Raises ``ValueError`` for a ``w`` with fewer than 2 axes, an ``h`` of the wrong shape, bad
    ``bits``/``group_size``/``block_size``/``percdamp``, or -- outside a trace -- NaN/inf in
    ``h`` or ``w``; warns for an all-zero ``h`` (:func:`check_hessian`).
    """
    if isinstance(h, HessianState):
        h = h.h
    w = jnp.asarray(w)
    h = jnp.asarray(h)
    if w.ndim < 2:
        raise ValueError(f"w must have at least 2 axes [..., IN, OUT]; got shape {w.shape}")
    n_in = w.shape[-2]
    if h.shape != (*w.shape[:-2], n_in, n_in):
        raise ValueError(f"h must have shape {(*w.shape[:-2], n_in, n_in)} for w of shape "
                         f"{w.shape}; got {h.shape}")
    gs = check_quant_args(bits, group_size, n_in, pad)
    check_solver_args(block_size, percdamp)
    check_hessian(h, name)
    if not isinstance(w, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError(f"w{_where(name)} holds NaN/inf values; GPTQ needs a finite weight")
    return w, h, gs


def gptq(w: jax.Array, h, bits: int, group_size: Optional[int] = None, *, block_size: int = 128,
         percdamp: float = 0.01, act_order: bool = False, sym: bool = False, pad: bool = False,
         scale_dtype=jnp.float32, name: Optional[str] = None) -> QuantizedWeight:
    """GPTQ-quantize a (possibly stacked) matrix ``w [..., IN, OUT]`` into a ``QuantizedWeight``.

    Solve in the module docstring (Frantar et al., 2023), mapped over leading axes.
    Args: ``h`` the input Hessian ``[..., IN, IN]`` or a :class:`HessianState`; ``bits`` in
    {2, 3, 4, 8}; ``group_size`` (default None: one group per output column); ``block_size``
    (default 128, lazy-batch width; the result does not depend on it); ``percdamp`` (default
    0.01 of the mean Hessian diagonal); ``act_order`` (default False); ``sym`` (default False);
    ``pad`` (default False: allow a group size that does not divide IN, ragged last group);
    ``scale_dtype`` (default float32); ``name`` (default None: the layer's name, used in warnings
    and errors).

    A Hessian that is all zero (the layer saw no calibration token) falls back to RTN of the
    original ``w`` with a ``UserWarning`` naming the layer (:func:`check_hessian`).

    Raises ``ValueError`` for bad arguments or shapes, and -- when called outside a trace -- for
    a Hessian or weight holding NaN/inf (bad calibration inputs) and when the damped Hessian is
    numerically singular (module docstring; increase ``percdamp``). Under ``jit`` these checks
    are skipped; use :func:`gptq_weight`'s ``ok``.
    """
    w, h, gs = check_gptq_inputs(w, h, bits, group_size, block_size, percdamp, pad, name)
    qw, ok = gptq_weight(w, h, percdamp, bits=int(bits), group_size=group_size,
                         stored_group_size=gs, block_size=int(block_size),
                         act_order=bool(act_order), sym=bool(sym),
                         scale_dtype=jnp.dtype(scale_dtype))
    check_ok(ok, percdamp, name)
    return qw


def _where(name) -> str:
    return "" if name is None else f" of {name}"


def _batch_text(bad) -> str:
    return f" (batch entries {bad})" if bad else ""


def check_hessian(h, name: Optional[str] = None) -> None:
    """Host-side checks of a concrete Hessian ``h [..., IN, IN]`` before a GPTQ solve.

    Raises ``ValueError`` when ``h`` holds NaN/inf (the calibration activations were not
    finite: damping cannot fix that); warns (``UserWarning``, naming ``name``) for each all-zero
    Hessian, which the solve treats as ``H = I`` (RTN of the weight). A traced ``h`` passes.
    """
    if isinstance(h, HessianState):
        h = h.h
    if isinstance(h, jax.core.Tracer):
        return
    h = np.asarray(h)
    flat = h.reshape(-1, *h.shape[-2:])
    finite = np.isfinite(flat).all(axis=(-2, -1))
    batch = h.shape[:-2]
    if not finite.all():
        bad = [[int(j) for j in np.unravel_index(i, batch)] for i in np.flatnonzero(~finite)] \
            if batch else []
        raise ValueError(
            f"the Hessian h{_where(name)} holds NaN/inf values{_batch_text(bad)}: the "
            f"calibration inputs (activations) were not finite; fix the model or the "
            f"calibration data (a larger percdamp cannot help)")
    empty = ~flat.any(axis=(-2, -1))
    if empty.any():
        bad = [[int(j) for j in np.unravel_index(i, batch)] for i in np.flatnonzero(empty)] \
            if batch else []
        warnings.warn(
            f"the Hessian h{_where(name)} is all zero{_batch_text(bad)}: the layer saw no "
            f"calibration token, so GPTQ falls back to round-to-nearest (RTN) of the original "
            f"weight there; calibrate on data that reaches this layer", UserWarning,
            stacklevel=3)


def check_solver_args(block_size, percdamp) -> None:
    """Raise ``ValueError`` unless ``block_size`` is a positive int and ``percdamp`` a finite
    float >= 0 (a traced ``percdamp`` passes)."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size <= 0:
        raise ValueError(f"block_size must be a positive int; got {block_size!r}")
    if not isinstance(percdamp, jax.core.Tracer) and not (
            isinstance(percdamp, (int, float, np.floating)) and not isinstance(percdamp, bool)
            and math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"percdamp must be a finite float >= 0; got {percdamp!r}")


def check_ok(ok, percdamp, name: Optional[str] = None) -> None:
    """Raise ``ValueError`` when a concrete ``ok`` flag from :func:`gptq_weight` is False
    (``name``: the layer, for the message)."""
    if isinstance(ok, jax.core.Tracer):
        return
    ok = np.asarray(ok)
    if not ok.all():
        bad = np.argwhere(~ok).tolist() if ok.ndim else []
        raise ValueError(
            f"the Hessian h{_where(name)} is numerically singular after damping "
            f"percdamp={percdamp}{_batch_text(bad)} (a Cholesky pivot is lost in rounding "
            f"relative to its own damped diagonal); increase percdamp (the paper uses 0.01) or "
            f"calibrate on more tokens")


def quant_error(w: jax.Array, w_hat: jax.Array, h: jax.Array) -> jax.Array:
    """GPTQ's layer objective ``tr((W - W_hat)^T H (W - W_hat))`` (= ``(2/n)||XW - XW_hat||^2``)."""
    d = (w - w_hat).astype(jnp.float32)
    return jnp.sum(d * jnp.matmul(h.astype(jnp.float32), d, precision=_HI), axis=(-2, -1))
