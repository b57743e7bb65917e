"""Low-bit dequantize-matmul for GPTQ / RTN weights: y = x @ dequant(Wq).

Packing layout (W stored [in, out], flax convention, y = x @ W):
- bits in {2, 4, 8}; P = 32 // bits codes per uint32 word.
- qweight: uint32 [in // P, out]; word qweight[i, j] holds codes q[i * P + t, j] for t = 0..P-1
  at bit offset bits * t (codes packed along the INPUT dim, as GPTQ's qweight, with 'out' last).
- scales, zeros: float [in // group_size, out]; group g covers input rows g*group_size ...
  (groups along the input dim); zeros are floats (unpack GPTQ's qzeros, and add the +1 that
  GPTQ-v1 checkpoints subtract, before calling).
- dequant:  w[k, j] = (q[k, j] - zeros[k // group_size, j]) * scales[k // group_size, j].
int3 is not supported (GPTQ's 3-bit packing straddles words). Paper: "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers" (Frantar et al., ICLR 2023).

| function | what |
|---|---|
| pack_codes / unpack_codes | codes uint8 [in, out] <-> qweight uint32 [in // P, out] |
| rtn_quantize | round-to-nearest asymmetric quantizer (GPTQ's Quantizer, no error feedback) |
| quant_matmul_reference | jnp: dequantize the whole W, then matmul; the definition |
| quant_matmul_pallas | GPU (Triton): per (M, N) tile, loop over K blocks of one group; unpack the P codes of each word with shifts and run P small dots against stride-P column slices of x (no reshape, no gather); dequant in registers |
| quant_matmul_pallas(platform='tpu') | TPU (Mosaic): per [rows, 128] tile, the P code slots of each word as P [in/P, 128] dequantized matrices, dotted with x's columns reordered by slot (one transpose of x outside); verified in TPU interpret mode only |
| quant_matmul | dispatcher: Pallas on GPU for <= 16 rows (decode), reference for more rows, on CPU and on TPU (the Mosaic kernel is not timed) |

Measured on one H200 (jax 0.11.2, bf16 x, `python kernels/bench.py`), ms, XLA reference
(dequantize + cuBLAS) / Pallas: 16 x 4096 x 4096 int4 g128 0.051 / 0.050; int8 0.059 / 0.062;
int2 g256 0.062 / 0.064; 16 x 4096 x 11008 int4 0.100 / 0.050; 64 rows int4 0.046 / 0.380;
4096 rows int4 0.223 / 1.200 (the P small K=16 dots and stride-P loads of x do not feed the
tensor cores well). So the kernel only pays for decode-sized inputs.
Gradient: only x is differentiable (gx = gy @ dequant(W)^T by XLA); codes/scales/zeros are not.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from . import _common

BITS = (2, 4, 8)        # what the matmul kernel takes
PACK_BITS = (2, 3, 4, 8)  # what packing takes (3-bit words hold 10 codes, top 2 bits unused)
PALLAS_MAX_ROWS = 16  # the dispatcher's GPU threshold on x rows (see quant_matmul)
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check_bits(name, bits, allowed=BITS):
    if bits not in allowed:
        raise ValueError(f"{name}: bits must be one of {allowed}"
                         f"{' (int3 unsupported)' if 3 not in allowed else ''}; got {bits!r}")


def pack_codes(q, bits: int):
    """Packs integer codes q [..., N, out] (values in [0, 2^bits)) into uint32 [..., ceil(N/P), out].

    Word k holds rows k*P .. k*P+P-1, row r at bit offset bits * (r % P), P = 32 // bits; a
    ragged last word is padded with zero codes. Leading axes are a batch. This is the one packing
    routine of jaxeff (`jaxeff.params.pack` calls it).
    Raises: ValueError when bits is not in (2, 3, 4, 8) or q has fewer than 2 axes.
    """
    _check_bits("pack_codes", bits, PACK_BITS)
    per = 32 // bits
    if q.ndim < 2:
        raise ValueError(f"pack_codes: q must be [..., N, out]; got shape {q.shape}")
    n = q.shape[-2]
    words = -(-n // per)
    q = q.astype(jnp.uint32)
    if words * per != n:
        q = jnp.pad(q, [(0, 0)] * (q.ndim - 2) + [(0, words * per - n), (0, 0)])
    q = q.reshape(*q.shape[:-2], words, per, q.shape[-1])
    shifts = (jnp.arange(per, dtype=jnp.uint32) * bits)[:, None]
    # The shifted fields are disjoint, so the sum is the bitwise OR.
    return jnp.sum(q << shifts, axis=-2, dtype=jnp.uint32)


def unpack_codes(qweight, bits: int, n: int | None = None):
    """Inverse of pack_codes: uint32 [..., W, out] -> int32 codes [..., n, out] (n default W * P).

    Raises: ValueError for bits not in (2, 3, 4, 8) or n outside [0, W * P].
    """
    _check_bits("unpack_codes", bits, PACK_BITS)
    per = 32 // bits
    cap = qweight.shape[-2] * per
    n = cap if n is None else n
    if not 0 <= n <= cap:
        raise ValueError(f"unpack_codes: n={n} rows do not fit {qweight.shape[-2]} words of "
                         f"{per} codes")
    shifts = (jnp.arange(per, dtype=jnp.uint32) * bits)[:, None]
    q = (qweight[..., :, None, :] >> shifts) & jnp.uint32((1 << bits) - 1)
    q = q.reshape(*qweight.shape[:-2], cap, qweight.shape[-1])
    return q[..., :n, :].astype(jnp.int32)


def find_params(x, bits: int, sym: bool = False, scale_dtype=jnp.float32, axis: int = -2):
    """Scale and zero point of the GPTQ quantizer for x reduced over `axis` (axis kept).

    xmin = min(min(x), 0), xmax = max(max(x), 0) (-1, 1 when both are 0); symmetric:
    xmax = max(|xmin|, xmax), xmin = -xmax, zero = (maxq + 1) / 2; asymmetric:
    zero = round(-xmin / scale); scale = (xmax - xmin) / maxq rounded to scale_dtype.
    Returns (scale, zero) in float32 (zero an integer in [0, maxq]). The one home of this
    formula (`jaxeff.params.find_params`, GPTQ and RTN call it).
    """
    maxq = 2 ** bits - 1
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    xmin = jnp.minimum(jnp.min(x, axis=axis, keepdims=True), 0)
    xmax = jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0)
    if sym:
        xmax = jnp.maximum(-xmin, xmax)
        xmin = -xmax
    both0 = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(both0, -1.0, xmin)
    xmax = jnp.where(both0, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).astype(scale_dtype).astype(x.dtype)
    if sym:
        zero = jnp.full_like(scale, (maxq + 1) // 2)
    else:
        zero = jnp.round(-xmin / scale)
    return scale, jnp.clip(zero, 0, maxq)


def quantize_codes(x, scale, zero, bits: int):
    """q = clip(round(x / scale) + zero, 0, 2^bits - 1) (float, integer-valued)."""
    return jnp.clip(jnp.round(x / scale) + zero, 0, 2 ** bits - 1)


def rtn_quantize(w, bits: int, group_size: int):
    """Round-to-nearest asymmetric group quantization of w [in, out] (GPTQ's quantizer).

    Per group of `group_size` input rows and output column: `find_params` (asymmetric, f32
    scales), then q = `quantize_codes`. Returns (qweight uint32 [in // P, out],
    scales f32 [in // g, out], zeros f32 [in // g, out]).
    Raises: ValueError for unsupported bits or in % group_size != 0.
    """
    _check_bits("rtn_quantize", bits)
    din, dout = w.shape
    if group_size <= 0 or din % group_size:
        raise ValueError(f"rtn_quantize: group_size must divide in={din}; got {group_size}")
    wg = w.astype(jnp.float32).reshape(din // group_size, group_size, dout)
    scale, zero = find_params(wg, bits, axis=1)
    q = quantize_codes(wg, scale, zero, bits)
    return pack_codes(q.reshape(din, dout).astype(jnp.int32), bits), scale[:, 0], zero[:, 0]


def _check(name, x, qweight, scales, zeros, bits, group_size):
    _check_bits(name, bits)
    per = 32 // bits
    _common.check_ndim(name, "x", x, 2, "[N, in]")
    _common.check_ndim(name, "qweight", qweight, 2, "[in // (32 // bits), out]")
    _common.check_dtype(name, "x", x, _DTYPES)
    _common.check_dtype(name, "qweight", qweight, (jnp.uint32,))
    din, dout = x.shape[1], qweight.shape[1]
    if qweight.shape[0] * per != din:
        raise ValueError(f"{name}: qweight must be [in // {per}, out] = [{din // per}, out] for x "
                         f"{x.shape} and bits={bits}; got {qweight.shape}")
    if group_size <= 0 or din % group_size:
        raise ValueError(f"{name}: group_size must be positive and divide in={din}; got {group_size}")
    for arg, t in (("scales", scales), ("zeros", zeros)):
        if t.shape != (din // group_size, dout):
            raise ValueError(f"{name}: {arg} must be [in // group_size, out] = "
                             f"{(din // group_size, dout)}; got {t.shape}")
        _common.check_dtype(name, arg, t, (jnp.float32, jnp.bfloat16, jnp.float16))


def dequantize(qweight, scales, zeros, bits: int, group_size: int, dtype=jnp.float32,
               n: int | None = None):
    """w = (q - zeros[k // g]) * scales[k // g] (f32 math) as a dense [..., n, out] `dtype` array.

    Leading axes are a batch; n (default: all packed rows) allows a ragged last word and group.
    The one dequantization of jaxeff (`QuantizedWeight.materialize` calls it).
    """
    q = unpack_codes(qweight, bits, n).astype(jnp.float32)
    rows = q.shape[-2]
    rep = lambda t: jnp.repeat(t.astype(jnp.float32), group_size, axis=-2)[..., :rows, :]
    return ((q - rep(zeros)) * rep(scales)).astype(dtype)


def quant_matmul_reference(x, qweight, scales, zeros, *, bits: int = 4, group_size: int = 128):
    """y = x @ dequant(qweight, scales, zeros) in plain jnp (f32 accumulation).

    Args: x [N, in] float; qweight uint32 [in // (32 // bits), out]; scales, zeros
    [in // group_size, out]; bits in (2, 4, 8) (default 4); group_size (default 128).
    Returns y [N, out] in x.dtype. Raises: ValueError / TypeError for bad shapes or dtypes.
    """
    _check("quant_matmul_reference", x, qweight, scales, zeros, bits, group_size)
    w = dequantize(qweight, scales, zeros, bits, group_size, x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _qmm_kernel(x_ref, qw_ref, s_ref, z_ref, o_ref, *, bits, bk, group_size, nk):
    from jax.experimental.pallas import triton as plgpu
    per = 32 // bits
    rows = bk // per
    bm, bn = o_ref.shape
    mask = jnp.uint32((1 << bits) - 1)

    def body(kk, acc):
        g = (kk * bk) // group_size
        scale = s_ref[pl.ds(g, 1), :].astype(jnp.float32)            # [1, bn]
        zero = z_ref[pl.ds(g, 1), :].astype(jnp.float32)
        words = qw_ref[pl.ds(kk * rows, rows), :]                      # [bk / P, bn] uint32
        for t in range(per):                                           # static unroll
            q = ((words >> jnp.uint32(bits * t)) & mask).astype(jnp.int32).astype(jnp.float32)
            w = ((q - zero) * scale).astype(x_ref.dtype)
            xt = x_ref[:, pl.ds(kk * bk + t, rows, stride=per)]          # columns k = t, t+P, ...
            acc = acc + plgpu.dot(xt, w)
        return acc

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _qmm(x, qweight, scales, zeros, bits, group_size, block_m, block_n, interpret):
    from jax.experimental.pallas import triton as plgpu
    per = 32 // bits
    m, din = x.shape
    dout = qweight.shape[1]
    bk = 16 * per
    bm = min(block_m, max(16, pl.next_power_of_2(m)))
    mp = _common.round_up(m, bm)
    xp = _common.pad_axis(x, 0, mp)
    kernel = functools.partial(_qmm_kernel, bits=bits, bk=bk, group_size=group_size, nk=din // bk)
    out = pl.pallas_call(
        kernel, grid=(mp // bm, dout // block_n),
        in_specs=[pl.BlockSpec((bm, din), lambda i, j: (i, 0)),
                  pl.BlockSpec((din // per, block_n), lambda i, j: (0, j)),
                  pl.BlockSpec((din // group_size, block_n), lambda i, j: (0, j)),
                  pl.BlockSpec((din // group_size, block_n), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, dout), x.dtype), interpret=interpret,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3), name="jaxeff_quant_matmul",
    )(xp, qweight, scales, zeros)
    return out[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _quant_matmul(x, qweight, scales, zeros, bits, group_size, block_m, block_n, interpret):
    return _qmm(x, qweight, scales, zeros, bits, group_size, block_m, block_n, interpret)


def _quant_matmul_fwd(x, qweight, scales, zeros, *static):
    return _quant_matmul(x, qweight, scales, zeros, *static), (qweight, scales, zeros)


def _quant_matmul_bwd(bits, group_size, block_m, block_n, interpret, res, gy):
    qweight, scales, zeros = res
    w = dequantize(qweight, scales, zeros, bits, group_size, gy.dtype)
    gx = jnp.dot(gy, w.T, preferred_element_type=jnp.float32).astype(gy.dtype)
    return gx, None, jnp.zeros_like(scales), jnp.zeros_like(zeros)


_quant_matmul.defvjp(_quant_matmul_fwd, _quant_matmul_bwd)


# ------------------------------------------------------------------- TPU (Mosaic) kernel.

def _qmm_tpu_kernel(x_ref, qw_ref, s_ref, z_ref, o_ref, *, bits, group_size):
    """o = x' @ dequant(W) for one [bm, bn] tile; x' has its columns grouped by code slot.

    Word row i of slot t holds input row i * P + t, so slot t's codes form a [K/P, bn] matrix
    whose rows meet x'[:, t*K/P:(t+1)*K/P] (x reordered once outside: x'[:, t*K/P + i] =
    x[:, i*P + t]). Group of row i*P + t is i // (group_size / P): a broadcast, no gather.
    """
    per = 32 // bits
    kw, bn = qw_ref.shape
    gw = group_size // per
    ng = kw // gw
    mask = (1 << bits) - 1
    words = qw_ref[...]
    scale = s_ref[...].astype(jnp.float32).reshape(ng, 1, bn)
    zero = z_ref[...].astype(jnp.float32).reshape(ng, 1, bn)
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    for t in range(per):  # static unroll over the P code slots of a word
        q = (jax.lax.shift_right_logical(words, jnp.int32(bits * t)) & mask).astype(jnp.float32)
        w = ((q.reshape(ng, gw, bn) - zero) * scale).reshape(kw, bn).astype(x_ref.dtype)
        acc = acc + jnp.dot(x_ref[:, t * kw:(t + 1) * kw], w, preferred_element_type=jnp.float32)
    o_ref[...] = acc.astype(o_ref.dtype)


def _qmm_tpu(x, qweight, scales, zeros, bits, group_size, interpret):
    from . import _common as c
    per = 32 // bits
    m, din = x.shape
    dout = qweight.shape[1]
    bm = min(128, c.round_up(m, 8))
    bn = 128 if dout % 128 == 0 else dout
    mp = c.round_up(m, bm)
    xr = c.pad_axis(x, 0, mp).reshape(mp, din // per, per).transpose(0, 2, 1).reshape(mp, din)
    words = jax.lax.bitcast_convert_type(qweight, jnp.int32)
    ng = din // group_size
    call = functools.partial(
        pl.pallas_call, functools.partial(_qmm_tpu_kernel, bits=bits, group_size=group_size),
        grid=(mp // bm, dout // bn),
        in_specs=[pl.BlockSpec((bm, din), lambda i, j: (i, 0)),
                  pl.BlockSpec((din // per, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((ng, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((ng, bn), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((mp, dout), x.dtype), name="jaxeff_quant_matmul_tpu")
    return c.run_pallas(call, xr, words, scales, zeros, platform="tpu", interpret=interpret)[:m]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _quant_matmul_tpu(x, qweight, scales, zeros, bits, group_size, interpret):
    return _qmm_tpu(x, qweight, scales, zeros, bits, group_size, interpret)


def _quant_matmul_tpu_fwd(x, qweight, scales, zeros, *static):
    return _quant_matmul_tpu(x, qweight, scales, zeros, *static), (qweight, scales, zeros)


def _quant_matmul_tpu_bwd(bits, group_size, interpret, res, gy):
    return _quant_matmul_bwd(bits, group_size, None, None, interpret, res, gy)


_quant_matmul_tpu.defvjp(_quant_matmul_tpu_fwd, _quant_matmul_tpu_bwd)


def quant_matmul_pallas(x, qweight, scales, zeros, *, bits: int = 4, group_size: int = 128,
                        block_m: int = 64, block_n: int | None = None, interpret: bool = False,
                        platform: str | None = None):
    """y = x @ dequant(W) with the Triton kernel (layout in the module docstring).

    Args as in `quant_matmul_reference`, plus block_m (default 64; clipped to N, min 16),
    block_n (default: the largest of 128, 64, 32, 16 dividing out that still launches >= 264
    programs, else the smallest that divides) — powers of two — and interpret.
    Kernel constraints, checked here: group_size % (16 * 32 // bits) == 0 (one group per K block: 64 for int8, 128 for int4,
    256 for int2) and out % block_n == 0. x rows are padded, so any N works.
    Raises: ValueError / TypeError for bad shapes, dtypes, block sizes or the constraints above.
    """
    name = "quant_matmul_pallas"
    _check(name, x, qweight, scales, zeros, bits, group_size)
    if _common.pallas_platform(platform, name) == "tpu":
        per = 32 // bits
        if group_size % (8 * per):
            raise ValueError(f"{name}: the TPU kernel needs group_size a multiple of {8 * per} "
                             f"for bits={bits} (8 packed rows per group); got {group_size}")
        return _quant_matmul_tpu(x, qweight, scales, zeros, bits, group_size, interpret)
    if block_n is None:  # Largest block that still gives >= 2 programs per H200 SM (132 SMs).
        dout = qweight.shape[1]
        rows = pl.cdiv(x.shape[0], min(block_m, max(16, pl.next_power_of_2(x.shape[0]))))
        fits = [b for b in (128, 64, 32, 16) if dout % b == 0]
        block_n = next((b for b in fits if rows * (dout // b) >= 264), fits[-1] if fits else 128)
    _common.check_pow2(name, "block_m", block_m, 16)
    _common.check_pow2(name, "block_n", block_n, 16)
    bk = 16 * (32 // bits)
    if group_size % bk:
        raise ValueError(f"{name}: group_size must be a multiple of {bk} for bits={bits} (the K "
                         f"block holds 16 codes per packed row); got {group_size}. Use "
                         f"impl='reference' for smaller groups.")
    if qweight.shape[1] % block_n:
        raise ValueError(f"{name}: out={qweight.shape[1]} must be a multiple of block_n={block_n}")
    return _quant_matmul(x, qweight, scales, zeros, bits, group_size, block_m, block_n, interpret)


def quant_matmul(x, qweight, scales, zeros, *, bits: int = 4, group_size: int = 128,
                 impl: str | None = None, interpret: bool = False):
    """Dequantize-matmul dispatcher: Pallas on GPU for <= PALLAS_MAX_ROWS rows, else the reference.

    On an H200 (kernels/bench.py) the kernel ties or beats XLA's dequantize-then-cuBLAS at 16
    rows (2x on 4096 x 11008) but is 8x slower at 64 rows and 5x at 4096, so larger inputs and
    CPU use the reference, as do layouts outside the kernel's constraints (group_size a
    multiple of 16 * 32 // bits, out a multiple of 16). On TPU impl=None keeps the reference
    (the Mosaic kernel, `quant_matmul_pallas(platform='tpu')`, is verified in TPU interpret
    mode only and not timed).
    Leading batch axes of x are flattened. impl='pallas'|'reference' forces one; interpret=True
    runs the kernel in interpret mode.
    Raises: ValueError for an unknown impl, plus the chosen implementation's checks.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    fits = (bits in BITS and group_size % (16 * (32 // bits)) == 0 and qweight.ndim == 2
            and qweight.shape[1] % 16 == 0)  # the kernel's constraints (quant_matmul_pallas)
    gpu_pick = "pallas" if x2.shape[0] <= PALLAS_MAX_ROWS and fits else "reference"
    chosen = _common.resolve_impl(impl, interpret, name="quant_matmul",
                                  accelerator_default=gpu_pick if _common.backend() == "gpu"
                                  else "reference")
    if chosen == "reference":
        y = quant_matmul_reference(x2, qweight, scales, zeros, bits=bits, group_size=group_size)
    else:
        y = quant_matmul_pallas(x2, qweight, scales, zeros, bits=bits, group_size=group_size,
                                interpret=interpret)
    return y.reshape(*lead, y.shape[-1])
