"""Per-token logit entropy of what a model generates (SPEC §3.1), with zones, loops and basins.

Library API for ``mlxgate measure``: :func:`measure_prompts` (generation with a KV cache, batched)
and :func:`measure_text` (a given text, teacher-forced). Both return JSON-serialisable dicts.
"""

from __future__ import annotations

from dataclasses import asdict
import math
from pathlib import Path
from typing import Callable

import numpy as np

from mlxgate import backend
from mlxgate.analysis.loops import classify_basin, detect_loop
from mlxgate.analysis.zones import zone_counts, zone_of
from mlxgate.errors import UserError
from mlxgate import distributed
from mlxgate.batches import batch_seed, rank_batches
from mlxgate.generate import generate, score_tokens
from mlxgate.prompts import prompt_ids

# Built-in probe set: factual, creative, reasoning, open-ended, code, emotional, instruction,
# philosophical. Diverse on purpose, so zones and basins differ between prompts.
PROBE_PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea at night.",
    "Explain why the sky is blue in two sentences.",
    "What would you do if you could fly for one day?",
    "Write a Python function that reverses a string.",
    "My friend is sad because her cat died. What should I say to her?",
    "List five fruits that are red.",
    "Is it ever right to break a promise? Explain.",
)

TAIL_FRACTION = 0.25  # SPEC §5.3: coherence is the perplexity of the last 25% of completion tokens


def load_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per non-empty line) or .jsonl (a ``prompt`` field per line)."""
    from mlxgate.io import read_jsonl

    path = Path(path)
    if path.suffix == ".jsonl":
        prompts = []
        for no, row in read_jsonl(path, "prompts file"):  # line numbers count blank lines too
            if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise UserError(f"{path}:{no}: each line needs a non-empty string field \"prompt\"")
            prompts.append(row["prompt"])
    else:
        if not path.is_file():
            raise UserError(f"prompts file not found: {path}")
        try:
            prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read prompts file {path}: {err}") from None
    if not prompts:
        raise UserError(f"prompts file {path} has no prompts")
    return prompts


def summarize(values: list[float] | np.ndarray) -> dict:
    """mean, std (population), min, max and n of a list of values (nats)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "min": float(arr.min()), "max": float(arr.max()), "n": int(arr.size)}


def tail_perplexity(nll: list[float] | np.ndarray, fraction: float = TAIL_FRACTION) -> float | None:
    """exp(mean NLL) over the last ``fraction`` of positions (at least one); None if empty."""
    arr = np.asarray(nll, dtype=np.float64)
    if arr.size == 0:
        return None
    k = max(1, int(math.ceil(arr.size * fraction)))
    return float(np.exp(arr[-k:].mean()))


