"""Test configuration: 8 simulated CPU devices for the sharding tests.

XLA reads the flag when the backend starts, so it is set before anything imports jax.
Single-device tests just run on device 0.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One BLAS thread per process: the suite runs on two xdist workers on 2 cores, and a threaded
# OpenBLAS under contention made LAPACK SVDs (GaLore refreshes, low-rank init) up to 80x slower.
# Notebook kernels inherit this environment.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
