"""The one generation core: batched, left-padded, KV-cached decoding that yields raw logits.

``decode_steps`` is a plain generator in the style of mlx-lm's ``generate_step``: it prefills a
batch of prompts and yields, per decoded step, the sampled tokens and the raw next-token logits
they were sampled from. Measurement (entropy), steering, the dashboard and evaluation are all
consumers of it. ``generate`` collects whole completions with their per-token entropy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from mlxgate import ops

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402


def make_sampler(temp: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Callable[[mx.array], mx.array]:
    """A sampler over log-probs [B, V] -> token ids [B]. temp 0 is greedy."""
    from mlx_lm.sample_utils import make_sampler as _mlx_lm_sampler

    return _mlx_lm_sampler(temp=temp, top_p=top_p if top_p < 1.0 else 0.0, top_k=top_k)


def make_cache(model: nn.Module, left_padding: list[int] | None = None) -> list:
    """The model's KV cache; with ``left_padding`` the batched (masked, per-row offset) version."""
    from mlx_lm.models import cache as C

    base = C.make_prompt_cache(model)
    if left_padding is None:
        return base
    out = []
    for c in base:
        if isinstance(c, C.RotatingKVCache):
            out.append(C.BatchRotatingKVCache(c.max_size, left_padding))
        elif isinstance(c, C.KVCache):
            out.append(C.BatchKVCache(left_padding))
        else:
            raise TypeError(f"batched generation does not support cache type {type(c).__name__}")
    return out


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[mx.array, list[int]]:
    """[B, Lmax] int32 with each prompt right-aligned, and the padding count per row."""
    longest = max(len(p) for p in prompts)
    padding = [longest - len(p) for p in prompts]
    rows = [[pad_id] * n + list(p) for n, p in zip(padding, prompts)]
    return mx.array(rows, dtype=mx.int32), padding


PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the [B, chunk, V] logits temporaries


