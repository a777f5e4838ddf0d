"""The Metal kernels of kernels/ through mx.fast.metal_kernel (SPEC §4).

Run on Apple Silicon; skipped elsewhere (the Metal bodies share vocab_common.h with CUDA,
whose build is checked on Linux by test_kernels_nvcc.py and on NVIDIA by test_kernels_cuda.py).
"""

from __future__ import annotations

import mlxgate  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest

from mlxgate import backend, ops
from tests.test_ops import as_np, check_random_rows, close

pytestmark = pytest.mark.skipif(not backend.is_metal(), reason="no Metal device (not Apple Silicon)")
RNG = np.random.default_rng(11)


def test_dispatch_uses_the_metal_kernels():
    assert ops.current_path() == "metal"


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows,vocab", [(3, 1), (5, 33), (4, 32771), (2, 262144)])
def test_kernel_matches_oracle(dtype, rows, vocab):
    check_random_rows(RNG, dtype, rows, vocab)


def test_fused_equals_composed_incl_gradients_and_determinism():
    x = mx.array((RNG.standard_normal((6, 50001)) * 3).astype(np.float32))
    y = mx.array((RNG.standard_normal((6, 50001)) * 3).astype(np.float32))
    g = mx.grad(lambda a, b: (ops.entropy(a) + ops.kl(a, b)).sum(), argnums=(0, 1))
    fused = g(x, y)
    with ops.ops_mode("composed"):
        comp = g(x, y)
    for f, c in zip(fused, comp):
        close(as_np(f), as_np(c), 1e-4, 1e-4 * float(np.abs(as_np(c)).max()))
    h0 = np.array(ops.entropy(x))
    for _ in range(20):
        assert np.array_equal(np.array(ops.entropy(x)), h0)