def _token_strings(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def measure_prompts(
    model,
    tokenizer,
    prompts: list[str],
    max_tokens: int = 128,
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    raw: bool = False,
    zones: str = "iris",
    batch_size: int = 8,
    on_token: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Generate for each prompt and report H_t (nats) at every generated token.

    Returns ``{"prompts": [...], "overall": {...}, "settings": {...}}``. Per prompt: tokens (ids and
    strings), H_t, mean/std/min/max/n, zone of the mean, token loop, rep_frac, basin. Overall:
    pooled over all tokens, and mean +- std over prompt means (the two differ; SPEC §3.1).
    ``on_token(prompt_index, token_id, entropy)``: per generated token, the index into ``prompts``.
    ``seed``: batch b of ``batch_size`` prompts samples with ``batch_seed(seed, b)``, so sampled
    output is the same however many ranks share the batches.
    """
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if not prompts:
        raise UserError("no prompts given")
    for p in prompts:
        if not p.strip():
            raise UserError("empty prompt; every prompt needs some text")
    ids = [prompt_ids(tokenizer, p, raw=raw) for p in prompts]
    eos = set(tokenizer.eos_token_ids)
    # Under mlx.launch each rank decodes whole decode batches (the same batches a single process
    # forms, so greedy output is identical token for token) and the rows are gathered in order.
    # Each batch is seeded from (seed, its global index): sampled output does not depend on the
    # number of ranks either.
    mine, completions = [], []
    for b, idx in rank_batches(len(ids), batch_size):
        tick = None if on_token is None else (lambda j, tok, h, idx=idx: on_token(idx[j], tok, h))
        completions += generate(
            model, [ids[i] for i in idx], max_tokens, eos, temp=temp, top_p=top_p, top_k=top_k, seed=batch_seed(seed, b),
            batch_size=len(idx), on_token=tick, with_logprobs=True,
        )
        mine += idx
    rows = []
    for prompt, comp in zip([prompts[i] for i in mine], completions):
        text = tokenizer.decode(comp.tokens)
        stats = summarize(comp.entropy)
        nll = [-lp for lp in comp.logprobs]
        ppl_tail = tail_perplexity(nll)
        loop = detect_loop(comp.tokens)
        basin = classify_basin(comp.tokens, text, stats["mean"] if stats["n"] else 0.0, ppl_tail)
        rows.append(
            {
                "prompt": prompt,
                "prompt_tokens": len(comp.prompt_ids),
                "text": text,
                "token_ids": comp.tokens,
                "tokens": _token_strings(tokenizer, comp.tokens),
                "entropy": comp.entropy,
                **stats,
                "zone": zone_of(stats["mean"], zones) if stats["n"] else None,
                "finish": comp.finish,
                "mean_nll": float(np.mean(nll)) if nll else None,
                "tail_ppl": ppl_tail,
                "rep_frac": basin.rep_frac,  # classify_basin computed rep_frac(text)
                "loop": asdict(loop) if loop else None,
                "basin": basin.basin,
                "basin_reason": basin.reason,
            }
        )
    rows = distributed.gather_ordered(rows, mine, all_ranks=True, what="gathering measure rows")
    pooled = [h for r in rows for h in r["entropy"]]
    means = [r["mean"] for r in rows if r["n"]]
    overall = {
        "pooled": summarize(pooled),
        "prompt_means": {"mean": float(np.mean(means)) if means else None, "std": float(np.std(means)) if means else None, "n": len(means)},
        "zone": zone_of(float(np.mean(pooled)), zones) if pooled else None,
        "zone_counts": zone_counts(pooled, zones),
        "basins": {b: sum(r["basin"] == b for r in rows) for b in sorted({r["basin"] for r in rows})},
    }
    settings = {
        "max_tokens": max_tokens,
        "temp": temp,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "raw": raw,
        "zones": zones,
        "batch_size": batch_size,
        "backend": backend.backend_label(),
        "units": "nats",
    }
    return {"prompts": rows, "overall": overall, "settings": settings}


def measure_text(model, tokenizer, text: str, zones: str = "iris") -> dict:
    """Teacher-forced H_t and NLL (nats) at every position of ``text`` (tokenised as is, BOS added
    if the tokenizer adds one). Position t reports the distribution that predicts token t."""
    if not text.strip():
        raise UserError("the text to measure is empty")
    ids = prompt_ids(tokenizer, text, raw=True)
    if len(ids) < 2:
        raise UserError("the text is too short to measure (it needs at least 2 tokens)")
    scores = score_tokens(model, ids)
    ent, nll = scores["entropy"].tolist(), scores["nll"].tolist()
    mean_nll = float(np.mean(nll))
    return {
        "text": text,
        "token_ids": ids,
        "tokens": _token_strings(tokenizer, ids),
        "entropy": ent,
        "nll": nll,
        "entropy_stats": summarize(ent),
        "mean_nll": mean_nll,
        "perplexity": float(np.exp(mean_nll)),
        "n_scored": len(nll),
        "zone": zone_of(float(np.mean(ent)), zones),
        "settings": {"zones": zones, "backend": backend.backend_label(), "units": "nats"},
    }
