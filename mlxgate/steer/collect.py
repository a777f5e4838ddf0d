"""Steered data for heal: generate, filter, and settle the dose with walk-C (SPEC §5.2, §5.3).

Rows are generated from the *unsteered* chat prompt of each context (no persona: the vector
replaces it), steered at C = α·κ with α cycling over (0.5, 0.75, 1.0) across rows, so every batch
(probes included) holds the same mix of doses; a probe's pass rate is therefore the yield the
collection will see. The filter scores coherence under ``base`` (the pristine model; by default
the model being steered, with its hooks off).

Row format (JSONL; read by heal): ``prompt`` (the user message), ``completion`` (decoded text),
``prompt_ids`` (chat ids of the unsteered prompt), ``completion_ids`` (generated ids, EOS
excluded), ``coeff`` (C), ``kappa``, ``alpha``, ``finish`` ("eos" | "length"), ``seed``, ``entropy_mean`` (mean H_t, nats, under steering); after the
filter also ``scores``, ``kept`` and, for drops, ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mlxgate.errors import UserError
from mlxgate.filter import FilterThresholds, filter_rows
from mlxgate.prompts import prompt_ids
from mlxgate.steer import walk as W
from mlxgate.steer.control import GEN_BATCH, MAX_TOKENS, TEMP, TOP_K, TOP_P, steered_generate
from mlxgate.steer.extract import SteeringVector

# SPEC §5.2: dose multipliers on the settled κ, completions kept, batches, floor.
ALPHAS = (0.5, 0.75, 1.0)
N_KEEP = 64
MAX_BATCHES = 6
MIN_KEEP = 30


class CollectError(UserError):
    """Too few completions passed; ``result`` holds what was generated (write it for inspection)."""

    def __init__(self, message: str, result: "CollectResult"):
        super().__init__(message)
        self.result = result


class ContextStream:
    """Contexts in a seeded random order, reshuffled each pass, so probes and batches draw
    different user messages until the list is used up."""

    def __init__(self, contexts: list[str], seed: int = 0):
        if not contexts:
            raise UserError("no contexts to generate from")
        self.contexts = list(contexts)
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []

    def take(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if not self.order:
                self.order = list(self.rng.permutation(len(self.contexts)))
            out.append(self.contexts[self.order.pop()])
        return out


def generate_rows(
    model,
    tokenizer,
    sv: SteeringVector,
    contexts: list[str],
    coeffs: list[float],
    kappa: float | None = None,
    alphas: list[float] | None = None,
    max_tokens: int = MAX_TOKENS,
    seed: int | None = None,
    batch_size: int = GEN_BATCH,
    temp: float = TEMP,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
) -> list[dict]:
    """One steered completion per context at ``coeffs[i]``; rows in the heal data format. Batch b
    of ``batch_size`` contexts samples with ``batch_seed(seed, b)`` (:mod:`mlxgate.batches`)."""
    from mlxgate import distributed
    from mlxgate.batches import batch_seed, rank_batches

    ids = [prompt_ids(tokenizer, c) for c in contexts]
    # Under mlx.launch each rank generates whole decode batches; rows are gathered in input order.
    # Each batch is seeded from (seed, its global index), so sampled rows do not depend on the
    # number of ranks.
    mine, comps = [], []
    for b, idx in rank_batches(len(ids), batch_size):
        comps += steered_generate(
            model, sv, [coeffs[i] for i in idx], [ids[i] for i in idx], max_tokens, set(tokenizer.eos_token_ids), temp=temp, top_p=top_p, top_k=top_k,
            seed=batch_seed(seed, b), batch_size=len(idx),
        )
        mine += idx
    rows = []
    for i, comp in zip(mine, comps):
        ctx = contexts[i]
        rows.append(
            {
                "prompt": ctx,
                "completion": tokenizer.decode(comp.tokens),
                "prompt_ids": list(comp.prompt_ids),
                "completion_ids": list(comp.tokens),
                "coeff": float(coeffs[i]),
                "kappa": kappa,
                "alpha": None if alphas is None else float(alphas[i]),
                "finish": comp.finish,
                "seed": seed,
                # mean H_t (nats) of the steered model's raw logits over the completion
                "entropy_mean": float(np.mean(comp.entropy)) if len(comp.entropy) else None,
            }
        )
    return distributed.gather_ordered(rows, mine, all_ranks=True, what="gathering generations")


def alpha_mix(n: int, alphas=ALPHAS) -> list[float]:
    """α for n rows, cycling over ``alphas`` (each dose equally represented)."""
    return [float(alphas[i % len(alphas)]) for i in range(n)]


@dataclass
class CollectResult:
    """The settled dose, the walk that found it, and the filtered rows at that dose."""

    kappa: float
    walk: W.WalkResult
    kept: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)  # probe rows (scored), for the record
    batches: int = 0


def settle_and_collect(
    model,
    tokenizer,
    sv: SteeringVector,
    contexts: list[str],
    base=None,
    n_keep: int = N_KEEP,
    batch_n: int | None = None,
    max_batches: int = MAX_BATCHES,
    min_keep: int = MIN_KEEP,
    probe_n: int = W.PROBE_N,
    alphas=ALPHAS,
    kappa_lo: float = W.KAPPA_LO,
    kappa_hi: float = W.KAPPA_HI,
    kappa: float | None = None,
    max_tokens: int = MAX_TOKENS,
    seed: int = 0,
    batch_size: int = GEN_BATCH,
    thresholds: FilterThresholds = FilterThresholds(),
    on_event: Callable[[dict], None] | None = None,
) -> CollectResult:
    """walk-C on probes of ``probe_n`` completions, then batches of ``batch_n`` (default
    ``n_keep``) at the settled κ until ``n_keep`` pass, at most ``max_batches``.

    ``base``: model for the coherence score (default ``model``, hooks off). ``kappa``: skip the
    walk and use this κ. ``kept`` is cut to the first ``n_keep`` passing rows (surplus passes of
    the last batch are discarded, not recorded as drops). Raises :class:`CollectError` (a
    UserError carrying the partial result) when fewer than ``min_keep`` pass.
    """
    base = model if base is None else base
    stream = ContextStream(contexts, seed)
    calls = iter(range(seed * 1000, seed * 1000 + 10_000))  # one seed per generation call
    emit = on_event or (lambda e: None)
    probes: list[dict] = []

    def run(kap: float, n: int) -> tuple[list[dict], list[dict]]:
        a = alpha_mix(n, alphas)
        rows = generate_rows(model, tokenizer, sv, stream.take(n), [x * kap for x in a], kap, a, max_tokens, next(calls), batch_size)
        return filter_rows(base, rows, thresholds)

    def oracle(kap: float) -> float:
        kept, dropped = run(kap, probe_n)
        probes.extend(kept + dropped)
        rate = len(kept) / probe_n
        emit({"stage": "walk", "kappa": kap, "pass_rate": rate, "kept": len(kept), "n": probe_n})
        return rate

    if kappa is None:
        walk = W.walk_c(oracle, kappa_lo, kappa_hi)
    else:
        walk = W.WalkResult(kappa=float(kappa), lo=float(kappa), hi=float(kappa), converged=True)
    result = CollectResult(kappa=walk.kappa, walk=walk, probes=probes)
    emit({"stage": "settled", **walk.to_dict()})
    batch_n = batch_n or n_keep
    while len(result.kept) < n_keep and result.batches < max_batches:
        kept, dropped = run(walk.kappa, batch_n)
        result.kept += kept
        result.dropped += dropped
        result.batches += 1
        emit({"stage": "collect", "batch": result.batches, "kappa": walk.kappa, "kept": len(result.kept), "dropped": len(result.dropped)})
    result.kept = result.kept[:n_keep]
    if len(result.kept) < min_keep:
        n = len(result.kept) + len(result.dropped)
        raise CollectError(
            f"only {len(result.kept)} of {n} steered completions passed the filter at κ={walk.kappa:.3g} after "
            f"{result.batches} batches (need at least {min_keep}); lower the dose (--kappa-hi), use more contexts, or inspect the drop reasons",
            result,
        )
    return result


__all__ = ["ALPHAS", "CollectError", "CollectResult", "ContextStream", "MAX_BATCHES", "MIN_KEEP", "N_KEEP", "alpha_mix", "generate_rows", "settle_and_collect"]
