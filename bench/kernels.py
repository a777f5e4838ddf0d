"""Fused vs naive vocabulary reductions, side by side in one run (issue 4, SPEC §4).

For [1, 32768], [64, 262144] and [512, 262144] logits in float32 and bfloat16, entropy and
KL(P||Q): time per call of mlxgate.ops on its default path (fused kernel on a GPU, chunked
composed ops on CPU) and of the naive composed expressions (``ops_mode('naive')``), their
ratio, and each one's peak memory beyond the inputs (MLX's peak counter, reset per case) as a
multiple of the input's size. On a GPU the time is per call with calls queued back to back
(single-call latency, dominated by MLX's ~0.1 ms eval/sync, is recorded too), and also the fused path's achieved GB/s (logit bytes read)
and its share of the device's memory bandwidth.

Targets: CPU >= 2x faster than naive and extra peak <= 0.25x the input; GPU >= 80% of
bandwidth for entropy and >= 70% for KL.

    python bench/kernels.py [--out FILE] [--shapes 1x32768,64x262144] [--min-time 1.0]

Writes JSON to bench/results/kernels.json (and ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx

from mlxgate import backend, ops

SHAPES = [(1, 32768), (64, 262144), (512, 262144)]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}
TARGETS = {"cpu_speedup": 2.0, "cpu_extra_peak_x": 0.25, "gpu_bw_entropy": 0.80, "gpu_bw_kl": 0.70}
# Spec-sheet DRAM bandwidth, GB/s, by device-name fragment (checked in order).
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2039.0),
    ("H100", 3352.0),  # SXM5 80GB HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),
    ("L40S", 864.0),
    ("RTX 4090", 1008.0),
]


def gpu_name() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def peak_bandwidth(name: str | None) -> float | None:
    if not name:
        return None
    for frag, gbps in PEAK_GBPS:
        if frag in name:
            return gbps
    return None


def timed(fn, min_time: float, max_reps: int = 20) -> float:
    """Median seconds of ``fn`` (evaluated), repeated until ``min_time`` has passed."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (not times or time.perf_counter() - start < min_time):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pipelined(fn, min_time: float, batch: int = 20) -> float:
    """Seconds per call with calls queued back to back (mx.async_eval), so a GPU's launch and
    sync latency (~0.1 ms per eval in MLX) does not hide its throughput; median of batches."""
    per_call: list[float] = []
    start = time.perf_counter()
    while len(per_call) < 3 or (time.perf_counter() - start < min_time and len(per_call) < 50):
        mx.synchronize()
        t0 = time.perf_counter()
        outs = []
        for _ in range(batch):
            outs.append(fn())
            mx.async_eval(outs[-1])
        mx.eval(outs)
        mx.synchronize()
        per_call.append((time.perf_counter() - t0) / batch)
        del outs
    return statistics.median(per_call)


