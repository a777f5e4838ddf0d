"""``mlxgate steer``: extract a steering vector, generate with it, filter, and collect heal data.

- ``extract``: persona-pair vector (SPEC §5.1) -> V.safetensors (+ V.safetensors.json metadata).
- ``generate``: steered completions at a fixed coefficient -> JSONL rows (the heal data format,
  unfiltered); ``--filter-dir`` also filters them (kept.jsonl / dropped.jsonl).
- ``filter``: the SPEC §5.3 + §5.8 filter over a generations JSONL -> kept.jsonl / dropped.jsonl.
- ``collect``: walk-C dose control then generation at the settled κ until n_keep pass (SPEC §5.2),
  filtered on the way -> kept.jsonl, dropped.jsonl, probes.jsonl, walk.json.
Bad input is a UserError (one line, exit 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlxgate.errors import UserError

from mlxgate.cli_common import MODEL_HELP

DTYPE = click.Choice(["float32", "bfloat16", "float16"])


@click.group()
def steer():
    """Steering vectors: extract, generate (steered), filter, collect (walk-C)."""


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"{name} must be at least 1")


def _load_vector(path, info, allow_other_model):
    from mlxgate.steer import extract as E

    sv = E.load(path)
    E.check_compatible(sv, info, allow_other_model)
    return sv


def _say(text: str) -> None:
    """One line on stderr; under mlx.launch the other ranks' lines carry ``[rank r/n]``."""
    from mlxgate import distributed

    click.echo(distributed.prefix() + text, err=True)


def _write_filtered(out_dir: Path, kept: list[dict], dropped: list[dict]) -> None:
    from mlxgate.filter import write_rows

    write_rows(out_dir / "kept.jsonl", kept)
    write_rows(out_dir / "dropped.jsonl", dropped)
    reasons: dict[str, int] = {}
    for row in dropped:
        for r in row["reason"].split("; "):
            key = r.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
    _say(f"kept {len(kept)}, dropped {len(dropped)} {json.dumps(reasons) if reasons else ''} -> {out_dir}/kept.jsonl, dropped.jsonl")


@steer.command()
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help=MODEL_HELP)
@click.option("--pos", default=None, help="persona the vector points towards (default: SPEC §5.1 care-over-authority)")
@click.option("--neg", default=None, help="persona the vector points away from")
@click.option("--contexts", "contexts_file", type=click.Path(dir_okay=False), default=None, help="user messages, .txt one per line or .jsonl with 'prompt' (default: the shipped 295)")
@click.option("--n", "n_contexts", type=int, default=256, show_default=True, help="number of contexts (evenly spread over the file)")
@click.option("--layers", default=None, help="comma-separated block indices (default: SPEC §5.1 middle band)")
@click.option("--batch-size", type=int, default=16, show_default=True, help="prompts per forward pass")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="output .safetensors")
@click.option("--dtype", type=DTYPE, default=None, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
def extract(model, pos, neg, contexts_file, n_contexts, layers, batch_size, out, dtype):
    """Mean-difference persona vector at the assistant tag, per layer (SPEC §5.1)."""
    from mlxgate import distributed
    from mlxgate.models import load
    from mlxgate.steer import extract as E

    _positive("--n", n_contexts)
    _positive("--batch-size", batch_size)
    if not str(out).endswith(".safetensors"):
        raise UserError(f"--out must end in .safetensors; got {out}")
    contexts = E.load_contexts(contexts_file, n_contexts)
    lm, tok, info = load(model, dtype=dtype)
    layer_ids = E.parse_layers(layers, info.n_layers)
    sv = E.extract(lm, tok, contexts, layer_ids, pos or E.DEFAULT_POS, neg or E.DEFAULT_NEG, batch_size, info)
    if not distributed.is_main():  # under mlx.launch every rank holds the vector; rank 0 writes it
        _say(f"extracted its share of {len(contexts)} contexts; rank 0 writes {out}")
        return
    E.save(sv, out)
    s = E.summary(sv)
    for L in s["layers"]:
        _say(f"layer {L}: |v| = {s['norms'][L]:.4g}  (|v| / mean |h| = {sv.meta['rel_norm'][str(L)]:.4g})")
    _say(f"wrote {out} and {out}.json ({len(contexts)} contexts, {info.name})")


def _common_generate_options(f):
    for opt in reversed(
        [
            click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help=MODEL_HELP),
            click.option("--vector", "-v", "vector", required=True, type=click.Path(dir_okay=False), help="steering vector .safetensors"),
            click.option("--max-tokens", type=int, default=512, show_default=True, help="new tokens per completion (SPEC §5.2)"),
            click.option("--temp", type=float, default=1.0, show_default=True),
            click.option("--top-p", type=float, default=0.95, show_default=True),
            click.option("--top-k", type=int, default=64, show_default=True),
            click.option("--seed", type=int, default=0, show_default=True),
            click.option("--batch-size", type=int, default=16, show_default=True, help="rows decoded together"),
            click.option("--allow-other-model", is_flag=True, help="accept a vector extracted from another model of the same shape"),
            click.option("--dtype", type=DTYPE, default=None, help="compute dtype"),
        ]
    ):
        f = opt(f)
    return f


