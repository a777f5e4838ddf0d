"""The CUDA kernels of kernels/ through mx.fast.cuda_kernel (SPEC §4).

Run whenever MLX's default device is an NVIDIA GPU (``mlx[cuda]``); skipped otherwise. The
oracle is the float64 numpy one of test_ops.py; here the fused path is also checked against
the composed path on the same GPU, across launch shapes the CPU never sees.
"""

from __future__ import annotations

import mlxgate  # noqa: F401

import mlx.core as mx
import numpy as np
import pytest

from mlxgate import backend, ops
from tests.test_ops import TOL_F32, as_np, check_random_rows, close, ref_stats

pytestmark = pytest.mark.skipif(
    not backend.is_cuda(), reason="no CUDA device: MLX's default device is not an NVIDIA GPU"
)
RNG = np.random.default_rng(7)


def test_dispatch_uses_the_cuda_kernels():
    assert ops.current_path() == "cuda"


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("rows,vocab", [(3, 1), (5, 33), (4, 32771), (3, 262144), (2, 262147)])
def test_kernel_matches_oracle(dtype, rows, vocab):
    check_random_rows(RNG, dtype, rows, vocab)


def test_misaligned_rows_take_the_scalar_loop():
    # A row-contiguous view starting one element in: 16-byte loads would be misaligned.
    flat = mx.array((RNG.standard_normal(4 * 4096 + 1) * 3).astype(np.float32))
    x = flat[1:].reshape(4, 4096)
    close(as_np(ops.entropy(x)), ref_stats(as_np(x))["entropy"], TOL_F32, 1e-6)


def test_many_rows_and_grid_limits():
    x = (RNG.standard_normal((70000, 40)) * 2).astype(np.float32)
    close(as_np(ops.entropy(mx.array(x))), ref_stats(x)["entropy"], TOL_F32, 1e-6)


def test_fused_equals_composed_on_gpu_incl_gradients():
    x = mx.array((RNG.standard_normal((6, 50001)) * 3).astype(np.float32))
    y = mx.array((RNG.standard_normal((6, 50001)) * 3).astype(np.float32))
    ids = mx.array(RNG.integers(0, 50001, 6))

    def loss(a, b):
        st = ops.entropy_stats(a, ids)
        return (st["entropy"] + 0.5 * st["target_logprob"] - 0.1 * st["logsumexp"]).sum() + (
            ops.kl(a, b) * mx.arange(6)
        ).sum()

    g = mx.grad(loss, argnums=(0, 1))
    fused = g(x, y)
    with ops.ops_mode("composed"):
        comp = g(x, y)
    for f, c in zip(fused, comp):
        # Each entry sums terms of both signs; scale the absolute bound by the largest entry.
        close(as_np(f), as_np(c), 1e-4, 1e-4 * float(np.abs(as_np(c)).max()))


def test_gpu_determinism_twenty_calls():
    x = mx.array((RNG.standard_normal((64, 262144)) * 4).astype(np.float32)).astype(mx.bfloat16)
    y = mx.array((RNG.standard_normal((64, 262144)) * 4).astype(np.float32)).astype(mx.bfloat16)
    h0, k0 = np.array(ops.entropy(x)), np.array(ops.kl(x, y))
    for _ in range(20):
        assert np.array_equal(np.array(ops.entropy(x)), h0)
        assert np.array_equal(np.array(ops.kl(x, y)), k0)
