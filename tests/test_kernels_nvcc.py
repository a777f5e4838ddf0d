"""Compile the CUDA kernel bodies with nvcc, wrapped exactly as mx.fast.cuda_kernel wraps
them (its header, a __global__ function, template arguments as constexprs). Catches syntax
and type errors in kernels/ on machines without a GPU; skipped when nvcc is absent."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mlxgate import _vocab_kernels as vk

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")

# Every kernel, every input dtype, vector and scalar loads, small and full-size blocks.
NO_IDS = [
    ("entropy_fwd", "float32", 262144, 1024, 4),
    ("entropy_fwd", "bfloat16", 4099, 256, 1),
    ("kl_fwd", "float16", 32768, 512, 8),
    ("kl_fwd", "float32", 33, 32, 1),
    ("entropy_bwd", "bfloat16", 1000, 256, 8),
    ("kl_bwd", "float32", 7, 256, 4),
]
WITH_IDS = [
    ("entropy_fwd_ids", "bfloat16", 262144, 1024, 8),
    ("entropy_fwd_ids", "float32", 1, 32, 1),
    ("entropy_bwd_ids", "float16", 4099, 256, 1),
]


@pytest.mark.parametrize("items", [NO_IDS, WITH_IDS], ids=["no_ids", "ids"])
def test_cuda_bodies_compile(tmp_path, items):
    src = tmp_path / "mlxgate_kernels.cu"
    src.write_text(vk.cuda_test_source(items))
    cmd = [NVCC, "-std=c++17", "-arch=sm_80", "-Werror", "all-warnings", "-diag-suppress", "177",
           "-c", str(src), "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "k.o").stat().st_size > 0
