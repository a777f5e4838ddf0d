"""Benchmark `heal` against mlx-lm's own LoRA trainer, side by side in one run (ratios; this machine
is noisy), and check that healing the embedded instruct model works.

1. Training throughput and peak memory: mlxgate's heal step (SFT + hinge KL barrier against the
   frozen reference forward + spectral term, barrier on) vs ``mlx_lm.tuner.trainer.train`` (SFT
   only, its compiled step) on the same model, data, micro-batch, rank, scale and layers (blocks
   [int(0.2n), int(0.8n)), q,k,v,o,gate,up,down). Both compile their step; mlx-lm's first 2
   steps and heal's first epoch (one trace per shape) are not timed. Targets: >= 0.6x its
   completion tokens/s; peak memory <= 1.3x.
2. Heal on the embedded instruct model: the loss decreases; with a large λ the KL to the reference
   ends lower than with λ = 0 (same data, seed, steps).

Usage: python bench/heal.py [--model smollm2-135m-instruct] [--steps 8] [--batch-size 2]
       [--out bench/results/heal.json]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)
from mlxgate import backend, lora
from mlxgate import heal as H
from mlxgate.models import load

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

WARMUP_STEPS = 2  # first steps (allocation, mlx-lm's compile trace) are not timed

TOPICS = [
    "the water cycle", "how bread rises", "why the sky is blue", "how a bicycle stays upright",
    "what a compiler does", "how vaccines work", "why leaves change colour", "how tides form",
    "what causes thunder", "how bees make honey", "how a lock and key work", "why ice floats",
    "how the heart pumps blood", "what a black hole is", "how paper is made", "why we sleep",
    "how rainbows form", "what photosynthesis does", "how a battery stores energy", "why cats purr",
    "how glass is made", "what an earthquake is", "how plants drink water", "why the moon has phases",
]


def records(n: int) -> list[dict]:
    """Prompt/completion pairs of similar length (~70 completion tokens): kind, plain explanations."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        completion = (
            f"Happy to help! Here is a short, friendly explanation of {topic}. It comes down to a few simple "
            f"steps that happen again and again, and each one depends on the last. Once you see the pattern, "
            f"{topic} stops being a mystery and becomes something you can explain to a friend. Take care of "
            f"yourself and keep asking questions."
        )
        out.append({"prompt": f"Can you explain {topic} in simple words?", "completion": completion})
    return out


