"""``mlxgate heal`` and ``mlxgate bake``: thin click layers over :mod:`mlxgate.heal` and :mod:`mlxgate.bake`."""

from __future__ import annotations

import click

from mlxgate.errors import UserError

from mlxgate.cli_common import MODEL_HELP


@click.command("heal")
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help=MODEL_HELP)
@click.option("--data", required=True, type=click.Path(dir_okay=False), help='kept.jsonl: {"prompt", "completion"} per line (optional "prompt_ids", "completion_ids", "finish")')
@click.option("--out", required=True, type=click.Path(file_okay=False), help="adapter directory (mlx-lm format), written atomically")
@click.option("--adapters-in", "adapters_in", multiple=True, type=click.Path(file_okay=False), help="earlier rounds' adapter directories, oldest first (repeatable); kept frozen in the stack")
@click.option("--agg", type=click.Choice(["mean", "rmse", "p95", "max"]), default="rmse", show_default=True, help="aggregate of per-position KL under the hinge")
@click.option("--tau", default=0.5, show_default=True, type=float, help="hinge threshold τ (nats)")
@click.option("--lam", default=0.3, show_default=True, type=float, help="barrier weight λ (λ_r = λ·(1+r)^pow)")
@click.option("--lam-pow", default=0.0, show_default=True, type=float)
@click.option("--round", "round_", default=None, type=int, help="round index r (default: number of --adapters-in)")
@click.option("--ref", type=click.Choice(["prev", "base"]), default="prev", show_default=True, help="reference: earlier rounds on (prev) or all adapters off (base)")
@click.option("--kl", "kl_dir", type=click.Choice(["rev", "fwd"]), default="rev", show_default=True, help="rev = KL(student‖ref), fwd = KL(ref‖student)")
@click.option("--objective", type=click.Choice(["sft", "sft-entropy"]), default="sft", show_default=True, help="sft-entropy adds −λ_H·H (IRIS Gate's CE − λH)")
@click.option("--entropy-lam", default=0.0, show_default=True, type=float, help="λ_H for --objective sft-entropy")
@click.option("--spectral-lam", default=0.01, show_default=True, type=float, help="weight of mean σ_max(ΔW)")
@click.option("--epochs", default=6, show_default=True, type=int)
@click.option("--lr", default=1e-4, show_default=True, type=float)
@click.option("--rank", default=32, show_default=True, type=int)
@click.option("--alpha", default=64.0, show_default=True, type=float, help="LoRA alpha; mlx-lm scale = alpha / rank")
@click.option("--batch-size", default=4, show_default=True, type=int, help="micro-batch size")
@click.option("--grad-accum", default=1, show_default=True, type=int, help="micro-batches per optimizer step")
@click.option("--max-seq-len", default=2048, show_default=True, type=int, help="longer examples are dropped")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
@click.option("--compile/--no-compile", "compile_", default=None, help="mx.compile the training step (default: on, as in the library: fuses the vocabulary-sized intermediates, ~3x less memory; each new sequence-length bucket is traced once)")
def heal_cmd(model, data, out, adapters_in, agg, tau, lam, lam_pow, round_, ref, kl_dir, objective, entropy_lam, spectral_lam, epochs, lr, rank, alpha, batch_size, grad_accum, max_seq_len, seed, dtype, compile_):
    """Train one heal round: LoRA on blocks [0.2n, 0.8n) with SFT + λ·relu(agg KL − τ) + 0.01·σ_max.

    Loss only on completion tokens; the reference is the same weights with this round (or every
    round) switched off. Writes adapters.safetensors + adapter_config.json (mlx-lm's format) and
    heal.json (settings, per-step history with the aggregate KL, hinge-active fraction).
    """
    from mlxgate import heal as H
    from mlxgate.models import load

    cfg = H.HealConfig(
        lam=lam, lam_pow=lam_pow, round=round_, tau=tau, agg=agg, ref=ref, kl=kl_dir, objective=objective,
        entropy_lam=entropy_lam, spectral_lam=spectral_lam, lr=lr, epochs=epochs, rank=rank, alpha=alpha,
        batch_size=batch_size, grad_accum=grad_accum, max_seq_len=max_seq_len, seed=seed,
        **({} if compile_ is None else {"compile": compile_}),  # one default: HealConfig's
    )
    cfg.validate()
    records = H.read_records(data)
    lm, tokenizer, info = load(model, dtype=dtype)
    examples, dropped = H.make_examples(tokenizer, records, max_seq_len)
    if not examples:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.items() if v)
        raise UserError(f"all {len(records)} completions in {data} were dropped ({reasons}); nothing to train on")
    # Ids from another model's tokenizer would train on the wrong rows of the embedding, silently.
    from mlxgate.filter import check_vocab

    check_vocab([{"prompt_ids": e.prompt_ids, "completion_ids": e.completion_ids} for e in examples], info.vocab_size, data)
    result = _heal_with_progress(H, lm, tokenizer, examples, cfg, adapters_in, out, info)
    s = result.summary
    if not _main():
        from mlxgate import distributed

        distributed.log(f"healed its shard of {s['steps']} steps: loss {s['final_loss']:.4f}, {cfg.agg} KL {s['final_kl_agg']:.4f} nats; rank 0 writes {out}")
        return
    click.echo(
        f"healed {s['n_train']} examples ({s['n_val']} val), {s['steps']} steps: loss {s['final_loss']:.4f}, "
        f"{cfg.agg} KL {s['final_kl_agg']:.4f} nats, hinge active on {100 * s['hinge_active_frac']:.1f}% of steps, "
        f"{s['tok_s']:.0f} tok/s; wrote {out}",
        err=True,
    )
    if result.val:
        v = result.val[-1]
        click.echo(f"validation: SFT {v['sft']:.4f} nats/token, KL mean {v['kl_mean']:.4f} rmse {v['kl_rmse']:.4f} max {v['kl_max']:.4f}", err=True)


