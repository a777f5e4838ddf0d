"""CLI commands of the analysis issue: ``compare``, ``spectrum`` and ``dashboard``.

Registered in ``mlxgate.cli._register_optional``. Bad input raises UserError (one line, exit 2).
"""

from __future__ import annotations

import json

import click

from mlxgate.errors import UserError

from mlxgate.cli_common import DTYPES, MODEL_HELP, emit as _emit


def _read_text_option(text: str | None, text_file: str | None) -> str | None:
    if text is not None and text_file is not None:
        raise UserError("give --text or --text-file, not both")
    if text_file is None:
        return text
    try:
        with open(text_file, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {text_file}: {err}") from None


def _gather_prompts(prompt_list, prompts_file) -> list[str]:
    from mlxgate.measure import load_prompts_file

    prompts = list(prompt_list)
    if prompts_file:
        prompts += load_prompts_file(prompts_file)
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt; every --prompt needs some text")
    return prompts


# ----------------------------------------------------------------------------- compare


@click.command()
@click.option("--model", "-m", "model_a", default="smollm2-135m-instruct", show_default=True, help="model A (P in KL(P‖Q)): " + MODEL_HELP)
@click.option("--model-b", "model_b", help="model B (Q): same tokenizer as A")
@click.option("--adapter", "adapter_dir", type=click.Path(), help="B = A with this mlx-lm LoRA adapter directory")
@click.option("--text", help="compare on this text, teacher-forced, at every position")
@click.option("--text-file", type=click.Path(dir_okay=False), help="like --text, read from a file")
@click.option("--prompt", "-p", "prompt_list", multiple=True, help="a prompt A completes greedily (repeatable); default: the built-in probe set")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help=".txt (one prompt per line) or .jsonl (field 'prompt')")
@click.option("--max-tokens", default=128, show_default=True, type=int, help="new tokens A generates per prompt")
@click.option("--raw", is_flag=True, help="no chat template: prompts are plain text")
@click.option("--batch-size", default=8, show_default=True, type=int, help="prompts A decodes together")
@click.option("--threshold", "tau", type=float, default=None, help="τ (nats): flag the aggregates above it (the heal barrier's hinge)")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="write the output here (atomically) instead of stdout")
@click.option("--plot", type=click.Path(dir_okay=False), help="PNG of KL per position")
@click.option("--dtype", type=DTYPES, default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
def compare(model_a, model_b, adapter_dir, text, text_file, prompt_list, prompts_file, max_tokens, raw, batch_size, tau, fmt, out, plot, dtype):
    """KL(A‖B) per position on the same tokens (nats), with mean / rmse / p95 / max.

    On a given text (--text/--text-file): every position, teacher-forced. Otherwise A completes
    each prompt greedily and both models are scored teacher-forced on A's tokens: the positions
    are A's generated tokens. Aggregates per prompt and pooled over all positions; rmse is
    sqrt(mean KL²). With --adapter both A and A+adapter are held in memory.
    """
    from mlxgate import compare as C
    from mlxgate.models import load

    if (model_b is None) == (adapter_dir is None):
        raise UserError("give exactly one of --model-b B or --adapter DIR")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if tau is not None and not tau >= 0:
        raise UserError("--threshold must be a number >= 0 (nats)")
    text = _read_text_option(text, text_file)
    prompts = _gather_prompts(prompt_list, prompts_file)
    if text is not None and prompts:
        raise UserError("--text compares on a given text; do not combine it with --prompt/--prompts")

    lm_a, tok_a, info_a = load(model_a, dtype=dtype)
    if adapter_dir is not None:
        from mlxgate.spectrum import load_adapted

        lm_b, tok_b, info_b = load_adapted(model_a, adapter_dir, dtype=dtype)
        label_b = f"{model_a} + {adapter_dir}"
    else:
        lm_b, tok_b, info_b = load(model_b, dtype=dtype)
        label_b = model_b
    C.check_same_vocab(info_a, info_b, tok_a, tok_b, warn=lambda msg: click.echo(f"mlxgate: warning: {msg}", err=True))

    if text is not None:
        report = C.compare_text(lm_a, lm_b, tok_a, text, threshold=tau)
    else:
        report = C.compare_generations(lm_a, lm_b, tok_a, prompts or _probe_prompts(), max_tokens, raw=raw, batch_size=batch_size, threshold=tau)
    report = {"model_a": model_a, "model_b": label_b, **report, "models": {"a": info_a.to_dict(), "b": info_b.to_dict()}}
    _emit(C.format_table(report) if fmt == "table" else json.dumps(report, indent=2), out)
    if plot:
        from mlxgate.plots_analysis import kl_per_position

        kl_per_position(report, plot, title=f"KL(A‖B) per position: A = {model_a}, B = {label_b}")
        click.echo(f"wrote {plot}", err=True)


def _probe_prompts() -> list[str]:
    from mlxgate.measure import PROBE_PROMPTS

    return list(PROBE_PROMPTS)


# ----------------------------------------------------------------------------- spectrum


@click.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help=MODEL_HELP)
@click.option("--adapter", "adapter_dir", type=click.Path(), help="mlx-lm LoRA adapter directory: ΔW spectra, and hidden states of the adapted model")
@click.option("--prompt", "-p", "prompt_list", multiple=True, help="a probe prompt (repeatable); default: the built-in probe set")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help=".txt (one prompt per line) or .jsonl (field 'prompt')")
@click.option("--raw", is_flag=True, help="no chat template: probes are plain text")
@click.option("--healthy-entropy", default=0.5, show_default=True, type=float, help="HEALTHY needs Hs above this")
@click.option("--healthy-dominant", default=0.4, show_default=True, type=float, help="HEALTHY needs dominant ratio below this")
@click.option("--drifting-entropy", default=0.35, show_default=True, type=float, help="DRIFTING needs Hs above this")
@click.option("--drifting-dominant", default=0.6, show_default=True, type=float, help="DRIFTING needs dominant ratio below this")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="write the output here (atomically) instead of stdout")
@click.option("--plot", type=click.Path(dir_okay=False), help="PNG of the metrics by layer")
@click.option("--dtype", type=DTYPES, default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
def spectrum(model, adapter_dir, prompt_list, prompts_file, raw, healthy_entropy, healthy_dominant, drifting_entropy, drifting_dominant, fmt, out, plot, dtype):
    """Hidden-state spectrum per layer on a probe set, and LoRA ΔW spectra (SPEC §3.5).

    Per layer (block output over all probe tokens, centered): normalised spectral entropy Hs,
    effective rank, dominant ratio λ1/Σλ, φ-proximity and status HEALTHY / DRIFTING / WARNING.
    With --adapter: σ_max and spectral entropy of each ΔW = scale·B·A.
    """
    from mlxgate import spectrum as S
    from mlxgate.analysis.spectral import SpectralThresholds
    from mlxgate.models import load

    thresholds = SpectralThresholds(healthy_entropy, healthy_dominant, drifting_entropy, drifting_dominant)
    prompts = _gather_prompts(prompt_list, prompts_file) or _probe_prompts()
    if adapter_dir:
        lm, tok, info = S.load_adapted(model, adapter_dir, dtype=dtype)
    else:
        lm, tok, info = load(model, dtype=dtype)
    report = {"model": info.to_dict(), **S.spectrum_report(lm, tok, prompts, raw=raw, adapter_dir=adapter_dir, thresholds=thresholds)}
    _emit(S.format_table(report) if fmt == "table" else json.dumps(report, indent=2), out)
    if plot:
        from mlxgate.plots_analysis import spectrum_by_layer

        spectrum_by_layer(report, plot, title=f"hidden-state spectrum by layer: {info.name}")
        click.echo(f"wrote {plot}", err=True)


# ----------------------------------------------------------------------------- dashboard


@click.command()
@click.option("--model", "-m", "model", default=None, help="generate with this model and watch it token by token: " + MODEL_HELP)
@click.option("--run", "run_dir", type=click.Path(), default=None, help="follow a loop run: DIR/events.jsonl (or the file itself)")
@click.option("--prompt", "-p", "prompt_list", multiple=True, help="a prompt (repeatable); default: the built-in probe set")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), help=".txt (one prompt per line) or .jsonl (field 'prompt')")
@click.option("--max-tokens", default=128, show_default=True, type=int, help="new tokens per prompt (greedy)")
@click.option("--raw", is_flag=True, help="no chat template: prompts are plain text")
@click.option("--zones", type=click.Choice(["iris", "phasegpt", "cer"]), default="iris", show_default=True, help="zone scheme (SPEC §3.2)")
@click.option("--spectrum-every", default=16, show_default=True, type=int, help="per-layer spectra of the text so far every N tokens (0: off)")
@click.option("--interval", default=0.5, show_default=True, type=float, help="--run: seconds between looks at events.jsonl")
@click.option("--fps", default=8.0, show_default=True, type=float, help="most frames drawn per second")
@click.option("--once", is_flag=True, help="render one frame to stdout and exit (--model: after all prompts are done)")
@click.option("--width", type=int, default=None, help="--once: frame width (default: the terminal's, or 80)")
@click.option("--height", type=int, default=None, help="--once: frame height (default: the terminal's, or 24)")
@click.option("--dtype", type=DTYPES, default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
def dashboard(model, run_dir, prompt_list, prompts_file, max_tokens, raw, zones, spectrum_every, interval, fps, once, width, height, dtype):
    """Live terminal dashboard of a generation (--model) or of a loop run (--run DIR).

    --model: text coloured by zone, H_t now / rolling / sparkline (nats), zone histogram, token
    loop and basin, per-layer spectral entropy and dominant ratio, tokens/s, memory.
    --run: the latest value of each field of events.jsonl and a small history, as it is appended.
    Press q (or Ctrl-C) to quit. When stdout is not a terminal it behaves as --once.
    """
    from mlxgate import dashboard as D

    if (model is None) == (run_dir is None):
        raise UserError("give exactly one of --model M or --run DIR")
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if spectrum_every < 0:
        raise UserError("--spectrum-every must be 0 (off) or a positive number of tokens")
    if not interval > 0 or not fps > 0:
        raise UserError("--interval and --fps must be positive")
    if (width is not None and width < 40) or (height is not None and height < 12):
        raise UserError("--width must be at least 40 and --height at least 12")
    try:
        if run_dir is not None:
            if prompt_list or prompts_file:
                raise UserError("--prompt/--prompts go with --model, not --run")
            D.run_dashboard(run_dir, interval, fps, once, width, height)
        else:
            prompts = _gather_prompts(prompt_list, prompts_file) or _probe_prompts()
            D.model_dashboard(model, prompts, max_tokens, raw, zones, spectrum_every, fps, once, width, height, dtype)
    except KeyboardInterrupt:
        pass  # Ctrl-C is the other way out: the terminal is restored by then, exit 0
