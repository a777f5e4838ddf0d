"""Data-parallel heal: tokens/s with 1 and 2 ranks on the same global batches, and the time spent
in the gradient all-reduce, written as JSON.

    python bench/distributed.py [--model tiny|smollm2-135m-instruct] [--steps 12] [--out bench/results/distributed.json]

Runs this file as a worker once in a single process and once under
``mlx.launch -n 2 --backend ring`` (both ranks on this machine). Both runs see the same global
micro-batches (batch 8, same seed), so the figures compare like with like. Throughput counts the
global batch's completion tokens per second of training wall time, without the first
``--warmup`` steps (compilation). ``allreduce_s`` is the time of the explicit gradient all_sum
(one flat float32 vector per optimizer step), measured after the local gradients are ready; the
small in-loss reductions (SFT/KL sums, a few floats) are inside the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()


def worker(model_name: str, steps: int, batch: int, warmup: int, out: str) -> None:
    import mlxgate  # noqa: F401

    from mlxgate import distributed as D
    from mlxgate import heal as H
    from mlxgate.models import load

    model, tok, info = load(model_name)
    words = ["red", "blue", "green", "gold", "grey"]
    recs = [{"prompt": f"Tell me about colour number {i}.", "completion": " ".join(words[(i + j) % 5] for j in range(24 + i % 9))} for i in range(steps * batch)]
    ex, _ = H.make_examples(tok, recs)
    cfg = H.HealConfig(epochs=1, batch_size=batch, val_frac=0.0, rank=8, alpha=16, seed=0)
    res = H.heal(model, tok, ex, cfg)
    hist = res.history[warmup:]
    t = sum(h["tokens"] / h["tok_s"] for h in hist)
    rec = {
        "n_ranks": D.size(), "model": info.name, "steps": len(res.history), "timed_steps": len(hist),
        "global_batch": batch, "tokens_per_step": sum(h["tokens"] for h in hist) / max(len(hist), 1),
        "tok_s": sum(h["tokens"] for h in hist) / t, "step_s": t / max(len(hist), 1),
        "allreduce_s_total": res.summary.get("allreduce_s", 0.0),
        "allreduce_s_per_step": res.summary.get("allreduce_s", 0.0) / max(res.summary["optimizer_steps"], 1),
        "grad_floats": int(sum(v.size for v in res.weights.values())),
        "final_loss": res.history[-1]["loss"],
    }
    if D.is_main():
        Path(out).write_text(json.dumps(rec))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="'tiny' (a random 4-layer fixture) or a model name for mlxgate.models.load")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "distributed.json"))
    ap.add_argument("--worker", default=None)
    a = ap.parse_args()
    if a.worker:
        worker(a.model, a.steps, a.batch, a.warmup, a.worker)
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_dist_"))
    model = a.model
    if model == "tiny":
        import mlxgate  # noqa: F401
        from mlxgate.fixtures import make_tiny_checkpoint

        model = str(make_tiny_checkpoint(tmp / "tiny", "llama", seed=0))
    args = [__file__, "--model", model, "--steps", str(a.steps), "--batch", str(a.batch), "--warmup", str(a.warmup)]
    launch = str(Path(sys.executable).parent / "mlx.launch")
    runs = {}
    for n, cmd in ((1, [sys.executable]), (2, [launch, "-n", "2", "--backend", "ring", "--", sys.executable])):
        out = tmp / f"r{n}.json"
        # Two ranks on this host share its cores: give each rank cores/n BLAS threads, or the
        # ranks' OpenBLAS pools oversubscribe the CPU and spin against each other.
        env = {**os.environ, "OPENBLAS_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        p = subprocess.run(cmd + args + ["--worker", str(out)], capture_output=True, text=True, env=env)
        if p.returncode != 0 or not out.exists():
            sys.exit(f"{n}-rank run failed:\n{p.stderr[-3000:]}")
        runs[str(n)] = json.loads(out.read_text())
    one, two = runs["1"], runs["2"]
    report = {
        "what": "heal tokens/s, 1 vs 2 ranks (mlx.launch --backend ring, same host), same global batches",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "openblas_threads_per_rank": {n: max(1, (os.cpu_count() or 1) // n) for n in (1, 2)}},
        "runs": runs,
        "speedup_2_over_1": two["tok_s"] / one["tok_s"],
        "allreduce_frac_of_step_2ranks": two["allreduce_s_per_step"] / two["step_s"],
        "loss_match_rel": abs(two["final_loss"] - one["final_loss"]) / abs(one["final_loss"]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