def extra_peak(fn) -> int:
    """Bytes of MLX memory ``fn`` needed beyond what was live before it (inputs)."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    out = fn()
    mx.eval(out)
    mx.synchronize()
    peak = mx.get_peak_memory() - base
    del out
    return peak


def copy_gbps(x: mx.array, min_time: float) -> float:
    """Achievable read+write bandwidth on this device: x -> -x (one read, one write)."""
    t = pipelined(lambda: -x, min_time)
    return 2 * x.nbytes / t / 1e9


def run_case(op: str, shape: tuple[int, int], dname: str, min_time: float, bw: float | None) -> dict:
    dtype = DTYPES[dname]
    mx.random.seed(0)
    x = (mx.random.normal(shape) * 4).astype(dtype)
    y = (x.astype(mx.float32) + mx.random.normal(shape)).astype(dtype) if op == "kl" else None
    mx.eval(x, y) if y is not None else mx.eval(x)
    inputs = [x] if y is None else [x, y]
    in_bytes = sum(a.nbytes for a in inputs)

    def call(z):
        return ops.entropy(z[0]) if op == "entropy" else ops.kl(z[0], z[1])

    res: dict = {"op": op, "shape": list(shape), "dtype": dname, "input_bytes": in_bytes}
    for label, mode in (("fused", "auto"), ("naive", "naive")):
        with ops.ops_mode(mode):
            res[f"{label}_path"] = ops.current_path()
            mx.eval(call([a[: min(shape[0], 4)] for a in inputs]))  # warm: JIT, compile caches
            peak = extra_peak(lambda: call(inputs))
            secs = timed(lambda: call(inputs), min_time)
            if backend.device_name() != "cpu":
                res[f"{label}_latency_s"] = secs
                secs = pipelined(lambda: call(inputs), min_time)
        res[f"{label}_s"] = secs
        res[f"{label}_extra_peak_bytes"] = peak
        res[f"{label}_extra_peak_x"] = peak / in_bytes
    # The one check the two paths must agree on, so the table never times a wrong answer.
    with ops.ops_mode("naive"):
        ref = call(inputs)
    got = call(inputs)
    res["max_abs_diff_vs_naive"] = float(mx.max(mx.abs(got - ref)).item())
    res["speedup"] = res["naive_s"] / res["fused_s"]
    res["fused_gbps"] = in_bytes / res["fused_s"] / 1e9
    res["naive_gbps"] = in_bytes / res["naive_s"] / 1e9
    res["fused_pct_peak_bw"] = 100 * res["fused_gbps"] / bw if bw else None
    return res


def judge(r: dict, on_gpu: bool) -> str:
    if on_gpu:
        need = TARGETS["gpu_bw_entropy" if r["op"] == "entropy" else "gpu_bw_kl"] * 100
        pct = r["fused_pct_peak_bw"]
        return "?" if pct is None else ("ok" if pct >= need else f"<{need:.0f}%")
    fast = r["speedup"] >= TARGETS["cpu_speedup"]
    lean = r["fused_extra_peak_x"] <= TARGETS["cpu_extra_peak_x"]
    return "ok" if fast and lean else ("slow" if lean else ("mem" if fast else "slow,mem"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--shapes", default=None, help="e.g. 1x32768,64x262144 (default: all three)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--ops", default="entropy,kl")
    ap.add_argument("--min-time", type=float, default=None, help="seconds per timing (default 0.5 GPU, 1.0 CPU)")
    args = ap.parse_args(argv)

    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    on_gpu = backend.device_name() != "cpu"
    min_time = args.min_time if args.min_time is not None else (0.5 if on_gpu else 1.0)
    name = gpu_name() if backend.is_cuda() else None
    bw = peak_bandwidth(name)
    meta = {
        "device": backend.device_name(),
        "backend": backend.backend_label(),
        "gpu": name,
        "peak_bandwidth_gbps": bw,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "targets": TARGETS,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if on_gpu:
        probe = mx.random.normal((64, 262144))
        mx.eval(probe)
        meta["copy_gbps"] = copy_gbps(probe, min_time)
        del probe

    results = []
    hdr = (f"{'op':8s} {'shape':>13s} {'dtype':9s} {'fused ms':>10s} {'naive ms':>10s} {'x faster':>8s} "
           f"{'peak+ fused':>11s} {'peak+ naive':>11s} {'GB/s':>8s} {'%bw':>6s} {'diff':>8s} verdict")
    print(f"# {meta['backend']} ({name or platform.processor() or platform.machine()}), mlx {mx.__version__}"
          + (f", copy {meta['copy_gbps']:.0f} GB/s, spec {bw} GB/s" if on_gpu else ""))
    print(hdr)
    for shape in shapes:
        for dname in args.dtypes.split(","):
            for op in args.ops.split(","):
                r = run_case(op, shape, dname, min_time, bw)
                r["verdict"] = judge(r, on_gpu)
                results.append(r)
                pct = f"{r['fused_pct_peak_bw']:.0f}" if r["fused_pct_peak_bw"] is not None else "-"
                print(
                    f"{op:8s} {'x'.join(map(str, shape)):>13s} {dname:9s} {r['fused_s'] * 1e3:10.3f} "
                    f"{r['naive_s'] * 1e3:10.3f} {r['speedup']:8.2f} {r['fused_extra_peak_x']:10.3f}x "
                    f"{r['naive_extra_peak_x']:10.3f}x {r['fused_gbps']:8.1f} {pct:>6s} "
                    f"{r['max_abs_diff_vs_naive']:8.1e} {r['verdict']}",
                    flush=True,
                )
    doc = {"meta": meta, "results": results}
    default = Path(__file__).resolve().parent / "results" / "kernels.json"
    for path in {default, args.out} - {None}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2))
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
