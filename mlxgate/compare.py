"""KL drift between two models on the same tokens (SPEC §3.3): library for ``mlxgate compare``.

Both models are run teacher-forced over the same token ids; at every position in S the KL of
their next-token distributions, ``KL(A‖B)_t = Σ_i p_i (log p_i − log q_i)`` with P = softmax of
A's logits and Q of B's, both in float32 (``mlxgate.ops.kl``), in nats. S is:

- for a given text: every position that predicts a token of the text (t = 1 … L−1, as in
  ``measure --text``: the distribution after ids[:t]);
- for a generation: every generated token of A's own greedy completion (the distribution it was
  picked from; the EOS that ended it is not a position, as in ``measure``).

Aggregates per sequence and pooled over all positions of all sequences are
``mlxgate.analysis.kl_stats.kl_aggregates`` (mean, rmse = sqrt(mean KL²), p95, max): exact, so
identical models give 0 for all four (the barrier's 1e-8 epsilon is for training gradients only).
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np

from mlxgate import backend, ops
from mlxgate.analysis.kl_stats import KL_AGGS, kl_aggregates
from mlxgate.errors import UserError
from mlxgate.generate import PREFILL_CHUNK, generate, make_cache
from mlxgate.prompts import prompt_ids

import mlx.core as mx  # noqa: E402


def check_same_vocab(info_a, info_b, tok_a, tok_b, warn: Callable[[str], None] | None = None) -> None:
    """UserError if the two models' vocabularies differ in size; a warning if the token -> id maps
    differ (same size, different tokenizer: the KL would compare unrelated tokens)."""
    if info_a.vocab_size != info_b.vocab_size:
        raise UserError(
            f"the models have different vocabularies ({info_a.name}: {info_a.vocab_size} tokens, "
            f"{info_b.name}: {info_b.vocab_size}); KL needs two models with the same tokenizer"
        )
    try:
        same = tok_a.get_vocab() == tok_b.get_vocab()
    except Exception:  # a tokenizer without get_vocab: nothing more to check
        same = True
    if not same and warn is not None:
        warn(f"{info_a.name} and {info_b.name} have vocabularies of the same size but different token -> id maps")


def kl_positions(model_a, model_b, ids: list[int], start: int, chunk: int = PREFILL_CHUNK) -> np.ndarray:
    """Per-position KL(A‖B) (nats, float32 -> float64 [n]) teacher-forced over ``ids``.

    Position t (``start <= t < len(ids)``) is the pair of next-token distributions after
    ids[:t], i.e. the logits at index t−1; ``start >= 1``. Both models read the sequence in
    chunks of ``chunk`` tokens through a KV cache, so the [chunk, V] logits bound memory.
    """
    if start < 1:
        raise ValueError("start must be >= 1: position 0 has no preceding context")
    n = len(ids)
    if n <= start:
        return np.zeros(0, dtype=np.float64)
    x = mx.array(ids, dtype=mx.int32)[None]
    cache_a, cache_b = make_cache(model_a), make_cache(model_b)
    out = []
    # Logits index i predicts token i+1; we need indices start-1 ... n-2. The prefix before
    # start-1 only fills the caches.
    for lo in range(0, n - 1, chunk):
        hi = min(lo + chunk, n - 1)
        la = model_a(x[:, lo:hi], cache=cache_a)[0]
        lb = model_b(x[:, lo:hi], cache=cache_b)[0]
        first = max(start - 1 - lo, 0)
        if first >= hi - lo:
            mx.eval([c.state for c in cache_a] + [c.state for c in cache_b])
            continue
        kl = ops.kl(la[first:].astype(mx.float32), lb[first:].astype(mx.float32))
        mx.eval(kl)
        out.append(np.array(kl, dtype=np.float64))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


def over_threshold(aggs: dict, threshold: float | None) -> dict[str, bool] | None:
    """{aggregate: value > threshold} for mean/rmse/p95/max (the heal barrier's hinge is active
    above τ, SPEC §5.4); None without a threshold."""
    if threshold is None:
        return None
    return {k: bool(aggs[k] > threshold) for k in KL_AGGS}


def _row(label: str, ids: list[int], start: int, kl: np.ndarray, tokenizer, threshold: float | None, **extra) -> dict:
    aggs = kl_aggregates(kl)
    return {
        "prompt": label,
        **extra,
        "n": aggs["n"],
        "aggregates": {k: aggs[k] for k in KL_AGGS},
        "over_threshold": over_threshold(aggs, threshold),
        "token_ids": ids[start:],
        "tokens": [tokenizer.decode([i]) for i in ids[start:]],
        "kl": kl.tolist(),
    }


def _pooled(rows: list[dict], threshold: float | None) -> dict:
    pooled = np.concatenate([np.asarray(r["kl"], dtype=np.float64) for r in rows]) if rows else np.zeros(0)
    aggs = kl_aggregates(pooled)
    means = [r["aggregates"]["mean"] for r in rows if r["n"]]
    return {
        "n": aggs["n"],
        "aggregates": {k: aggs[k] for k in KL_AGGS},
        "over_threshold": over_threshold(aggs, threshold),
        "prompt_means": {
            "mean": float(np.mean(means)) if means else None,
            "std": float(np.std(means)) if means else None,
            "n": len(means),
        },
    }


def compare_text(model_a, model_b, tokenizer, text: str, threshold: float | None = None) -> dict:
    """KL(A‖B) at every position of ``text`` (tokenised as is, BOS added if the tokenizer adds one)."""
    if not text.strip():
        raise UserError("the text to compare on is empty")
    ids = prompt_ids(tokenizer, text, raw=True)
    if len(ids) < 2:
        raise UserError("the text is too short to compare on (it needs at least 2 tokens)")
    kl = kl_positions(model_a, model_b, ids, 1)
    row = _row(text[:80], ids, 1, kl, tokenizer, threshold, mode="text")
    return {"mode": "text", "prompts": [row], "pooled": _pooled([row], threshold), "settings": _settings(threshold)}


def compare_generations(
    model_a,
    model_b,
    tokenizer,
    prompts: list[str],
    max_tokens: int = 128,
    raw: bool = False,
    batch_size: int = 8,
    threshold: float | None = None,
    on_token: Callable[[int, int, float], None] | None = None,
) -> dict:
    """A generates greedily for each prompt (KV-cached, batched); KL(A‖B) at every generated token."""
    if max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if not prompts:
        raise UserError("no prompts given")
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt; every prompt needs some text")
    ids = [prompt_ids(tokenizer, p, raw=raw) for p in prompts]
    eos = set(tokenizer.eos_token_ids)
    completions = generate(model_a, ids, max_tokens, eos, temp=0.0, batch_size=batch_size, on_token=on_token)
    rows = []
    for prompt, comp in zip(prompts, completions):
        seq = list(comp.prompt_ids) + list(comp.tokens)
        start = len(comp.prompt_ids)
        kl = kl_positions(model_a, model_b, seq, start)
        rows.append(
            _row(prompt, seq, start, kl, tokenizer, threshold, mode="generate", text=tokenizer.decode(comp.tokens), finish=comp.finish)
        )
    settings = {**_settings(threshold), "max_tokens": max_tokens, "raw": raw, "decoding": "greedy"}
    return {"mode": "generate", "prompts": rows, "pooled": _pooled(rows, threshold), "settings": settings}


def _settings(threshold: float | None) -> dict:
    return {"threshold": threshold, "units": "nats", "backend": backend.backend_label(), "direction": "KL(A||B)"}


def format_table(report: dict, width: int = 120) -> str:
    """Per-prompt and pooled aggregates as a text table (rich)."""
    from rich.console import Console
    from rich.table import Table

    thr = report["settings"].get("threshold")
    title = f"KL(A‖B) per position (nats): A = {report.get('model_a', '?')}, B = {report.get('model_b', '?')}"
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("prompt", max_width=36, no_wrap=True, overflow="ellipsis")
    table.add_column("n", justify="right")
    for k in KL_AGGS:
        table.add_column(k, justify="right")
    if thr is not None:
        table.add_column(f"> τ={thr:g}")

    def cells(block: dict) -> list[str]:
        a = block["aggregates"]
        c = [f"{a[k]:.4g}" for k in KL_AGGS]
        if thr is not None:
            c.append(",".join(k for k, v in block["over_threshold"].items() if v) or "-")
        return c

    for i, r in enumerate(report["prompts"]):
        table.add_row(str(i), r["prompt"].replace("\n", " "), str(r["n"]), *cells(r))
    if len(report["prompts"]) > 1:
        p = report["pooled"]
        table.add_row("all", "pooled over positions", str(p["n"]), *cells(p), style="bold")
    console = Console(record=True, width=width, file=open("/dev/null", "w") if sys.platform != "win32" else None)
    console.print(table)
    return console.export_text()
