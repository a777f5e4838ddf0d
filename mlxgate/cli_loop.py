"""``mlxgate loop``: the click layer over :func:`mlxgate.loop.run_loop`.

Every setting of :class:`mlxgate.loop.LoopConfig` is a flag; ``--preset`` fills the ones not given.
With ``--resume DIR`` the settings come from DIR/config.json and a flag that disagrees is an error.
"""

from __future__ import annotations

import dataclasses
import sys

import click
from click.core import ParameterSource

from mlxgate.errors import UserError

HELP = {
    "model": "model to loop on (alias, local dir, .gguf or hub id); no model cached? try --model smollm2-135m-instruct",
    "rounds": "loop rounds", "seed": "random seed (generation, heal init and shuffles)",
    "dtype": "compute dtype (default: float32 on CPU, bfloat16 on GPU)",
    "n_contexts": "N contexts for extraction and generation (SPEC §5.1)", "contexts_file": "user messages, .txt or .jsonl (default: the shipped 295)",
    "pos": "persona the vector points towards", "neg": "persona it points away from", "layers": "steered blocks, e.g. 15,16,17 (default: middle band)",
    "max_tokens": "new tokens per steered completion", "gen_batch": "rows decoded together",
    "n_keep": "completions to keep per round", "min_kept": "fewer kept than this is an error", "max_batches": "collection batches at the settled κ",
    "probe_n": "completions per walk-C probe", "kappa_lo": "walk-C range low", "kappa_hi": "walk-C range high", "kappa": "fixed κ (skips walk-C)",
    "max_tail_ppl": "filter: max tail perplexity under base", "max_rep_frac": "filter: max rep_frac",
    "agg": "KL aggregate under the hinge", "tau": "hinge threshold τ (nats)", "lam": "barrier weight λ", "lam_pow": "λ_r = λ(1+r)^pow",
    "ref": "heal reference: prev (earlier rounds on) or base (all off)", "kl": "rev = KL(student‖ref), fwd swaps",
    "spectral_lam": "weight of mean σ_max(ΔW)", "epochs": "heal epochs", "lr": "heal learning rate", "rank": "LoRA rank", "alpha": "LoRA alpha (scale = alpha/rank)",
    "heal_batch": "heal micro-batch", "grad_accum": "micro-batches per optimizer step", "max_seq_len": "longer examples are dropped (tokens)",
    "eval_limit": "tinymfv vignettes (evenly spread; default all 132)", "think_tokens": "tinymfv greedy think budget (tokens)", "eval_batch": "tinymfv frames per batch",
    "steered_eval": "evaluate the steered model each round", "sample_n": "greedy sample answers per round", "coh_floor": "early stop when tinymfv coherence falls below",
    "export_baked": "also write a fused checkpoint of all rounds to DIR/baked (large)",
}
CHOICES = {"agg": ["mean", "rmse", "p95", "max"], "ref": ["prev", "base"], "kl": ["rev", "fwd"], "dtype": ["float32", "bfloat16", "float16"]}
SKIP = {"preset"}
FLOATS = {"kappa"}  # default None: the type is not readable from the default
INTS = {"eval_limit"}


def _setting_options(f):
    from mlxgate.loop import PRESETS, LoopConfig

    defaults = LoopConfig()
    for fld in reversed(dataclasses.fields(LoopConfig)):
        if fld.name in SKIP:
            continue
        name = "--" + fld.name.replace("_", "-")
        paper = getattr(defaults, fld.name)
        quick = PRESETS["quick"].get(fld.name, paper)
        shown = f" [paper: {paper}" + (f", quick: {quick}]" if quick != paper else "]")
        help_text = HELP.get(fld.name, "") + shown
        if isinstance(paper, bool):
            f = click.option(f"{name}/--no-{name[2:]}", fld.name, default=None, help=help_text)(f)
            continue
        if fld.name in CHOICES:
            typ = click.Choice(CHOICES[fld.name])
        elif fld.name in FLOATS or isinstance(paper, float):
            typ = float
        elif fld.name in INTS or isinstance(paper, int):
            typ = int
        else:
            typ = str
        f = click.option(name, fld.name, type=typ, default=None, help=help_text)(f)
    return f


@click.command("loop")
@click.option("--preset", default="paper", show_default=True, help="paper (published settings) or quick (CPU smoke run)")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None, help="run directory (default runs/<timestamp>_<model>_<agg>_s<seed>)")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False), default=None, help="continue the run in DIR (settings from its config.json)")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines on stderr")
@_setting_options
def loop_cmd(preset, run_dir, resume_dir, quiet, **settings):
    """Steer -> filter -> heal -> bake -> evaluate, round after round (SPEC §5.5).

    Each round extracts a steering vector from the current model (base + earlier rounds), settles
    the dose with walk-C, keeps the completions that pass the filter (scored under the base),
    heals a fresh LoRA on them under a KL barrier, stacks it, and evaluates on tinymfv. Stops early
    when coherence falls below --coh-floor. Resumable: a crash or Ctrl-C loses at most one round.
    """
    from mlxgate import distributed as D
    from mlxgate import loop as L

    ctx = click.get_current_context()
    explicit = {k: v for k, v in settings.items() if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    if resume_dir is not None:
        if run_dir is not None:
            raise UserError("give --resume DIR or --run-dir DIR, not both")
        preset_given = ctx.get_parameter_source("preset") == ParameterSource.COMMANDLINE

        def settings_of_run():
            if preset_given and preset != L.read_config(resume_dir)["settings"].get("preset"):
                raise UserError(f"--preset {preset} conflicts with the run's preset; a resumed run keeps its settings")
            return L.resume_config(resume_dir, explicit)

        # Under mlx.launch only rank 0 is sure to hold the run directory: it reads the settings.
        cfg = D.on_main(settings_of_run, what="reading the run's settings")
        run_dir = resume_dir
    else:
        cfg = L.make_config(preset, **explicit)

    def on_event(ev):
        if quiet:
            return
        stage = ev["stage"]
        if not D.is_main() and stage not in ("start", "resume", "round_done", "early_stop", "error", "done"):
            return  # the other ranks run the same stages: one line per round is enough
        if stage in ("heal", "eval", "steered_eval", "extract") and ev.get("progress") not in (None, 1.0):
            if stage != "heal" or ev.get("step", 0) % 10:
                return
        keep = ("auth_nats", "coherence", "kept", "dropped", "kappa", "pass_rate", "loss", "kl", "progress", "message", "seconds")
        parts = []
        for k in keep:
            v = ev.get(k)
            if v is None:
                continue
            if isinstance(v, dict):
                v = "{" + ", ".join(f"{a} {b:.3g}" for a, b in v.items() if isinstance(b, (int, float))) + "}"
            elif isinstance(v, float):
                v = f"{v:.4g}"
            parts.append(f"{k} {v}")
        click.echo(f"{D.prefix()}[round {ev['round']}] {stage}: " + ", ".join(parts), err=True)

    res = L.run_loop(cfg, run_dir=run_dir, resume=resume_dir is not None, on_event=on_event)
    if D.is_main():  # the run directory (stdout, for scripts) and its report live on rank 0
        click.echo(str(res.run_dir))
        click.echo(f"mlxgate: {res.stopped}; report: {res.run_dir / L.REPORT_FILE}", err=True)
    else:
        D.log(f"{res.stopped}; the run directory is on rank 0")


__all__ = ["loop_cmd"]

if __name__ == "__main__":  # pragma: no cover
    loop_cmd(sys.argv[1:])