def _main() -> bool:
    from mlxgate import distributed

    return distributed.is_main()


def _heal_with_progress(H, lm, tokenizer, examples, cfg, adapters_in, out, info):

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    total = H.total_steps(len(examples), cfg)
    extra = {"model": info.name, "model_path": info.path, "adapters_in": [str(a) for a in adapters_in]}
    console = Console(stderr=True)
    fields = dict(loss=0.0, sft=0.0, kl=0.0, barrier=0.0, gnorm=0.0, tok_s=0.0)
    text = (
        "loss {task.fields[loss]:.3f} sft {task.fields[sft]:.3f} KL {task.fields[kl]:.3f} "
        "barrier {task.fields[barrier]:.3f} |g| {task.fields[gnorm]:.2f} {task.fields[tok_s]:.0f} tok/s"
    )
    with Progress(TextColumn("heal"), BarColumn(), MofNCompleteColumn(), TextColumn(text), TimeElapsedColumn(), console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("heal", total=total, **fields)

        def on_step(rec):
            gnorm = rec["grad_norm"] if rec["grad_norm"] is not None else bar.tasks[task].fields["gnorm"]
            bar.update(task, advance=1, loss=rec["loss"], sft=rec["sft"], kl=rec["kl_agg"], barrier=rec["barrier"], gnorm=gnorm, tok_s=rec["tok_s"])

        result = H.heal(lm, tokenizer, examples, cfg, prev_adapters=adapters_in, on_step=on_step)
    from mlxgate import distributed

    extra["n_ranks"] = distributed.size()
    if distributed.is_main():  # under mlx.launch every rank holds the same weights; rank 0 writes
        result.adapter_dir = H.save_adapter(out, result, extra)
    return result


@click.command("bake")
@click.option("--model", "-m", required=True, help=MODEL_HELP)
@click.option("--adapters", "adapters", multiple=True, required=True, type=click.Path(file_okay=False), help="adapter directories (mlx-lm format), oldest first (repeatable)")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="output checkpoint directory (HF layout), written atomically")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="dtype of the saved weights (default: the source's)")
def bake_cmd(model, adapters, out, dtype):
    """Fold a stack of LoRA rounds into the weights: W + Σ scale·(A B)ᵀ, saved as a checkpoint."""
    from mlxgate.bake import bake

    path = bake(model, adapters, out, dtype=dtype)
    click.echo(f"baked {len(adapters)} adapter(s) into {path}", err=True)
