"""jaxeff.kernels: Pallas kernels, each with a plain-jnp reference twin and a dispatcher.

Every op comes as `<op>_reference` (jnp, the definition of correctness), `<op>_pallas` (Triton on
GPU; Mosaic on TPU where stated; differentiable through jax.custom_vjp where it has a gradient)
and `<op>` (the dispatcher users call: chosen once at trace time from jax.default_backend();
`impl='pallas'|'reference'` forces one, `interpret=True` runs the kernel in Pallas interpret
mode on any backend). On a GPU the dispatcher keeps a kernel only where it beat XLA on an H200
(`python kernels/bench.py`, numbers in each module's docstring).

| module | op | GPU dispatch | TPU | grads |
|---|---|---|---|---|
| packed_attention | attention(q, k, v, segment_ids, causal, sm_scale): packed sequences, GQA, ragged T | Pallas (JAX's flash kernels, our GQA launcher): 5-9x XLA | Pallas (JAX's flash_attention) | q, k, v |
| sparse_lowrank | sltrain_matmul(x, a, b, indices, values, scale): y = x @ (scale A B + S) | Pallas (SDDMM for gvalues; fused matmul kernel optional): 4-19 % faster fwd+bwd | reference | x, a, b, values |
| dequant_matmul | quant_matmul(x, qweight, scales, zeros, bits, group_size): int2/4/8 GPTQ/RTN | Pallas for <= 16 rows, else reference | reference | x |
| fused_optim | adam_update, sophia_update: one-pass element-wise steps | reference (XLA already at the bandwidth roofline) | reference | - |
| fused_optim | galore_adam_update: project, inner Adam, project back | Pallas for r <= 128, else reference | reference | - |
| group_quant | quantize_int8 (absmax per group) | Pallas: 1.34x XLA | reference | - |
| group_quant | quantize_fp8 (E4M3, COAT dynamic range expansion) | reference (the kernel lost) | reference | - |

Imports flow jaxeff -> jaxeff.kernels -> jax; nothing here imports jaxeff.
"""
from .packed_attention import attention, attention_pallas, attention_reference
from .fused_optim import (adam_update, adam_update_pallas, adam_update_reference,
                          galore_adam_update, galore_adam_update_pallas,
                          galore_adam_update_reference, sophia_update, sophia_update_pallas,
                          sophia_update_reference)
from .group_quant import (Fp8Groups, dequantize_fp8, dequantize_int8, quantize_fp8,
                          quantize_fp8_pallas, quantize_fp8_reference, quantize_int8,
                          quantize_int8_pallas, quantize_int8_reference)
from .dequant_matmul import (dequantize, pack_codes, quant_matmul, quant_matmul_pallas,
                           quant_matmul_reference, rtn_quantize, unpack_codes)
from .sparse_lowrank import (sltrain_matmul, sltrain_matmul_pallas, sltrain_matmul_reference,
                             sparse_dense)

__all__ = [
    "attention", "attention_pallas", "attention_reference",
    "adam_update", "adam_update_pallas", "adam_update_reference",
    "sophia_update", "sophia_update_pallas", "sophia_update_reference",
    "galore_adam_update", "galore_adam_update_pallas", "galore_adam_update_reference",
    "Fp8Groups", "quantize_int8", "quantize_int8_pallas", "quantize_int8_reference",
    "dequantize_int8", "quantize_fp8", "quantize_fp8_pallas", "quantize_fp8_reference",
    "dequantize_fp8",
    "quant_matmul", "quant_matmul_pallas", "quant_matmul_reference", "rtn_quantize",
    "pack_codes", "unpack_codes", "dequantize",
    "sltrain_matmul", "sltrain_matmul_pallas", "sltrain_matmul_reference", "sparse_dense",
]
