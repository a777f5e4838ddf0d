"""Benchmark `measure`, side by side in one run (ratios; this machine is noisy).

1. measure's tokens/s vs a plain mlx-lm ``generate_step`` loop on the same model and prompt
   (target >= 0.8x: measuring H_t must cost little).
2. vs a no-cache loop that re-runs the full sequence at every step, as PhaseGPT's MLX entropy
   probe does (target >= 5x at 128 tokens).
3. OpenBLAS vs reference-BLAS float32 matmul (each in a fresh subprocess: BLAS is chosen at load).

Usage: python bench/measure.py [--model smollm2-135m-instruct] [--tokens 128] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)
from mlxgate import backend, ops
from mlxgate.generate import generate
from mlxgate.models import load
from mlxgate.prompts import prompt_ids

import mlx.core as mx  # noqa: E402

PROMPT = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."

MATMUL_SNIPPET = """
import os, sys, time, json
if os.environ.get("MLXGATE_BLAS") != "reference":
    import mlxgate
else:
    import mlxgate  # honours MLXGATE_BLAS=reference: no OpenBLAS
import mlx.core as mx
a = mx.random.normal((512, 2048)); b = mx.random.normal((2048, 2048)); mx.eval(a, b)
mx.eval(a @ b)
t = time.perf_counter(); n = 3
for _ in range(n): mx.eval(a @ b)
dt = (time.perf_counter() - t) / n
from mlxgate import backend
print(json.dumps({"gflops": 2 * 512 * 2048 * 2048 / dt / 1e9, "blas": backend.blas_in_use()}))
"""


def mlx_lm_loop(model, prompt: list[int], n: int) -> float:
    """Tokens/s of mlx-lm's own generate_step (greedy, KV cache), no entropy."""
    from mlx_lm.generate import generate_step

    t = time.perf_counter()
    count = 0
    for _ in generate_step(mx.array(prompt), model, max_tokens=n):
        count += 1
    return count / (time.perf_counter() - t)


def measure_loop(model, prompt: list[int], n: int) -> float:
    """Tokens/s of mlxgate's measure path: KV cache + H_t and log-prob at every token."""
    t = time.perf_counter()
    out = generate(model, [prompt], n, eos_ids=set(), with_logprobs=True)
    return len(out[0].tokens) / (time.perf_counter() - t)


def no_cache_loop(model, prompt: list[int], n: int) -> float:
    """PhaseGPT-style probe: re-run the whole sequence every step, entropy of the last position."""
    seq = list(prompt)
    t = time.perf_counter()
    for _ in range(n):
        logits = model(mx.array(seq)[None])[0, -1]
        h = ops.entropy(logits)
        tok = mx.argmax(logits)
        mx.eval(h, tok)
        seq.append(int(tok.item()))
    return n / (time.perf_counter() - t)


def matmul(reference: bool) -> dict:
    env = {**os.environ, "MLXGATE_BLAS": "reference" if reference else ""}
    proc = subprocess.run([sys.executable, "-c", MATMUL_SNIPPET], capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="alternating repeats; the best of each is kept")
    parser.add_argument("--out", default="bench/results/measure.json")
    args = parser.parse_args()

    model, tok, info = load(args.model)
    prompt = prompt_ids(tok, PROMPT)
    generate(model, [prompt], 8, eos_ids=set())  # warm-up (kernel compilation, allocator)

    runs = {"mlx_lm_generate_step": [], "mlxgate_measure": [], "no_cache_full_recompute": []}
    for _ in range(args.repeats):  # interleaved so drift in machine load hits both sides
        runs["mlx_lm_generate_step"].append(mlx_lm_loop(model, prompt, args.tokens))
        runs["mlxgate_measure"].append(measure_loop(model, prompt, args.tokens))
    runs["no_cache_full_recompute"].append(no_cache_loop(model, prompt, args.tokens))
    best = {k: max(v) for k, v in runs.items()}
    blas_fast, blas_ref = matmul(False), matmul(True)

    result = {
        "model": info.to_dict(),
        "backend": backend.backend_label(),
        "tokens": args.tokens,
        "prompt_tokens": len(prompt),
        "tokens_per_s": best,
        "tokens_per_s_all": runs,
        "ratio_measure_vs_mlx_lm": best["mlxgate_measure"] / best["mlx_lm_generate_step"],
        "ratio_measure_vs_no_cache": best["mlxgate_measure"] / best["no_cache_full_recompute"],
        "matmul_gflops": {"openblas": blas_fast, "reference": blas_ref},
        "ratio_openblas_vs_reference": blas_fast["gflops"] / blas_ref["gflops"],
        "targets": {"measure_vs_mlx_lm": ">= 0.8", "measure_vs_no_cache": ">= 5 at 128 tokens"},
    }
    print(f"model {info.name} ({result['backend']}), {args.tokens} new tokens after a {len(prompt)}-token prompt")
    for k, v in best.items():
        print(f"  {k:<26} {v:8.2f} tok/s")
    print(f"  measure / mlx-lm generate_step : {result['ratio_measure_vs_mlx_lm']:.2f}x  (target >= 0.8)")
    print(f"  measure / no-cache recompute   : {result['ratio_measure_vs_no_cache']:.2f}x  (target >= 5)")
    print(f"  matmul 512x2048x2048 f32: OpenBLAS {blas_fast['gflops']:.1f} GFLOP/s vs reference {blas_ref['gflops']:.1f} "
          f"-> {result['ratio_openblas_vs_reference']:.1f}x")
    out = Path(args.out)
    from mlxgate.io import write_json

    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
