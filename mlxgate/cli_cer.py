"""``mlxgate cer mirror`` and ``mlxgate cer train``: thin click layer over :mod:`mlxgate.cer`."""

from __future__ import annotations

import functools
import io
import json
import sys

import click

from mlxgate.errors import UserError


def parse_seeds(text: str) -> list[int]:
    """'0-9' -> [0..9]; '1,3,5-7' -> [1, 3, 5, 6, 7]. Raises UserError on anything else."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                lo_i, hi_i = int(lo), int(hi)
                if hi_i < lo_i:
                    raise ValueError
                seeds.extend(range(lo_i, hi_i + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"--seeds {text!r}: use a range like 0-9 or a list like 0,3,5-7 of non-negative integers") from None
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"--seeds {text!r}: use a range like 0-9 or a list like 0,3,5-7 of non-negative integers")
    return seeds


def _user_errors(fn):
    """Standalone use: UserError -> one line on stderr, exit 2 (the main CLI does the same)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group("cer")
def cer_group() -> None:
    """Coherent Entropy Reactor: mirror test and training (SPEC §6)."""


def _fmt(stat: dict) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _table(summary: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"CER mirror test: seeds {summary['seeds'][0]}..{summary['seeds'][-1]} "
                    f"(n={len(summary['seeds'])}), dropout {'on' if summary['dropout'] else 'off'}; "
                    "entropies in nats, mean ± population std over seeds")
    for col in ("condition", "input H", "first step H", "last step H", "output H", "B/E/none",
                "published last H", "published B/E/none", "final H", "actions"):
        t.add_column(col)
    for name, row in summary["conditions"].items():
        a, pub, v = row["actions"], row["published"], row["verdict"]
        t.add_row(
            name, _fmt(row["input_entropy"]), _fmt(row["first_step_entropy"]), _fmt(row["last_step_entropy"]),
            _fmt(row["output_entropy"]), f"{a['BRAKE']}/{a['ESCAPE']}/{a['none']}",
            f"{pub['final_mean']:.2f} ± {pub['final_std']:.2f}", f"{pub['BRAKE']}/{pub['ESCAPE']}/{pub['none']}",
            "agrees" if v["final_agrees"] else "DIFFERS",
            ("agrees" if v["actions_agree"] else "DIFFERS") + ("" if v["actions_exact"] else " (counts not exact)"),
        )
    buf = io.StringIO()
    console = Console(width=200, file=buf)
    console.print(t)
    for name, row in summary["conditions"].items():
        if row["verdict"]["actions_exact"]:
            continue
        steps = "; ".join(
            f"seed {s['seed']} block {s['layer']} step {s['step']}: {s['action']} at H = {s['entropy']:.3f}"
            for s in row["non_brake_steps"]
        ) or "every step BRAKE"
        console.print(f"{name} counts differ from the published ones; steps without BRAKE: {steps}", soft_wrap=True)
    if any(not row["verdict"]["actions_exact"] for row in summary["conditions"].values()):
        from mlxgate.cer.model import HYSTERESIS_MARGIN, TARGET_ENTROPY

        console.print(
            f"(no control fires while {TARGET_ENTROPY:g} <= H <= {TARGET_ENTROPY + HYSTERESIS_MARGIN:g} nats; ESCAPE below, "
            "BRAKE above. A step landing in that band is 'none'. The seeds' random draws differ from the original's "
            "torch RNG, so single steps near the band's edge differ by chance.)",
            soft_wrap=True,
        )
    return buf.getvalue()


@cer_group.command("mirror")
@click.option("--seeds", default="0-9", show_default=True, help="Seeds: a range 0-9 or a list 0,3,5-7.")
@click.option("--dropout/--no-dropout", default=True, show_default=True,
              help="Run in train mode (dropout active, as the original) or eval mode.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write entropy per step per condition (PNG).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the JSON summary here.")
@_user_errors
def mirror_cmd(seeds: str, dropout: bool, fmt: str, plot_path: str | None, json_out: str | None) -> None:
    """PEAKED / UNIFORM / RANDOM inputs [4, 16, 128] through a fresh reactor per seed."""
    from mlxgate.cer import mirror
    from mlxgate.io import write_json

    seed_list = parse_seeds(seeds)
    if plot_path and not plot_path.lower().endswith(".png"):
        raise UserError(f"--plot {plot_path!r}: give a file name ending in .png")
    runs = mirror.run_mirror(seed_list, dropout=dropout)
    summary = mirror.summarize(runs, seed_list, dropout)
    if plot_path:
        mirror.plot(summary, plot_path)
    if json_out:
        write_json(json_out, summary)
    if fmt == "json":
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(_table(summary), nl=False)


@cer_group.command("train")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Directory for train_log.json and cer.safetensors.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--seq", type=click.IntRange(min=3), default=16, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option("--entropy-weight", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Weight of mean_steps (H_state - target)^2.")
@click.option("--mass-weight", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Weight of 1 / (semantic mass + 1e-6).")
@click.option("--target", type=float, default=3.0, show_default=True, help="Target state entropy (nats).")
@click.option("--control-grad", type=click.Choice(["stop", "pass", "detach"]), default="stop", show_default=True,
              help="stop: control coefficients are constants (default); pass: differentiable; "
                   "detach: cut z from the graph when a control fires (the original's no_grad).")
@click.option("--dropout/--no-dropout", default=True, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_user_errors
def train_cmd(out_dir, steps, batch, seq, lr, entropy_weight, mass_weight, target, control_grad, dropout, seed,
              eval_every, progress) -> None:
    """Train a reactor on the bundled Markov masked-symbol task with live entropy and mass terms."""
    from mlxgate.cer.model import CERConfig
    from mlxgate.cer.train import TrainConfig, train

    tc = TrainConfig(steps=steps, batch=batch, seq=seq, lr=lr, entropy_weight=entropy_weight,
                     mass_weight=mass_weight, seed=seed, eval_every=eval_every)
    rc = CERConfig(target_entropy=target, control_grad=control_grad, dropout=0.1 if dropout else 0.0)
    log, _ = train(tc, rc, out_dir=out_dir, progress=progress)
    u, f = log["untrained"], log["final"]
    click.echo(f"masked CE {u['ce']:.3f} -> {f['ce']:.3f} nats (Bayes floor {f['bayes_ce']:.3f}); "
               f"state H {u['state_entropy_mean']:.3f} -> {f['state_entropy_mean']:.3f} nats "
               f"(target {target:g}); {log['seconds']:.1f} s")
    click.echo(f"wrote {out_dir}/train_log.json and {out_dir}/cer.safetensors")