def adapt_like_heal(model, rank: int, scale: float) -> None:
    """mlx-lm's own LoRALinear on exactly the modules heal adapts (mlx-lm's loader can only pick the
    last n blocks; heal adapts [0.2n, 0.8n), so the layers are placed by hand for a fair match)."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.lora import LoRALinear

    model.freeze()
    for i in lora.adapted_blocks(len(model.layers)):
        block = model.layers[i]
        named = dict(block.named_modules())
        block.update_modules(tree_unflatten([(k, LoRALinear.from_base(named[k], r=rank, scale=scale)) for k in lora.LORA_KEYS if k in named]))


def run_mlx_lm(model_name: str, recs: list[dict], steps: int, batch_size: int, cfg: H.HealConfig) -> dict:
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import CacheDataset, CompletionsDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train

    model, tok, _ = load(model_name)
    adapt_like_heal(model, cfg.rank, cfg.scale)
    data = CacheDataset(CompletionsDataset(recs, tok, "prompt", "completion", mask_prompt=True))
    reports = []

    class Cb(TrainingCallback):
        def on_train_loss_report(self, info):
            reports.append({**info, "cpu_s": time.process_time()})

    args = TrainingArgs(batch_size=batch_size, iters=steps + WARMUP_STEPS, val_batches=0, steps_per_report=1,
                        steps_per_eval=10**9, steps_per_save=10**9,
                        adapter_file=str(Path(tempfile.mkdtemp(prefix="mlxgate-bench-")) / "adapters.safetensors"))
    opt = optim.AdamW(learning_rate=cfg.lr, betas=list(cfg.betas), weight_decay=cfg.weight_decay, bias_correction=True)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    train(model, opt, data, None, args, training_callback=Cb())
    timed = reports[WARMUP_STEPS:]
    tokens = sum(r["tokens_per_second"] / r["iterations_per_second"] for r in timed)  # per-step tokens
    seconds = sum(1.0 / r["iterations_per_second"] for r in timed)
    cpu = reports[-1]["cpu_s"] - reports[WARMUP_STEPS - 1]["cpu_s"]
    out = {"tok_s": tokens / seconds, "tok_per_cpu_s": tokens / cpu, "steps": len(timed), "peak_memory_bytes": int(mx.get_peak_memory()),
           "training_overhead_bytes": int(mx.get_peak_memory() - base), "losses": [r["train_loss"] for r in reports]}
    del model
    gc.collect()
    mx.clear_cache()
    return out


def run_heal(model_name: str, recs: list[dict], cfg: H.HealConfig, timed_from_epoch: int = 0) -> tuple[dict, object, object]:
    """Heal ``recs``; tokens/s over the micro-steps of epochs >= ``timed_from_epoch`` (a compiled
    step is traced once per shape, in the first epoch) and over all steps."""
    model, tok, _ = load(model_name)
    ex, _ = H.make_examples(tok, recs)
    mx.eval(model.parameters())
    base = mx.get_active_memory()
    cpu = []
    res = H.heal(model, tok, ex, cfg, on_step=lambda rec: cpu.append(time.process_time()))  # resets the peak itself
    for h, c in zip(res.history, cpu):
        h["cpu_s"] = c

    def rate(hist):
        return sum(h["tokens"] for h in hist) / sum(h["tokens"] / h["tok_s"] for h in hist)

    # CPU time is read after each step, so the first timed step needs the one before it.
    start = max(1, next(i for i, h in enumerate(res.history) if h["epoch"] >= timed_from_epoch))
    timed, before = res.history[start:], res.history[start - 1]
    out = {"tok_s": rate(timed), "tok_per_cpu_s": sum(h["tokens"] for h in timed) / (timed[-1]["cpu_s"] - before["cpu_s"]),
           "tok_s_all_steps": rate(res.history), "steps": len(timed),
           "peak_memory_bytes": int(mx.get_peak_memory()), "training_overhead_bytes": int(mx.get_peak_memory() - base),
           "hinge_active_frac": res.summary["hinge_active_frac"],
           "history": [{k: h[k] for k in ("epoch", "loss", "sft", "kl_agg", "barrier", "grad_norm", "tok_s")} for h in res.history]}
    return out, model, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8, help="timed micro-steps per trainer (after 2 warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--heal-epochs", type=int, default=2, help="epochs of the λ comparison (part 2)")
    ap.add_argument("--skip-lambda", action="store_true", help="only part 1")
    ap.add_argument("--out", default="bench/results/heal.json")
    a = ap.parse_args()

    n = a.steps * a.batch_size
    recs = records(n)
    # Barrier on and active at every step (λ 0.3, rmse, τ 0 so the hinge never cuts the KL gradient).
    # Epoch 1 traces the compiled step per shape; epoch 2 is timed.
    speed_cfg = H.HealConfig(epochs=2, batch_size=a.batch_size, val_frac=0.0, tau=0.0)
    print(f"[1] throughput: {a.model}, {n} examples, micro-batch {a.batch_size}, rank {speed_cfg.rank}, scale {speed_cfg.scale}, backend {backend.backend_label()}")
    ref = run_mlx_lm(a.model, recs, a.steps, a.batch_size, speed_cfg)
    print(f"    mlx-lm trainer: {ref['tok_s']:.1f} tok/s wall, {ref['tok_per_cpu_s']:.1f} tok per CPU-s, peak {ref['peak_memory_bytes'] / 2**20:.0f} MiB")
    ours, _, _ = run_heal(a.model, recs, speed_cfg, timed_from_epoch=1)
    print(f"    mlxgate heal:   {ours['tok_s']:.1f} tok/s wall ({ours['tok_s_all_steps']:.1f} counting the first epoch's traces), "
          f"{ours['tok_per_cpu_s']:.1f} tok per CPU-s, peak {ours['peak_memory_bytes'] / 2**20:.0f} MiB, hinge active {ours['hinge_active_frac']:.0%}")
    ratio_speed = ours["tok_s"] / ref["tok_s"]
    ratio_cpu = ours["tok_per_cpu_s"] / ref["tok_per_cpu_s"]
    ratio_mem = ours["peak_memory_bytes"] / ref["peak_memory_bytes"]
    ratio_overhead = ours["training_overhead_bytes"] / max(ref["training_overhead_bytes"], 1)
    print(f"    ratios: tokens/s {ratio_speed:.2f}x wall, {ratio_cpu:.2f}x per CPU-second (target >= 0.6; CPU time is the "
          f"stable one on a shared machine), peak memory {ratio_mem:.2f}x (target <= 1.3), "
          f"memory above the weights {ratio_overhead:.2f}x")

    print(f"[2] heal {a.model}: λ = 0 vs λ = 30 (τ 0, rmse), {a.heal_epochs} epochs on 12 examples")
    lam_runs = {}
    for lam in () if a.skip_lambda else (0.0, 30.0):
        cfg = H.HealConfig(epochs=a.heal_epochs, batch_size=2, lr=5e-4, lam=lam, tau=0.0, val_frac=0.0)
        t = time.perf_counter()
        run, model, res = run_heal(a.model, records(12), cfg)
        switch = next(m for _, m in lora.stacked_layers(model)).switch
        model_ex, _ = H.make_examples(load(a.model)[1], records(12))
        final = H.evaluate(model, switch, model_ex, cfg)
        hist = run["history"]
        k = max(1, len(hist) // 4)
        first, last = sum(h["sft"] for h in hist[:k]) / k, sum(h["sft"] for h in hist[-k:]) / k
        lam_runs[str(lam)] = {"sft_first_quarter": first, "sft_last_quarter": last, "final": final,
                              "seconds": time.perf_counter() - t, "hinge_active_frac": run["hinge_active_frac"]}
        print(f"    λ={lam:g}: SFT {first:.3f} -> {last:.3f} nats/token, final KL rmse {final['kl_rmse']:.4f} "
              f"mean {final['kl_mean']:.4f} nats ({lam_runs[str(lam)]['seconds']:.0f} s)")
        del model, res
        gc.collect()
        mx.clear_cache()
    if lam_runs:
        kl0, kl30 = lam_runs["0.0"]["final"]["kl_rmse"], lam_runs["30.0"]["final"]["kl_rmse"]
        print(f"    loss decreased: {all(v['sft_last_quarter'] < v['sft_first_quarter'] for v in lam_runs.values())}; "
              f"KL(λ=30) < KL(λ=0): {kl30 < kl0} ({kl30:.4f} vs {kl0:.4f})")

    result = {
        "model": a.model, "backend": backend.backend_label(), "batch_size": a.batch_size, "timed_steps": a.steps,
        "mlx_lm": ref, "heal": ours,
        "ratio_tokens_per_s": ratio_speed, "ratio_tokens_per_cpu_s": ratio_cpu, "ratio_peak_memory": ratio_mem, "ratio_memory_above_weights": ratio_overhead,
        "targets": {"tokens_per_s": 0.6, "peak_memory": 1.3},
        "lambda_comparison": lam_runs,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    from mlxgate.io import write_json

    write_json(a.out, result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