@steer.command()
@_common_generate_options
@click.option("--coeff", "-c", "coeff", required=True, help="C: the multiple of the raw vector added to each steered block's output")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None, help="user messages (.txt / .jsonl); default: the shipped contexts")
@click.option("--n", "n", type=int, default=None, help="completions (prompts cycled; default: one per prompt)")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="output JSONL (heal data format, unfiltered)")
@click.option("--filter-dir", type=click.Path(file_okay=False), default=None, help="also filter (under this model, hooks off) into DIR/kept.jsonl, DIR/dropped.jsonl")
def generate(model, vector, max_tokens, temp, top_p, top_k, seed, batch_size, allow_other_model, dtype, coeff, prompts_file, n, out, filter_dir):
    """Steered completions at a fixed coefficient C, batched with a KV cache (SPEC §5.2)."""
    from mlxgate.models import load
    from mlxgate.steer import collect as K
    from mlxgate.steer import control as S
    from mlxgate.steer import extract as E

    c = S.parse_coeff(coeff)
    _positive("--max-tokens", max_tokens)
    _positive("--batch-size", batch_size)
    contexts = E.load_contexts(prompts_file)
    if n is not None:
        _positive("--n", n)
        contexts = [contexts[i % len(contexts)] for i in range(n)]
    lm, tok, info = load(model, dtype=dtype)
    sv = _load_vector(vector, info, allow_other_model)
    dose = S.relative_dose(sv, c)
    _say(f"C = {c:g}; injected |C v| / mean |h| per layer: " + ", ".join(f"{L}: {d:.3g}" for L, d in dose.items() if d is not None))
    rows = K.generate_rows(lm, tok, sv, contexts, [c] * len(contexts), None, None, max_tokens, seed, batch_size, temp, top_p, top_k)
    from mlxgate import distributed
    from mlxgate.filter import write_rows

    if distributed.is_main():  # under mlx.launch rows are gathered on every rank; rank 0 writes
        write_rows(out, rows)
        _say(f"wrote {len(rows)} completions to {out}")
    if filter_dir:
        from mlxgate.filter import filter_rows

        kept, dropped = filter_rows(lm, rows)
        if distributed.is_main():
            _write_filtered(Path(filter_dir), kept, dropped)


@steer.command(name="filter")
@click.option("--model", "-m", default="smollm2-135m-instruct", show_default=True, help="the unsteered base model that scores coherence. " + MODEL_HELP)
@click.option("--in", "in_path", required=True, type=click.Path(dir_okay=False), help="generations JSONL (from `steer generate`)")
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="writes kept.jsonl and dropped.jsonl here")
@click.option("--max-tail-ppl", type=float, default=50.0, show_default=True, help="coherence: perplexity of the last 25% of tokens under the base")
@click.option("--max-rep-frac", type=float, default=0.3, show_default=True)
@click.option("--dtype", type=DTYPE, default=None, help="compute dtype")
def filter_cmd(model, in_path, out_dir, max_tail_ppl, max_rep_frac, dtype):
    """Keep coherent, non-repetitive, enacted (not narrated), non-boilerplate, loop-free completions
    (SPEC §5.3 + §5.8), with per-completion scores and drop reasons."""
    from mlxgate.filter import FilterThresholds, check_vocab, filter_rows, read_rows
    from mlxgate.models import load

    rows = read_rows(in_path)
    lm, _, info = load(model, dtype=dtype)
    check_vocab(rows, info.vocab_size, in_path)
    kept, dropped = filter_rows(lm, rows, FilterThresholds(max_tail_ppl=max_tail_ppl, max_rep_frac=max_rep_frac))
    _write_filtered(Path(out_dir), kept, dropped)


