"""Sparse-plus-low-rank matmul for SLTrain weights, forward and backward.

Layout (flax [in, out], y = x @ W):
    W = scale * (A_in x r @ B_r x out) + S,    S = scatter(values) at `indices`
    y = scale * (x @ A) @ B + x @ S
- A: [in, r], B: [r, out] (torch's SpLoRaLinear stores A_t [r, in], B_t [out, r]: A = A_t.T,
  B = B_t.T);
- indices: int32 [nnz], sorted, unique flat row-major indices into the [in, out] matrix
  (idx = i * out + j); values: [nnz], the trainable entries of S;
- scale: Python float s = alpha / r.
Gradients (only x, A, B, values are differentiable; indices are a fixed support):
    gx = gy @ W^T = scale * (gy @ B^T) @ A^T + gy @ S^T
    gA = scale * x^T @ (gy @ B^T),  gB = scale * (x @ A)^T @ gy,  gvalues[e] = (x^T @ gy)[i_e, j_e]
Paper: "SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining"
(Han et al., NeurIPS 2024).

| function | what |
|---|---|
| sltrain_matmul_reference | jnp: materialises W, autodiff backward; the definition |
| sltrain_matmul_pallas | custom_vjp. gvalues: a Triton sampled dense-dense kernel (SDDMM) so the dense [in, out] gradient x^T @ gy is never formed. y and gx: XLA's matmul on the materialised W (fused=False, default), or (fused=True) our Triton kernel `x @ S + scale * (x@A) @ B` that adds the low-rank product in the tile epilogue so W is never built. gA, gB: skinny XLA matmuls |
| sltrain_matmul_pallas(platform='tpu') | TPU (Mosaic): the fused `x @ S + scale * (x@A) @ B` tile kernel for y and gx (S built densely, W never); gvalues by XLA (dense x^T gy, sampled); verified in TPU interpret mode only |
| sltrain_matmul | dispatcher: sltrain_matmul_pallas(fused=False) on GPU, reference on CPU and TPU (the Mosaic kernel is not timed) |

Measured on one H200 (jax 0.11.2, bf16, density 0.03; `python kernels/bench.py`), fwd+bwd ms,
XLA reference / fused=False / fused=True: N8192 2048x2048 r512: 0.765 / 0.734 / 0.876;
N8192 4096x4096 r256: 2.507 / 2.171 / 2.554; N4096 2048x5632 r512: 1.135 / 0.916 / 1.019.
The fused kernel's forward reaches 410-460 TFLOP/s against cuBLAS's 530-670, hence the default.

What is materialised: W (fused=False) or S alone (fused=True), as a dense [in, out] array in
x.dtype, recomputed in the backward and never saved as a residual. Triton has no in-register
scatter, and at SLTrain's densities (1-5 %) tensor-core dense tiles beat a gather-based product.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common

_DTYPES = (jnp.float32, jnp.bfloat16)


def _check(name, x, a, b, indices, values, scale):
    _common.check_ndim(name, "x", x, 2, "[N, in]")
    _common.check_ndim(name, "a", a, 2, "[in, r]")
    _common.check_ndim(name, "b", b, 2, "[r, out]")
    _common.check_ndim(name, "indices", indices, 1, "[nnz]")
    _common.check_ndim(name, "values", values, 1, "[nnz]")
    for arg, t in (("x", x), ("a", a), ("b", b), ("values", values)):
        _common.check_dtype(name, arg, t, _DTYPES)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"{name}: indices must be integer (flat [in, out] indices); got {indices.dtype}")
    if a.shape[0] != x.shape[1] or a.shape[1] != b.shape[0]:
        raise ValueError(f"{name}: need x [N, in], a [in, r], b [r, out]; got x {x.shape}, "
                         f"a {a.shape}, b {b.shape}")
    if indices.shape != values.shape:
        raise ValueError(f"{name}: indices and values must have the same shape; got "
                         f"{indices.shape} and {values.shape}")
    if not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: scale must be a Python float (alpha / r); got {type(scale)}")


def sparse_dense(indices, values, shape, dtype=None):
    """Dense [in, out] matrix S with `values` at flat row-major `indices` (padding allowed).

    shape may exceed the logical [in, out] (rows, cols are decoded with `out` = the column count
    of the logical matrix, given as shape[2] when a 3-tuple (rows, cols, logical_out)).
    """
    rows, cols = shape[0], shape[1]
    out_logical = shape[2] if len(shape) == 3 else cols
    i, j = indices // out_logical, indices % out_logical
    dense = jnp.zeros((rows, cols), dtype or values.dtype)
    return dense.at[i, j].add(values.astype(dtype or values.dtype))


def sltrain_matmul_reference(x, a, b, indices, values, scale: float):
    """y = x @ (scale * a @ b + S) in plain jnp (materialises W; autodiff backward).

    Args: x [N, in]; a [in, r]; b [r, out]; indices int [nnz] (sorted flat row-major into
    [in, out]); values [nnz]; scale Python float. Returns y [N, out] in x.dtype.
    Raises: ValueError / TypeError for bad shapes or dtypes.
    """
    _check("sltrain_matmul_reference", x, a, b, indices, values, scale)
    w = scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))
    w = w + sparse_dense(indices, values, (a.shape[0], b.shape[1]), jnp.float32)
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


# ------------------------------------------------------------------------------- kernels.

def _lowrank_matmul_kernel(x_ref, w_ref, xa_ref, b_ref, o_ref, *, scale, bk, nk, nr,
                           trans_w, trans_b):
    """o = x @ w' + scale * xa @ b'  (w' = w or w.T, b' = b or b.T), f32 accumulation."""
    from jax.experimental.pallas import triton as plgpu
    bm, bn = o_ref.shape

    def body(kk, acc):
        xk = x_ref[:, pl.ds(kk * bk, bk)]
        wk = w_ref[:, pl.ds(kk * bk, bk)] if trans_w else w_ref[pl.ds(kk * bk, bk), :]
        return acc + plgpu.dot(xk, wk, trans_b=trans_w)

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))

    def lr_body(rr, acc):
        xa = xa_ref[:, pl.ds(rr * bk, bk)]
        bb = b_ref[:, pl.ds(rr * bk, bk)] if trans_b else b_ref[pl.ds(rr * bk, bk), :]
        return acc + plgpu.dot(xa, bb, trans_b=trans_b)

    low = jax.lax.fori_loop(0, nr, lr_body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc + scale * low).astype(o_ref.dtype)


def _lowrank_matmul(x, w, xa, b, scale, *, trans_w, trans_b, blocks, interpret):
    """Padded launcher: x [M, K], w [K, N] (or [N, K]), xa [M, R], b [R, N] (or [N, R])."""
    from jax.experimental.pallas import triton as plgpu
    bm, bn, bk = blocks
    m, kdim = x.shape
    n = w.shape[0] if trans_w else w.shape[1]
    mp, np_, kp = _common.round_up(m, bm), _common.round_up(n, bn), _common.round_up(kdim, bk)
    rp = _common.round_up(xa.shape[1], bk)
    x = _common.pad_axis(_common.pad_axis(x, 0, mp), 1, kp)
    xa = _common.pad_axis(_common.pad_axis(xa.astype(x.dtype), 0, mp), 1, rp)
    w = _common.pad_axis(_common.pad_axis(w, 0, np_ if trans_w else kp), 1, kp if trans_w else np_)
    b = _common.pad_axis(_common.pad_axis(b.astype(x.dtype), 0, np_ if trans_b else rp), 1,
                         rp if trans_b else np_)
    kernel = functools.partial(_lowrank_matmul_kernel, scale=float(scale), bk=bk, nk=kp // bk,
                               nr=rp // bk, trans_w=trans_w, trans_b=trans_b)
    w_spec = (pl.BlockSpec((bn, kp), lambda i, j: (j, 0)) if trans_w
              else pl.BlockSpec((kp, bn), lambda i, j: (0, j)))
    b_spec = (pl.BlockSpec((bn, rp), lambda i, j: (j, 0)) if trans_b
              else pl.BlockSpec((rp, bn), lambda i, j: (0, j)))
    out = pl.pallas_call(
        kernel, grid=(mp // bm, np_ // bn),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), w_spec,
                  pl.BlockSpec((bm, rp), lambda i, j: (i, 0)), b_spec],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=3),
        name="jaxeff_sltrain_matmul",
    )(x, w, xa, b)
    return out[:m, :n]


def _sddmm_kernel(rows_ref, cols_ref, xt_ref, gt_ref, o_ref, *, bm, nm):
    """o[e] = sum_n xt[rows[e], n] * gt[cols[e], n] for a block of entries."""
    rows, cols = rows_ref[...], cols_ref[...]

    def body(mm, acc):
        xr = xt_ref[rows, pl.ds(mm * bm, bm)].astype(jnp.float32)
        gc = gt_ref[cols, pl.ds(mm * bm, bm)].astype(jnp.float32)
        return acc + jnp.sum(xr * gc, axis=1)

    o_ref[...] = jax.lax.fori_loop(0, nm, body, jnp.zeros(rows.shape, jnp.float32))


def _sddmm(x, gy, indices, out_dim, *, be, bm, interpret):
    """gvalues[e] = sum_n x[n, i_e] * gy[n, j_e] without forming x^T @ gy."""
    from jax.experimental.pallas import triton as plgpu
    nnz = indices.shape[0]
    m = x.shape[0]
    mp, ep = _common.round_up(m, bm), _common.round_up(nnz, be)
    rows = _common.pad_axis((indices // out_dim).astype(jnp.int32), 0, ep)
    cols = _common.pad_axis((indices % out_dim).astype(jnp.int32), 0, ep)
    xt = _common.pad_axis(x.T, 1, mp)
    gt = _common.pad_axis(gy.T, 1, mp)
    out = pl.pallas_call(
        functools.partial(_sddmm_kernel, bm=bm, nm=mp // bm), grid=(ep // be,),
        in_specs=[pl.BlockSpec((be,), lambda e: (e,)), pl.BlockSpec((be,), lambda e: (e,)),
                  pl.BlockSpec(xt.shape, lambda e: (0, 0)), pl.BlockSpec(gt.shape, lambda e: (0, 0))],
        out_specs=pl.BlockSpec((be,), lambda e: (e,)),
        out_shape=jax.ShapeDtypeStruct((ep,), jnp.float32), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2), name="jaxeff_sltrain_sddmm",
    )(rows, cols, xt, gt)
    return out[:nnz]


def _dense_w(a, b, indices, values, scale, dtype):
    w = scale * jnp.dot(a, b, preferred_element_type=jnp.float32)
    return (w + sparse_dense(indices, values, w.shape, jnp.float32)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _sltrain(x, a, b, indices, values, scale, blocks, fused, interpret):
    if not fused:  # XLA (cuBLAS) forward on the materialised W.
        w = _dense_w(a, b, indices, values, scale, x.dtype)
        return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    s = sparse_dense(indices, values, (a.shape[0], b.shape[1]), x.dtype)
    xa = jnp.dot(x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    return _lowrank_matmul(x, s, xa, b, scale, trans_w=False, trans_b=False, blocks=blocks,
                           interpret=interpret)


def _sltrain_fwd(x, a, b, indices, values, scale, blocks, fused, interpret):
    y = _sltrain(x, a, b, indices, values, scale, blocks, fused, interpret)
    return y, (x, a, b, indices, values)


def _sltrain_bwd(scale, blocks, fused, interpret, res, gy):
    x, a, b, indices, values = res
    f32 = jnp.float32
    gy = gy.astype(x.dtype)
    gyb = jnp.dot(gy, b.astype(gy.dtype).T, preferred_element_type=f32)       # [N, r]
    if fused:
        s = sparse_dense(indices, values, (a.shape[0], b.shape[1]), x.dtype)
        gx = _lowrank_matmul(gy, s, gyb, a, scale, trans_w=True, trans_b=True, blocks=blocks,
                             interpret=interpret)
    else:
        w = _dense_w(a, b, indices, values, scale, x.dtype)
        gx = jnp.dot(gy, w.T, preferred_element_type=f32).astype(x.dtype)
    ga = scale * jnp.dot(x.T, gyb.astype(x.dtype), preferred_element_type=f32)
    xa = jnp.dot(x, a.astype(x.dtype), preferred_element_type=f32)
    gb = scale * jnp.dot(xa.astype(x.dtype).T, gy, preferred_element_type=f32)
    gv = _sddmm(x, gy, indices, b.shape[1], be=64, bm=64, interpret=interpret)
    return gx, ga.astype(a.dtype), gb.astype(b.dtype), None, gv.astype(values.dtype)


_sltrain.defvjp(_sltrain_fwd, _sltrain_bwd)


# ------------------------------------------------------------------- TPU (Mosaic) kernel.

def _lowrank_tpu_kernel(x_ref, w_ref, xa_ref, b_ref, o_ref, *, scale):
    """o = x @ w + scale * xa @ b for one [bm, bn] tile (whole K and r per tile), f32 acc."""
    acc = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    low = jnp.dot(xa_ref[...], b_ref[...], preferred_element_type=jnp.float32)
    o_ref[...] = (acc + scale * low).astype(o_ref.dtype)


def _lowrank_tpu(x, w, xa, b, scale, interpret):
    """x [M, K] @ w [K, N] + scale * xa [M, R] @ b [R, N] as a Mosaic kernel over (M, N) tiles."""
    m, kdim = x.shape
    n, r = w.shape[1], xa.shape[1]
    bm = min(128, _common.round_up(m, 8))
    bn = 128 if n % 128 == 0 else n
    mp = _common.round_up(m, bm)
    xp = _common.pad_axis(x, 0, mp)
    xap = _common.pad_axis(xa.astype(x.dtype), 0, mp)
    call = functools.partial(
        pl.pallas_call, functools.partial(_lowrank_tpu_kernel, scale=float(scale)),
        grid=(mp // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, kdim), lambda i, j: (i, 0)),
                  pl.BlockSpec((kdim, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((bm, r), lambda i, j: (i, 0)),
                  pl.BlockSpec((r, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, n), x.dtype), name="jaxeff_sltrain_matmul_tpu")
    return _common.run_pallas(call, xp, w.astype(x.dtype), xap, b.astype(x.dtype),
                              platform="tpu", interpret=interpret)[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _sltrain_tpu(x, a, b, indices, values, scale, interpret):
    s = sparse_dense(indices, values, (a.shape[0], b.shape[1]), x.dtype)
    xa = jnp.dot(x, a.astype(x.dtype), preferred_element_type=jnp.float32)
    return _lowrank_tpu(x, s, xa, b, scale, interpret)


def _sltrain_tpu_fwd(x, a, b, indices, values, scale, interpret):
    return _sltrain_tpu(x, a, b, indices, values, scale, interpret), (x, a, b, indices, values)


def _sltrain_tpu_bwd(scale, interpret, res, gy):
    x, a, b, indices, values = res
    f32 = jnp.float32
    gy = gy.astype(x.dtype)
    gyb = jnp.dot(gy, b.astype(gy.dtype).T, preferred_element_type=f32)       # [N, r]
    s = sparse_dense(indices, values, (a.shape[0], b.shape[1]), x.dtype)
    gx = _lowrank_tpu(gy, s.T, gyb, a.T, scale, interpret)
    ga = scale * jnp.dot(x.T, gyb.astype(x.dtype), preferred_element_type=f32)
    xa = jnp.dot(x, a.astype(x.dtype), preferred_element_type=f32)
    gb = scale * jnp.dot(xa.astype(x.dtype).T, gy, preferred_element_type=f32)
    out = b.shape[1]  # gvalues: XLA's dense x^T gy sampled at the support (no TPU SDDMM kernel)
    gw = jnp.dot(x.T, gy, preferred_element_type=f32)
    gv = gw[indices // out, indices % out]
    return gx, ga.astype(a.dtype), gb.astype(b.dtype), None, gv.astype(values.dtype)


_sltrain_tpu.defvjp(_sltrain_tpu_fwd, _sltrain_tpu_bwd)


def sltrain_matmul_pallas(x, a, b, indices, values, scale: float, *, fused: bool = False,
                          block_m: int = 128, block_n: int = 128, block_k: int = 64,
                          interpret: bool = False, platform: str | None = None):
    """y = x @ (scale * a @ b + S) with Triton kernels; differentiable (custom_vjp).

    Args as in `sltrain_matmul_reference`, plus
      fused: False (default; faster on an H200) uses XLA's matmul on the materialised W for y and
        gx and the SDDMM kernel for gvalues (the dense [in, out] gradient is never formed);
        True also runs y and gx through the fused sparse + low-rank Triton matmul (W never built);
      block_m, block_n, block_k: fused-kernel tiles (powers of two >= 16; 128, 128, 64);
      interpret; platform: 'gpu' (Triton, above) or 'tpu' (Mosaic: y and gx through the fused
        `x @ S + scale * (x@A) @ B` kernel over [<=128 rows, 128 or all columns] tiles with
        the whole in and r per tile; gvalues from XLA's dense x^T gy sampled at the support;
        the block arguments are ignored); default the backend, 'gpu' on CPU.
      Any N, in, out, r: operands are zero-padded to blocks.
    Raises: ValueError / TypeError for bad shapes, dtypes or block sizes.
    """
    _check("sltrain_matmul_pallas", x, a, b, indices, values, scale)
    if _common.pallas_platform(platform, "sltrain_matmul_pallas") == "tpu":
        return _sltrain_tpu(x, a, b, indices.astype(jnp.int32), values, float(scale), interpret)
    for arg, val in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        _common.check_pow2("sltrain_matmul_pallas", arg, val, 16)
    return _sltrain(x, a, b, indices.astype(jnp.int32), values, float(scale),
                    (block_m, block_n, block_k), bool(fused), interpret)


def sltrain_matmul(x, a, b, indices, values, scale: float, *, impl: str | None = None,
                   interpret: bool = False):
    """SLTrain matmul dispatcher: `sltrain_matmul_pallas` (fused=False) on GPU, reference on CPU/TPU.

    Args as in `sltrain_matmul_reference`; impl='pallas'|'reference' forces one; interpret=True
    runs the Pallas kernel in interpret mode. Leading batch axes of x are flattened.
    Raises: ValueError for an unknown impl, plus the checks of the chosen implementation.
    """
    chosen = _common.resolve_impl(impl, interpret, name="sltrain_matmul",
                                  accelerator_default="pallas" if _common.backend() == "gpu"
                                  else "reference")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x
    if chosen == "reference":
        y = sltrain_matmul_reference(x2, a, b, indices, values, scale)
    else:
        y = sltrain_matmul_pallas(x2, a, b, indices, values, scale, interpret=interpret)
    return y.reshape(*lead, y.shape[-1])
