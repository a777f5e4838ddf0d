"""``mlxgate eval``: evaluations of a (possibly adapted, possibly steered) model.

- ``tinymfv``: moral-foundation vignettes, word readout after a fixed greedy think budget
  (SPEC §5.6): per-row p over the 7 foundations, ``<F>_nats``, coherence, top-1 agreement.
Bad input is a UserError (one line, exit 2).
"""

from __future__ import annotations

import sys

import click

from mlxgate import io as IO
from mlxgate.errors import UserError

from mlxgate.cli_common import MODEL_HELP, emit


@click.group("eval")
def eval_group():
    """Evaluations: tinymfv (moral foundations: trait and coherence)."""


def _apply_adapters(model, adapter_dirs) -> int:
    """Fold the LoRA rounds (mlx-lm adapter dirs, oldest first) into the weights in memory."""
    from mlxgate import lora
    from mlxgate.bake import fold

    rounds = [lora.read_adapter(d)[1] for d in adapter_dirs]
    return fold(model, rounds)


def _table(result: dict, title: str) -> str:
    from rich.console import Console
    from rich.table import Table

    from mlxgate.tinymfv import NATS_KEYS, OPTIONS

    agg, st = result["aggregates"], result["settings"]
    short = {o: o[:4] for o in OPTIONS}
    rows = Table(title=title, show_lines=False)
    for col in ("id", "foundation", "human", "model", "pmass", *(short[o] for o in OPTIONS)):
        rows.add_column(col, justify="left" if col in ("id", "foundation", "human", "model") else "right", no_wrap=True)
    for r in result["rows"]:
        mark = "" if r["agree"] is None else (" ✓" if r["agree"] else " ✗")
        rows.add_row(
            r["id"], str(r["foundation"]), "/".join(r["human_top"]) or "-", r["model_top"] + mark, f"{r['pmass']:.3f}",
            *(f"{r['p'][o]:.3f}" for o in OPTIONS),
        )
    summary = Table(title="aggregates (p = softmax over the 7 frame-averaged option log-probs)", show_header=True)
    for col in ("foundation", "mean p", "<F>_nats = ln mean p"):
        summary.add_column(col, justify="left" if col == "foundation" else "right")
    for o in OPTIONS:
        summary.add_row(o, f"{agg['mean_p'][o]:.4f}", f"{NATS_KEYS[o]} = {agg[NATS_KEYS[o]]:.3f}")
    console = Console(record=True, width=140, file=open("/dev/null", "w") if sys.platform != "win32" else None)
    console.print(rows)
    console.print(summary)
    top1 = "-" if agg["top1_agreement"] is None else f"{agg['top1_agreement']:.3f}"
    tokens = ", ".join(f"{o}→{v['token']!r}" for o, v in st["option_tokens"].items())
    console.print(
        f"coherence (mean pmass) {agg['coherence']:.4f}   auth_nats {agg['auth_nats']:.3f}   care_nats {agg['care_nats']:.3f}   "
        f"top-1 agreement {top1} over {agg['n_labelled']} rows\n"
        f"condition {st['condition']}, {st['n_rows']} rows × frames A/B, think {st['think_tokens']} tokens ({st['think_decoding']}), "
        f"readout: {st['readout']} ({tokens}), steer {st['steer']}, {st['seconds']:.1f} s"
    )
    if st["shared_first_tokens"]:
        console.print(f"warning: options sharing a first token (equal scores): {st['shared_first_tokens']}")
    return console.export_text()


@eval_group.command("tinymfv")
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help=MODEL_HELP)
@click.option("--adapters", "adapters", multiple=True, type=click.Path(file_okay=False), help="LoRA adapter directory (mlx-lm format), oldest first (repeatable); folded into the weights in memory")
@click.option("--vector", default=None, type=click.Path(dir_okay=False), help="steering vector (.safetensors from `mlxgate steer extract`), applied during the whole evaluation")
@click.option("--coeff", default=None, help="steering coefficient C (adds C·v_L); needs --vector [default with --vector: 1.0]")
@click.option("--allow-other-model", is_flag=True, help="accept a vector extracted from another model of the same shape")
@click.option("--condition", default="other_violate", show_default=True, help="vignette set: other_violate (scored in SPEC §5.6) or self_violate")
@click.option("--limit", type=int, default=None, help="score N vignettes spread evenly over the 132 (all foundations covered)")
@click.option("--think-tokens", type=int, default=128, show_default=True, help="greedy think budget before 'Just answer' (end-of-turn suppressed)")
@click.option("--batch-size", type=int, default=8, show_default=True, help="frames decoded together (left-padded)")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="write the output here (atomically) instead of stdout")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
def tinymfv(model, adapters, vector, coeff, allow_other_model, condition, limit, think_tokens, batch_size, fmt, out, dtype):
    """Which moral foundation each vignette violates, as log-probs (SPEC §5.6).

    Per vignette, frames A (options in SPEC order) and B (reversed): the model thinks greedily for
    --think-tokens, the user says "Just answer", and the answer is prefilled with
    'This is wrong because {"violation": "'; the log-probs of the first token of each option word
    are read at the next position. Reports p per row, <F>_nats = ln(mean p[F]) (auth_nats, care_nats, ...),
    coherence = mean probability mass on the options, and top-1 agreement with the human majority.
    """
    from mlxgate import tinymfv as T
    from mlxgate.models import load

    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1; got {limit}")
    if think_tokens < 0:
        raise UserError(f"--think-tokens must be 0 or more; got {think_tokens}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}")
    if coeff is not None and vector is None:
        raise UserError("--coeff needs --vector (the steering vector it scales)")
    rows = T.load_rows(condition, limit)  # validates the condition before the model loads
    steer_coeff = None
    if vector is not None:
        from mlxgate.steer.control import parse_coeff

        steer_coeff = 1.0 if coeff is None else parse_coeff(coeff)
    lm, tokenizer, info = load(model, dtype=dtype)
    steer = None
    if vector is not None:
        from mlxgate.steer import extract as E

        sv = E.load(vector)
        E.check_compatible(sv, info, allow_other_model)
        steer = {"vectors": sv.as_mx(), "coeff": steer_coeff}
    n_adapted = _apply_adapters(lm, adapters) if adapters else 0

    result = _run_with_progress(T, lm, tokenizer, rows, think_tokens, batch_size, condition, steer)
    result["settings"].update(
        model=info.to_dict(), adapters=list(adapters), adapted_modules=n_adapted, vector=vector, limit=limit,
    )
    if fmt == "json":
        text = IO.dumps(result, indent=2)  # ln 0 = -inf aggregates become null, not -Infinity
    else:
        label = info.name + (f" + {len(adapters)} adapter(s)" if adapters else "") + (f" steered C={steer_coeff}" if steer else "")
        text = _table(result, f"tinymfv ({condition}): {label}")
    emit(text, out)  # under mlx.launch only rank 0 prints or writes the gathered result


def _run_with_progress(T, lm, tokenizer, rows, think_tokens, batch_size, condition, steer):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    kwargs = dict(rows=rows, think_tokens=think_tokens, batch_size=batch_size, condition=condition, steer=steer)
    console = Console(stderr=True)
    if not console.is_terminal:
        return T.evaluate_tinymfv(lm, tokenizer, **kwargs)
    with Progress(TextColumn("tinymfv"), BarColumn(), MofNCompleteColumn(), TextColumn("frames"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("frames", total=2 * len(rows))
        return T.evaluate_tinymfv(lm, tokenizer, **kwargs, on_progress=lambda done, total: bar.update(task, completed=done))
