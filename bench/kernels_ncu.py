"""Run each fused case of bench/kernels.py three times, for Nsight Compute's kernel durations.

MLX's per-call eval/sync overhead (~0.05-0.1 ms on CUDA) hides a 30-200 us kernel, so the
kernel-only bandwidth of the fused kernels comes from ncu (on a CUDA machine):

    ncu --clock-control none --kernel-name regex:mlxgate \
        --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
        python bench/kernels_ncu.py > ncu.csv

GB/s = dram__bytes_read.sum / gpu__time_duration.sum.
"""

import mlxgate  # noqa: F401

import mlx.core as mx

from mlxgate import ops

for shape in [(1, 32768), (64, 262144), (512, 262144)]:
    for dt in (mx.float32, mx.bfloat16):
        mx.random.seed(0)
        x = (mx.random.normal(shape) * 4).astype(dt)
        y = (mx.random.normal(shape) * 4).astype(dt)
        mx.eval(x, y)
        for _ in range(3):
            mx.eval(ops.entropy(x))
            mx.eval(ops.kl(x, y))
        print("done", shape, dt, flush=True)
