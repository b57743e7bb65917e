"""Fused optimizer updates: AdamW and Sophia element-wise steps, GaLore project-Adam-project-back.

Update rules (t = step count after increment, t >= 1; moments kept in f32):
- AdamW ("Decoupled Weight Decay Regularization", Loshchilov & Hutter, 2019; optax.adamw):
    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p = p - lr * ( (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + wd * p )
- Sophia ("Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
  Pre-training", Liu et al., 2023), parameter step with the Hessian EMA h given:
    m = b1 m + (1 - b1) g
    p = p - lr * wd * p - lr * clip(m / max(gamma * h, eps), -clip_threshold, clip_threshold)
  (no bias correction on m, as the reference SophiaG; h is refreshed elsewhere.)
- GaLore ("GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", Zhao et al.,
  2024), one matrix G [m, n], projector P [m, r] (side='left': R = P^T G, moments [r, n]) or
  P [n, r] (side='right': R = G P, moments [m, r]):
    R -> inner Adam (m, v as above, bias-corrected) -> N = m_hat / (sqrt(v_hat) + eps)
    update = scale * P @ N (left) or scale * N @ P^T (right); no lr, no weight decay (they are
    applied in the full space by the surrounding optax chain).

| function | what |
|---|---|
| adam_update_reference / adam_update_pallas / adam_update | AdamW step, one pass: reads p, g, m, v, writes p, m, v (outputs alias the inputs) |
| sophia_update_reference / sophia_update_pallas / sophia_update | Sophia parameter step, one pass |
| galore_adam_update_reference / _pallas / galore_adam_update | GaLore projection + inner Adam + back-projection in one Triton kernel (grid over column blocks; R never leaves registers) |
Dispatch: Pallas kernels are Triton (GPU) only; on TPU and CPU the dispatchers use the reference.
`GPU_DEFAULT` records what the dispatcher picks on a GPU, from the H200 benchmark
(`python kernels/bench.py`, jax 0.11.2): only what beat XLA is kept.
- AdamW, 64M f32 params (p, g, m, v): XLA 0.484 ms (3.88 TB/s, at the copy roofline) vs Pallas
  0.507 ms; Sophia: XLA 0.395 vs 0.486 ms. XLA already fuses each update into one loop, so the
  dispatchers use the reference; the kernels stay for explicit use (impl='pallas').
- GaLore, bf16 G and P, ms XLA / Pallas: 4096x4096 r256 0.135 / 0.186; 2048x5632 r512 0.186 /
  0.317; 4096x11008 r128 0.216 / 0.189. The dispatcher uses the kernel for r <= 128 only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common

# What `impl=None` picks on a GPU, per op, from the H200 benchmark (see module docstring).
GPU_DEFAULT = {"adam": "reference", "sophia": "reference", "galore": "pallas"}
GALORE_PALLAS_MAX_RANK = 128  # above this rank the GaLore kernel lost to XLA on the H200
_BLOCK = 4096
f32 = jnp.float32


def _check_same(name, **arrays):
    items = list(arrays.items())
    shape = items[0][1].shape
    for arg, x in items:
        if x.shape != shape:
            raise ValueError(f"{name}: {arg} must have shape {shape} (that of {items[0][0]}); "
                             f"got {x.shape}")
        _common.check_dtype(name, arg, x, (jnp.float32, jnp.bfloat16, jnp.float16))


def adam_update_reference(p, g, m, v, count, *, lr, b1=0.9, b2=0.999, eps=1e-8,
                          weight_decay=0.0):
    """One AdamW step in jnp (formula in the module docstring); returns (p, m, v).

    Args: p, g, m, v arrays of one shape (p/g any float dtype, m/v f32 recommended); count: the
    step number t >= 1 (int or int array); lr, b1 (0.9), b2 (0.999), eps (1e-8), weight_decay (0)
    floats or f32 scalars. Raises: ValueError / TypeError for mismatched shapes or dtypes.
    """
    _check_same("adam_update_reference", p=p, g=g, m=m, v=v)
    t = jnp.asarray(count, f32)
    g32, p32 = g.astype(f32), p.astype(f32)
    m = b1 * m.astype(f32) + (1 - b1) * g32
    v = b2 * v.astype(f32) + (1 - b2) * g32 * g32
    u = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
    return (p32 - lr * (u + weight_decay * p32)).astype(p.dtype), m, v


def sophia_update_reference(p, g, m, h, *, lr, b1=0.965, gamma=0.01, eps=1e-12,
                            weight_decay=0.1, clip_threshold=1.0):
    """One Sophia parameter step in jnp (formula in the module docstring); returns (p, m).

    Args: p, g, m, h of one shape; lr; b1 (0.965); gamma (0.01); eps (1e-12); weight_decay (0.1);
    clip_threshold (1.0). Raises: ValueError / TypeError for mismatched shapes or dtypes.
    """
    _check_same("sophia_update_reference", p=p, g=g, m=m, h=h)
    p32 = p.astype(f32)
    m = b1 * m.astype(f32) + (1 - b1) * g.astype(f32)
    ratio = jnp.clip(m / jnp.maximum(gamma * h.astype(f32), eps), -clip_threshold, clip_threshold)
    return (p32 - lr * weight_decay * p32 - lr * ratio).astype(p.dtype), m


# ------------------------------------------------------------------ element-wise kernels.

def _load(ref, sl, mask):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.load(ref.at[sl], mask=mask, other=0.0).astype(f32)


def _store(ref, sl, val, mask):
    from jax.experimental.pallas import triton as plgpu
    plgpu.store(ref.at[sl], val.astype(ref.dtype), mask=mask)


def _adam_kernel(h_ref, p_ref, g_ref, m_ref, v_ref, po_ref, mo_ref, vo_ref, *, n, blk):
    i = pl.program_id(0)
    sl = pl.ds(i * blk, blk)
    mask = i * blk + jnp.arange(blk) < n
    lr, b1, b2, eps, wd, bc1, bc2 = (h_ref[j] for j in range(7))
    p, g = _load(p_ref, sl, mask), _load(g_ref, sl, mask)
    m = b1 * _load(m_ref, sl, mask) + (1 - b1) * g
    v = b2 * _load(v_ref, sl, mask) + (1 - b2) * g * g
    u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
    _store(po_ref, sl, p - lr * (u + wd * p), mask)
    _store(mo_ref, sl, m, mask)
    _store(vo_ref, sl, v, mask)


def _sophia_kernel(h_ref, p_ref, g_ref, m_ref, hess_ref, po_ref, mo_ref, *, n, blk):
    i = pl.program_id(0)
    sl = pl.ds(i * blk, blk)
    mask = i * blk + jnp.arange(blk) < n
    lr, b1, gamma, eps, wd, clip = (h_ref[j] for j in range(6))
    p, g = _load(p_ref, sl, mask), _load(g_ref, sl, mask)
    m = b1 * _load(m_ref, sl, mask) + (1 - b1) * g
    ratio = jnp.clip(m / jnp.maximum(gamma * _load(hess_ref, sl, mask), eps), -clip, clip)
    _store(po_ref, sl, p - lr * wd * p - lr * ratio, mask)
    _store(mo_ref, sl, m, mask)


def _elementwise_call(kernel, hyper, arrays, out_dtypes, aliases, interpret, name):
    """Runs a masked 1-D kernel over flattened arrays; `aliases` maps input -> output index."""
    from jax.experimental.pallas import triton as plgpu
    shape = arrays[0].shape
    n = arrays[0].size
    flat = [a.reshape(-1) for a in arrays]
    if interpret:  # Interpret mode clamps out-of-range slices, so give it whole blocks.
        flat = [_common.pad_axis(a, 0, _common.round_up(n, _BLOCK)) for a in flat]
    size = flat[0].shape[0]
    outs = pl.pallas_call(
        functools.partial(kernel, n=n, blk=_BLOCK), grid=(pl.cdiv(n, _BLOCK),),
        out_shape=[jax.ShapeDtypeStruct((size,), d) for d in out_dtypes],
        input_output_aliases=aliases,
        interpret=interpret, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=8, num_stages=1),
    )(jnp.asarray(hyper, f32), *flat)
    return tuple(o[:n].reshape(shape) for o in outs)


def adam_update_pallas(p, g, m, v, count, *, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                       interpret: bool = False):
    """AdamW step as one Triton pass (same args/returns as `adam_update_reference`).

    m and v must be float32 (they are updated in place through input_output_aliases).
    Raises: ValueError / TypeError for mismatched shapes or dtypes.
    """
    _check_same("adam_update_pallas", p=p, g=g, m=m, v=v)
    for arg, x in (("m", m), ("v", v)):
        _common.check_dtype("adam_update_pallas", arg, x, (jnp.float32,))
    t = jnp.asarray(count, f32)
    hyper = jnp.stack([jnp.asarray(x, f32) for x in
                       (lr, b1, b2, eps, weight_decay, 1 - b1 ** t, 1 - b2 ** t, 0.0)])
    # inputs: (hyper, p, g, m, v); outputs: (p, m, v) written over p, m, v.
    return _elementwise_call(_adam_kernel, hyper, [p, g, m, v], [p.dtype, f32, f32],
                             {1: 0, 3: 1, 4: 2}, interpret, "jaxeff_adam_update")


def sophia_update_pallas(p, g, m, h, *, lr, b1=0.965, gamma=0.01, eps=1e-12, weight_decay=0.1,
                         clip_threshold=1.0, interpret: bool = False):
    """Sophia parameter step as one Triton pass (same args/returns as the reference).

    m must be float32. Raises: ValueError / TypeError for mismatched shapes or dtypes.
    """
    _check_same("sophia_update_pallas", p=p, g=g, m=m, h=h)
    _common.check_dtype("sophia_update_pallas", "m", m, (jnp.float32,))
    hyper = jnp.stack([jnp.asarray(x, f32) for x in
                       (lr, b1, gamma, eps, weight_decay, clip_threshold, 0.0, 0.0)])
    # inputs: (hyper, p, g, m, h); outputs: (p, m) written over p, m.
    return _elementwise_call(_sophia_kernel, hyper, [p, g, m, h], [p.dtype, f32], {1: 0, 3: 1},
                             interpret, "jaxeff_sophia_update")


# ---------------------------------------------------------------------------- GaLore.

def _check_galore(name, g, proj, mu, nu, side):
    _common.check_ndim(name, "g", g, 2, "[m, n]")
    _common.check_ndim(name, "proj", proj, 2, "[m, r] (left) or [n, r] (right)")
    if side not in ("left", "right"):
        raise ValueError(f"{name}: side must be 'left' or 'right'; got {side!r}")
    mdim, ndim = g.shape
    r = proj.shape[1]
    if proj.shape[0] != (mdim if side == "left" else ndim):
        raise ValueError(f"{name}: proj must be [{'m' if side == 'left' else 'n'}, r] for "
                         f"side={side!r} and g {g.shape}; got {proj.shape}")
    want = (r, ndim) if side == "left" else (mdim, r)
    for arg, x in (("mu", mu), ("nu", nu)):
        if x.shape != want:
            raise ValueError(f"{name}: {arg} must be {want} for side={side!r}; got {x.shape}")
        _common.check_dtype(name, arg, x, (jnp.float32,))
    _common.check_dtype(name, "g", g, (jnp.float32, jnp.bfloat16))
    _common.check_dtype(name, "proj", proj, (jnp.float32, jnp.bfloat16))


def galore_adam_update_reference(g, proj, mu, nu, count, *, side="left", b1=0.9, b2=0.999,
                                 eps=1e-8, scale=0.25):
    """GaLore project -> Adam -> project back for one matrix, in jnp; returns (update, mu, nu).

    Args: g [m, n]; proj [m, r] (side='left') or [n, r] (side='right'); mu, nu f32 [r, n] (left)
    or [m, r] (right); count t >= 1; b1 (0.9), b2 (0.999), eps (1e-8), scale (0.25, the paper's).
    Raises: ValueError / TypeError for mismatched shapes or dtypes.
    """
    _check_galore("galore_adam_update_reference", g, proj, mu, nu, side)
    t = jnp.asarray(count, f32)
    p32, g32 = proj.astype(f32), g.astype(f32)
    r = p32.T @ g32 if side == "left" else g32 @ p32
    mu = b1 * mu + (1 - b1) * r
    nu = b2 * nu + (1 - b2) * r * r
    n = (mu / (1 - b1 ** t)) / (jnp.sqrt(nu / (1 - b2 ** t)) + eps)
    upd = scale * (p32 @ n if side == "left" else n @ p32.T)
    return upd.astype(g.dtype), mu, nu


def _galore_kernel(h_ref, g_ref, p_ref, mu_ref, nu_ref, o_ref, muo_ref, nuo_ref, *, bm, nm):
    from jax.experimental.pallas import triton as plgpu
    b1, b2, eps, bc1, bc2, scale = (h_ref[j] for j in range(6))
    r, bn = mu_ref.shape

    def project(i, acc):
        pc = p_ref[pl.ds(i * bm, bm), :]
        return acc + plgpu.dot(pc, g_ref[pl.ds(i * bm, bm), :].astype(pc.dtype), trans_a=True)

    rr = jax.lax.fori_loop(0, nm, project, jnp.zeros((r, bn), f32))
    mu = b1 * mu_ref[...] + (1 - b1) * rr
    nu = b2 * nu_ref[...] + (1 - b2) * rr * rr
    muo_ref[...] = mu
    nuo_ref[...] = nu
    nn = ((mu / bc1) / (jnp.sqrt(nu / bc2) + eps)).astype(p_ref.dtype)

    def back(i, carry):
        out = plgpu.dot(p_ref[pl.ds(i * bm, bm), :], nn)
        o_ref[pl.ds(i * bm, bm), :] = (scale * out).astype(o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, nm, back, 0)


def _galore_blocks(mdim, ndim, r):
    """(ok, bm, bn): row chunk bm | m and column block bn | n, powers of two >= 16."""
    cap = max(16, min(64, 8192 // max(r, 1)))
    bn = next((b for b in (64, 32, 16) if b <= cap and ndim % b == 0), None)
    bm = next((b for b in (64, 32, 16) if mdim % b == 0), None)
    ok = r >= 16 and r & (r - 1) == 0 and r <= 512 and bm is not None and bn is not None
    return ok, bm, bn


def galore_adam_update_pallas(g, proj, mu, nu, count, *, side="left", b1=0.9, b2=0.999,
                              eps=1e-8, scale=0.25, interpret: bool = False):
    """GaLore step as one Triton kernel (same args/returns as the reference).

    Kernel constraints (checked): r a power of two in [16, 512]; m and n multiples of 16.
    Column block: the largest of 64, 32, 16 that divides n and is <= max(16, 8192 // r).
    side='right' runs the left kernel on transposes.
    Raises: ValueError / TypeError for bad shapes, dtypes, or the constraints above.
    """
    name = "galore_adam_update_pallas"
    _check_galore(name, g, proj, mu, nu, side)
    if side == "right":
        upd, mu_t, nu_t = galore_adam_update_pallas(g.T, proj, mu.T, nu.T, count, side="left", b1=b1,
                                                    b2=b2, eps=eps, scale=scale, interpret=interpret)
        return upd.T, mu_t.T, nu_t.T
    from jax.experimental.pallas import triton as plgpu
    mdim, ndim = g.shape
    r = proj.shape[1]
    ok, bm, bn = _galore_blocks(mdim, ndim, r)
    if not ok:
        raise ValueError(f"{name}: unsupported shape g {g.shape}, rank {r}: need r a power of two "
                         f"in [16, 512], m % 16 == 0 and n % 16 == 0 (use impl='reference')")
    t = jnp.asarray(count, f32)
    hyper = jnp.stack([jnp.asarray(x, f32) for x in
                       (b1, b2, eps, 1 - b1 ** t, 1 - b2 ** t, scale, 0.0, 0.0)])
    col = lambda rows: pl.BlockSpec((rows, bn), lambda j: (0, j))
    return tuple(pl.pallas_call(
        functools.partial(_galore_kernel, bm=bm, nm=mdim // bm), grid=(ndim // bn,),
        in_specs=[pl.BlockSpec((8,), lambda j: (0,)), col(mdim),
                  pl.BlockSpec((mdim, r), lambda j: (0, 0)), col(r), col(r)],
        out_specs=[col(mdim), col(r), col(r)],
        out_shape=[jax.ShapeDtypeStruct(g.shape, g.dtype), jax.ShapeDtypeStruct(mu.shape, f32),
                   jax.ShapeDtypeStruct(nu.shape, f32)],
        input_output_aliases={3: 1, 4: 2}, interpret=interpret, name="jaxeff_galore_adam",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    )(hyper, g, proj, mu, nu))


# ------------------------------------------------------------------------ dispatchers.

def _pick(op, impl, interpret):
    default = GPU_DEFAULT[op] if _common.backend() == "gpu" else "reference"
    return _common.resolve_impl(impl, interpret, name=f"{op}_update", accelerator_default=default)


def adam_update(p, g, m, v, count, *, lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                impl: str | None = None, interpret: bool = False):
    """AdamW step dispatcher (GPU: GPU_DEFAULT['adam']; CPU/TPU: reference); returns (p, m, v).

    Raises: ValueError for an unknown impl, plus the checks of the chosen implementation.
    """
    kw = dict(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    if _pick("adam", impl, interpret) == "reference":
        return adam_update_reference(p, g, m, v, count, **kw)
    return adam_update_pallas(p, g, m, v, count, interpret=interpret, **kw)


def sophia_update(p, g, m, h, *, lr, b1=0.965, gamma=0.01, eps=1e-12, weight_decay=0.1,
                  clip_threshold=1.0, impl: str | None = None, interpret: bool = False):
    """Sophia step dispatcher (GPU: GPU_DEFAULT['sophia']; CPU/TPU: reference); returns (p, m).

    Raises: ValueError for an unknown impl, plus the checks of the chosen implementation.
    """
    kw = dict(lr=lr, b1=b1, gamma=gamma, eps=eps, weight_decay=weight_decay,
              clip_threshold=clip_threshold)
    if _pick("sophia", impl, interpret) == "reference":
        return sophia_update_reference(p, g, m, h, **kw)
    return sophia_update_pallas(p, g, m, h, interpret=interpret, **kw)


def galore_adam_update(g, proj, mu, nu, count, *, side="left", b1=0.9, b2=0.999, eps=1e-8,
                       scale=0.25, impl: str | None = None, interpret: bool = False):
    """GaLore step dispatcher; returns (update, mu, nu).

    GPU: the kernel when the shape fits it and r <= GALORE_PALLAS_MAX_RANK, else the reference;
    CPU/TPU: the reference; interpret=True: the kernel whenever the shape fits.

    Raises: ValueError for an unknown impl, plus the checks of the chosen implementation.
    """
    kw = dict(side=side, b1=b1, b2=b2, eps=eps, scale=scale)
    chosen = _pick("galore", impl, interpret)
    if impl is None and chosen == "pallas":
        mm, nn = g.shape if side == "left" else g.shape[::-1]
        r = proj.shape[-1]
        if not _galore_blocks(mm, nn, r)[0] or (not interpret and r > GALORE_PALLAS_MAX_RANK):
            chosen = "reference"
    if chosen == "reference":
        return galore_adam_update_reference(g, proj, mu, nu, count, **kw)
    return galore_adam_update_pallas(g, proj, mu, nu, count, interpret=interpret, **kw)
