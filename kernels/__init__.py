"""jaxeff.kernels: Pallas kernels, each with a plain-jnp reference twin and a dispatcher.

Every op comes as `<op>_reference` (jnp, the definition of correctness), `<op>_pallas` (Triton on
GPU; Mosaic on TPU where stated; differentiable through jax.custom_vjp where it has a gradient)
and `<op>` (the dispatcher users call: chosen once at trace time from jax.default_backend();
`impl='pallas'|'reference'` forces one, `interpret=True` runs the kernel in Pallas interpret
mode on any backend). On a GPU the dispatcher keeps a kernel only where it beat XLA on an H200
(`python kernels/bench.py`, numbers in each module's docstring).

| module | op | GPU dispatch | TPU (`platform='tpu'`) | grads |
|---|---|---|---|---|
| packed_attention | attention(q, k, v, segment_ids, *, causal, sm_scale): packed sequences, GQA, ragged T | Pallas (JAX's flash kernels, our GQA launcher): 5-9x XLA | Pallas: JAX's splash attention (segment ids, GQA without K/V repeat) | q, k, v |
| sparse_lowrank | sltrain_matmul(x, a, b, indices, values, scale): y = x @ (scale A B + S) | Pallas (SDDMM for gvalues; fused matmul kernel optional): 4-19 % faster fwd+bwd | Mosaic fused `x @ S + s (x@A) @ B` kernel; dispatcher: reference (not timed) | x, a, b, values |
| dequant_matmul | quant_matmul(x, qweight, scales, zeros, bits, group_size): int2/4/8 GPTQ/RTN | Pallas for <= 16 rows, else reference | Mosaic kernel; dispatcher: reference (not timed) | x |
| dequant_matmul | pack_codes / unpack_codes / find_params / quantize_codes / dequantize | - | - | - |
| fused_optim | adam_update, sophia_update: one-pass element-wise steps | reference (XLA already at the bandwidth roofline) | reference | - |
| fused_optim | galore_adam_update: project, inner Adam, project back | Pallas for r <= 128, else reference | reference | - |
| group_quant | group_quantize (optimizer states: int8 / E4M3, linear or COAT DRE; `compress_state` calls it) | reference (kernel not timed) | Mosaic kernel, bit-identical; dispatcher: reference | - |
| group_quant | quantize_int8 (absmax per group, flat tensor) | Pallas: 1.34x XLA | reference | - |
| group_quant | quantize_fp8 (E4M3, COAT dynamic range expansion, flat tensor) | reference (the kernel lost) | reference | - |

The library reaches these through `jaxeff.params.linear` (every structured weight's product),
`jaxeff.models.llama` (projections and attention; `LlamaConfig.impl` / `.interpret`) and
`jaxeff.optim.compress_state` (group_quantize). The `_reference` functions here are the
library's only copy of that math (packing, RTN/GPTQ quantizer, dequantization, state group
quantization, attention). The TPU kernels are verified on CPU in Pallas's TPU interpret mode
only (`pltpu.InterpretParams`); none has run on a TPU, so no TPU dispatcher picks a new one by
default.

Kernel libraries evaluated (tokamax 0.0.12, qwix 0.1.8; installed on this CPU machine in a
scratch directory, not as dependencies):
- tokamax `dot_product_attention` (the successor of `pallas.ops.gpu.attention`): GQA yes,
  backward yes (Triton and Mosaic-GPU VJPs), but its public API has no segment ids: packed
  documents need a dense [B, N, T, S] boolean mask (O(T^2) memory, what the kernels exist to
  avoid) or the private `base.Mask(k_start=...)` (contiguous documents only). Its GPU
  implementations raise NotImplementedError on CPU and have no interpret mode, so nothing of
  its GPU path could be verified here (only its XLA path ran, GQA causal). Decision: our
  launcher of JAX's flash kernels stays the GPU path (segment ids, GQA by index maps, measured
  5-9x XLA); revisit once tokamax exposes segment ids and a GPU can time both.
- qwix's quantized matmul (`qwix.contrib.kernels.quantized_matmul`): a TPU-only contrib
  kernel for both operands quantized with scales and no zero points (it refuses
  `zero_point`), so it cannot serve asymmetric GPTQ/RTN int2/4/8 weights with a float x.
  Decision: not used; our dequantize-matmul stays.

Imports flow jaxeff -> jaxeff.kernels -> jax; nothing here imports jaxeff.
"""
from .packed_attention import attention, attention_pallas, attention_reference
from .fused_optim import (adam_update, adam_update_pallas, adam_update_reference,
                          galore_adam_update, galore_adam_update_pallas,
                          galore_adam_update_reference, sophia_update, sophia_update_pallas,
                          sophia_update_reference)
from .group_quant import (Fp8Groups, dequantize_fp8, dequantize_int8, group_dequantize,
                          group_quantize, group_quantize_pallas, group_quantize_reference,
                          quantize_fp8, quantize_fp8_pallas, quantize_fp8_reference, quantize_int8,
                          quantize_int8_pallas, quantize_int8_reference)
from .dequant_matmul import (dequantize, find_params, pack_codes, quant_matmul,
                             quant_matmul_pallas, quant_matmul_reference, quantize_codes,
                             rtn_quantize, unpack_codes)
from .sparse_lowrank import (sltrain_matmul, sltrain_matmul_pallas, sltrain_matmul_reference,
                             sparse_dense)

__all__ = [
    "attention", "attention_pallas", "attention_reference",
    "adam_update", "adam_update_pallas", "adam_update_reference",
    "sophia_update", "sophia_update_pallas", "sophia_update_reference",
    "galore_adam_update", "galore_adam_update_pallas", "galore_adam_update_reference",
    "Fp8Groups", "quantize_int8", "quantize_int8_pallas", "quantize_int8_reference",
    "dequantize_int8", "quantize_fp8", "quantize_fp8_pallas", "quantize_fp8_reference",
    "dequantize_fp8", "group_quantize", "group_quantize_pallas", "group_quantize_reference",
    "group_dequantize",
    "quant_matmul", "quant_matmul_pallas", "quant_matmul_reference", "rtn_quantize",
    "pack_codes", "unpack_codes", "dequantize", "find_params", "quantize_codes",
    "sltrain_matmul", "sltrain_matmul_pallas", "sltrain_matmul_reference", "sparse_dense",
]