def prefill(model: nn.Module, prompts: list[list[int]], cache: list | None = None) -> tuple[mx.array, list]:
    """Run the prompts through the model; return the last position's logits [B, V] and the cache."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: every prompt needs at least one token")
    batched = len(prompts) > 1
    tokens, padding = left_pad(prompts)
    if cache is None:
        cache = make_cache(model, padding if batched else None)
    n = tokens.shape[1]
    for start in range(0, n - 1, PREFILL_CHUNK):
        stop = min(start + PREFILL_CHUNK, n - 1)
        model(tokens[:, start:stop], cache=cache)
        mx.eval([c.state for c in cache])
    logits = model(tokens[:, n - 1 :], cache=cache)[:, -1, :]
    return logits, cache


@dataclass
class Step:
    """One decoded step: tokens [B] int sampled from ``logits`` [B, V] (raw, before sampling)."""

    index: int
    tokens: mx.array
    logits: mx.array


def decode_steps(
    model: nn.Module,
    prompts: list[list[int]],
    max_tokens: int,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processor: Callable[[mx.array], mx.array] | None = None,
) -> Iterator[Step]:
    """Yield ``max_tokens`` steps for a batch of prompts (stopping is the consumer's business).

    ``logits_processor`` may modify the logits used for *sampling* (e.g. suppress end-of-turn);
    the yielded ``logits`` are always the model's raw ones.
    """
    sampler = sampler or make_sampler(0.0)
    logits, cache = prefill(model, prompts)

    def sample(raw: mx.array) -> mx.array:
        z = raw.astype(mx.float32)
        if logits_processor is not None:
            z = logits_processor(z)
        return sampler(z - mx.logsumexp(z, axis=-1, keepdims=True))

    tokens = sample(logits)
    mx.async_eval(tokens, logits)
    for i in range(max_tokens):
        if i + 1 < max_tokens:
            next_logits = model(tokens[:, None], cache=cache)[:, -1, :]
            next_tokens = sample(next_logits)
            mx.async_eval(next_tokens, next_logits)  # overlap the next step with the consumer
        yield Step(i, tokens, logits)
        if i + 1 < max_tokens:
            tokens, logits = next_tokens, next_logits


@dataclass
class Completion:
    """One prompt's completion: ``tokens`` (generated ids, EOS excluded), ``entropy`` H_t (nats)
    of the raw next-token distribution at each generated position, and why it stopped."""

    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # log p(token) under the raw logits, if asked
    finish: str = "length"  # "eos" or "length"


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_tokens: int,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    temp: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    batch_size: int = 8,
    logits_processor: Callable[[mx.array], mx.array] | None = None,
    on_token: Callable[[int, int, float], None] | None = None,
    with_logprobs: bool = False,
) -> list[Completion]:
    """Generate for every prompt (in batches of ``batch_size``) and measure H_t at every token.

    ``on_token(prompt_index, token_id, entropy)`` is called per generated token (progress, dashboards).
    ``with_logprobs`` also records log p(token) under the raw logits (for tail perplexity).
    """
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp, top_p, top_k)
    results = [Completion(list(p)) for p in prompts]
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = list(range(start, min(start + batch_size, len(prompts))))
        done = np.zeros(len(chunk), dtype=bool)
        # Per-step stats stay on the device ([B] arrays, evaluated asynchronously) and are read
        # back once per chunk: only the sampled tokens are synced each step (for EOS), as in
        # mlx-lm's generate_step. With on_token they are read every step (live consumers).
        per_step: list[tuple[list[int], mx.array, mx.array | None]] = []
        for step in decode_steps(model, [prompts[i] for i in chunk], max_tokens, sampler, logits_processor):
            if with_logprobs:
                stats = ops.entropy_stats(step.logits, step.tokens)
                h, lp = stats["entropy"], stats["target_logprob"]
            else:
                h, lp = ops.entropy(step.logits), None
            mx.async_eval(h) if lp is None else mx.async_eval(h, lp)
            toks = step.tokens.tolist()
            live = [] if on_token is None else h.tolist()
            per_step.append((toks, h, lp))
            for row, idx in enumerate(chunk):
                if done[row]:
                    continue
                if toks[row] in eos_ids:
                    done[row] = True
                    results[idx].finish = "eos"
                    continue
                results[idx].tokens.append(int(toks[row]))
                if on_token:
                    on_token(idx, int(toks[row]), float(live[row]))
            if done.all():
                break
        hs = np.array(mx.stack([h for _, h, _ in per_step])) if per_step else np.zeros((0, len(chunk)))
        lps = np.array(mx.stack([lp for _, _, lp in per_step])) if with_logprobs and per_step else None
        for row, idx in enumerate(chunk):
            n = len(results[idx].tokens)  # generated tokens are a prefix of the steps (EOS stops a row)
            results[idx].entropy = hs[:n, row].astype(float).tolist()
            if lps is not None:
                results[idx].logprobs = lps[:n, row].astype(float).tolist()
    return results


def score_tokens(model: nn.Module, ids: list[int], chunk: int = PREFILL_CHUNK) -> dict[str, np.ndarray]:
    """Teacher-forced scores of a token sequence.

    For each position t >= 1: ``entropy[t-1]`` H of p(. | ids[:t]) and ``nll[t-1]`` = -log p(ids[t] | ids[:t])
    (nats). Processed in chunks through a KV cache so the [chunk, V] logits bound memory.
    """
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to score a text")
    cache = make_cache(model)
    x = mx.array(ids, dtype=mx.int32)[None]
    ent, nll = [], []
    for start in range(0, len(ids) - 1, chunk):
        stop = min(start + chunk, len(ids) - 1)
        logits = model(x[:, start:stop], cache=cache)[0]
        stats = ops.entropy_stats(logits, x[0, start + 1 : stop + 1])
        mx.eval(stats)
        ent.append(np.array(stats["entropy"]))
        nll.append(-np.array(stats["target_logprob"]))
    return {"entropy": np.concatenate(ent), "nll": np.concatenate(nll)}


def full_sequence_entropy(model: nn.Module, prompt: list[int], generated: list[int]) -> np.ndarray:
    """H_t of each generated token recomputed from the whole sequence without a cache (the check
    that the cached path is right): positions len(prompt)-1 ... len(prompt)+len(generated)-2."""
    seq = mx.array(list(prompt) + list(generated), dtype=mx.int32)[None]
    logits = model(seq)[0, len(prompt) - 1 : len(prompt) - 1 + len(generated)]
    return np.array(ops.entropy(logits))