@steer.command()
@_common_generate_options
@click.option("--base", "base_name", default=None, help="model that scores coherence (default: --model, unsteered)")
@click.option("--contexts", "contexts_file", type=click.Path(dir_okay=False), default=None, help="user messages (default: the shipped contexts)")
@click.option("--n-keep", type=int, default=64, show_default=True, help="completions to keep (SPEC §5.2)")
@click.option("--min-keep", type=int, default=30, show_default=True, help="fewer kept than this is an error")
@click.option("--kappa", default=None, help="skip walk-C and use this κ")
@click.option("--kappa-lo", type=float, default=0.2, show_default=True)
@click.option("--kappa-hi", type=float, default=1.0, show_default=True)
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="kept.jsonl, dropped.jsonl, probes.jsonl, walk.json")
def collect(model, vector, max_tokens, temp, top_p, top_k, seed, batch_size, allow_other_model, dtype, base_name, contexts_file, n_keep, min_keep, kappa, kappa_lo, kappa_hi, out_dir):
    """walk-C (bisection on log κ, 8-completion probes, >= 75% must pass), then C = α·κ with
    α in {0.5, 0.75, 1.0} until --n-keep completions pass the filter (SPEC §5.2)."""
    from mlxgate.filter import FilterThresholds
    from mlxgate.io import write_json
    from mlxgate.models import load
    from mlxgate.steer import collect as K
    from mlxgate.steer import control as S
    from mlxgate.steer import extract as E

    _positive("--n-keep", n_keep)
    _positive("--max-tokens", max_tokens)
    _positive("--batch-size", batch_size)
    if not 0 < kappa_lo < kappa_hi:
        raise UserError("need 0 < --kappa-lo < --kappa-hi")
    kap = S.parse_coeff(kappa, "--kappa") if kappa is not None else None
    if kap is not None and kap <= 0:
        raise UserError("--kappa must be positive")
    contexts = E.load_contexts(contexts_file)
    lm, tok, info = load(model, dtype=dtype)
    sv = _load_vector(vector, info, allow_other_model)
    base = None
    if base_name:
        base, _, base_info = load(base_name, dtype=dtype)
        if base_info.vocab_size != info.vocab_size:
            raise UserError(f"--base {base_name} has another vocabulary ({base_info.vocab_size} vs {info.vocab_size})")
    out = Path(out_dir)

    def on_event(e):
        if e["stage"] == "walk":
            _say(f"walk-C: κ={e['kappa']:.4g} pass {e['kept']}/{e['n']}")
        elif e["stage"] == "collect":
            _say(f"batch {e['batch']}: kept {e['kept']}, dropped {e['dropped']}")

    from mlxgate.filter import write_rows

    try:
        res = K.settle_and_collect(
            lm, tok, sv, contexts, base=base, n_keep=n_keep, min_keep=min_keep, kappa_lo=kappa_lo, kappa_hi=kappa_hi,
            kappa=kap, max_tokens=max_tokens, seed=seed, batch_size=batch_size, thresholds=FilterThresholds(), on_event=on_event,
        )
    except K.CollectError as err:
        write_rows(out / "dropped.jsonl", err.result.dropped)
        raise
    _write_filtered(out, res.kept, res.dropped)
    write_rows(out / "probes.jsonl", res.probes)
    write_json(out / "walk.json", {**res.walk.to_dict(), "batches": res.batches, "relative_dose": {str(k): v for k, v in S.relative_dose(sv, res.kappa).items()}})
    _say(f"settled κ = {res.kappa:.4g} after {res.walk.steps} probes; wrote {out}/walk.json, probes.jsonl")
