"""Repetition, token loops and basins of one generation (SPEC §3.4, §5.3, §5.8).

- ``rep_frac(text)``: share of the most common word/character n-gram (n = 2, 3, 4).
- ``detect_loop(ids)``: the shortest period p <= 16 with which the generated ids end.
- ``classify_basin(...)``: TOKEN_COLLAPSE / SEMANTIC_LOOP / CREATIVE / UNKNOWN, mlxgate's own
  documented rule (ada-slm named the basins but never published how it assigned them).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

# SPEC §3.4: n-gram orders for rep_frac.
REP_NGRAM_ORDERS = (2, 3, 4)
_WS = re.compile(r"\s+")


def _max_ngram_share(seq: Sequence[Any], n: int) -> float | None:
    """Count of the most common n-gram / number of n-grams; None if seq has no n-gram."""
    total = len(seq) - n + 1
    if total <= 0:
        return None
    grams = Counter(tuple(seq[i : i + n]) for i in range(total))
    return grams.most_common(1)[0][1] / total


def rep_frac(text: str) -> float:
    """Repetition score in (0, 1] of a completion's text (SPEC §3.4); >= 0.3 fails the filter.

    max over n in {2, 3, 4} of (count of the most common n-gram / number of n-grams), taken over
    word n-grams and over character n-grams.
    Words: the text lowercased and split on whitespace; punctuation is kept as part of the word
    ("end." != "end"). This is steer-heal-love's ``text.split()`` 4-gram statistic plus lowercasing
    and more orders, so on any text the score here is >= the original's (merging case can only
    raise the top count): whatever the original filtered, this filters too.
    Characters: the lowercased text with every whitespace run collapsed to one space and the ends
    stripped, so indentation and blank lines do not count as repetition; character n-grams catch
    loops that have no spaces ("!!!!!!", "hahaha...").
    A text with fewer than 2 words (no word 2-gram) scores 1.0: too short to judge, treated as
    degenerate, as in the original.
    """
    lowered = text.lower()
    words = lowered.split()
    if len(words) < min(REP_NGRAM_ORDERS):
        return 1.0
    chars = _WS.sub(" ", lowered).strip()
    shares = [_max_ngram_share(words, n) for n in REP_NGRAM_ORDERS]
    shares += [_max_ngram_share(chars, n) for n in REP_NGRAM_ORDERS]
    return max(s for s in shares if s is not None)


@dataclass(frozen=True)
class LoopInfo:
    """A periodic tail of a token sequence.

    period: p (tokens); start: index of the first token of the periodic tail (it extends back as
    far as ids[i] == ids[i + p] holds); repeats: full periods in the tail, (len(ids) - start) // p.
    """

    period: int
    start: int
    repeats: int


def _as_int_list(ids: Any) -> list[int]:
    try:
        import mlx.core as mx

        if isinstance(ids, mx.array):
            return [int(t) for t in ids.reshape(-1).tolist()]
    except ImportError:  # pragma: no cover - mlx is a dependency
        pass
    return [int(t) for t in np.asarray(ids).reshape(-1).tolist()]


def detect_loop(
    ids: Any, max_period: int = 16, min_repeats: int = 3, min_period: int = 1
) -> LoopInfo | None:
    """Shortest period p in [min_period, max_period] with which ``ids`` ends, or None.

    ``ids``: 1-D generated token ids (list / numpy / mlx). For each p the periodic tail is the
    longest suffix with ids[i] == ids[i + p] for every i in it; it is a loop if it holds at least
    ``min_repeats`` full periods. A loop that stopped before the end of ``ids`` is not reported
    (the detector asks "is the generation stuck now?"). O(len(ids) * max_period), pure Python.
    """
    seq = _as_int_list(ids)
    n = len(seq)
    for p in range(max(1, min_period), max_period + 1):
        if min_repeats * p > n:
            break
        i = n - p - 1
        while i >= 0 and seq[i] == seq[i + p]:
            i -= 1
        start = i + 1
        repeats = (n - start) // p
        if repeats >= min_repeats:
            return LoopInfo(period=p, start=start, repeats=repeats)
    return None


@dataclass(frozen=True)
class BasinThresholds:
    """Parameters of ``classify_basin`` (SPEC §3.4 defaults)."""

    collapse_window: int = 32  # tokens at the end of the generation that are inspected
    collapse_frac: float = 0.5  # share of the window one token / a period-1-2 loop must fill
    loop_min_period: int = 3
    loop_max_period: int = 16
    loop_min_repeats: int = 3
    rep_frac_max: float = 0.3  # rep_frac >= this is a semantic loop
    # rep_frac of any text under 7 words is >= 1/3 (its few 4-grams are each 1/k of the total),
    # so for shorter texts the rep_frac rule says nothing about looping and is skipped here
    # (set 0 for the literal SPEC rule; the §5.3 filter still applies rep_frac to every text).
    rep_frac_min_words: int = 7
    creative_min_entropy: float = 2.0  # nats, mean H_t
    creative_max_tail_ppl: float = 50.0  # perplexity of the last 25% under the model (SPEC §5.3)


BASINS = ("TOKEN_COLLAPSE", "SEMANTIC_LOOP", "CREATIVE", "UNKNOWN")


@dataclass(frozen=True)
class BasinResult:
    """Basin of one generation, the rule that decided it (``reason``) and the evidence."""

    basin: str
    reason: str
    top_token: int | None  # most common id in the collapse window
    top_token_frac: float  # its count / collapse_window
    short_loop_frac: float  # longest period-1/2 stretch inside the window / window
    loop: LoopInfo | None  # the period-3..16 loop, if any
    rep_frac: float
    mean_entropy: float | None
    tail_ppl: float | None


def _longest_periodic_run(seq: list[int], period: int) -> int:
    """Length of the longest contiguous stretch of ``seq`` with period ``period`` (0 if empty)."""
    if len(seq) <= period:
        return len(seq)
    best = run = 0
    for i in range(len(seq) - period):
        run = run + 1 if seq[i] == seq[i + period] else 0
        best = max(best, run)
    return best + period


def _primitive_period(seq: list[int], loop: LoopInfo) -> LoopInfo:
    """The same periodic tail described by its smallest period (a divisor of loop.period)."""
    span = seq[loop.start :]
    for q in range(1, loop.period):
        if loop.period % q == 0 and all(span[i] == span[i + q] for i in range(len(span) - q)):
            return LoopInfo(period=q, start=loop.start, repeats=len(span) // q)
    return loop


def classify_basin(
    ids: Any,
    text: str,
    mean_entropy: float | None,
    tail_ppl: float | None,
    thresholds: BasinThresholds = BasinThresholds(),
) -> BasinResult:
    """Basin of one completion (SPEC §3.4), first rule that fires wins:

    1. TOKEN_COLLAPSE: one token id, or a period-1/2 loop (a contiguous stretch anywhere in the
       window), fills >= collapse_frac of the last ``collapse_window`` (32) ids. The share is
       counted against the full window, so a completion shorter than the window needs >= 16
       copies: a two-token answer is not a collapse.
    2. SEMANTIC_LOOP: ``detect_loop`` finds a period in [3, 16] holding over >= 3 full periods at
       the end, or rep_frac(text) >= 0.3 for a text of >= 7 words (see BasinThresholds). A
       period-1/2 run too short for rule 1 but >= 3 periods of 3..16 long (>= 9 / >= 12 tokens)
       also lands here; ``loop`` then reports its smallest period (1 or 2).
    3. CREATIVE: mean H_t >= 2.0 nats and tail perplexity < 50 (coherent).
    4. UNKNOWN: otherwise, including when mean_entropy or tail_ppl is None (not measured).

    ``ids``: the completion's token ids only (no prompt); ``text``: its decoded text;
    ``mean_entropy``: mean per-token entropy over the completion (nats); ``tail_ppl``: perplexity
    of its last 25% of tokens under the model.
    """
    th = thresholds
    seq = _as_int_list(ids)
    tail = seq[-th.collapse_window :] if th.collapse_window > 0 else []
    window = max(th.collapse_window, 1)
    if tail:
        top_token, top_count = Counter(tail).most_common(1)[0]
    else:
        top_token, top_count = None, 0
    top_frac = top_count / window
    short_frac = max(_longest_periodic_run(tail, p) for p in (1, 2)) / window
    loop = detect_loop(
        seq,
        max_period=th.loop_max_period,
        min_repeats=th.loop_min_repeats,
        min_period=th.loop_min_period,
    )
    if loop is not None:
        loop = _primitive_period(seq, loop)
    rf = rep_frac(text)
    rep_judged = len(text.split()) >= th.rep_frac_min_words
    mh = None if mean_entropy is None else float(mean_entropy)
    tp = None if tail_ppl is None else float(tail_ppl)

    def result(basin: str, reason: str) -> BasinResult:
        return BasinResult(basin, reason, top_token, top_frac, short_frac, loop, rf, mh, tp)

    if top_frac >= th.collapse_frac:
        return result(
            "TOKEN_COLLAPSE",
            f"token {top_token} fills {top_count}/{window} of the last {window} tokens",
        )
    if short_frac >= th.collapse_frac:
        return result(
            "TOKEN_COLLAPSE",
            f"a period-1/2 loop fills {round(short_frac * window)}/{window} of the last tokens",
        )
    if loop is not None:
        return result(
            "SEMANTIC_LOOP",
            f"period-{loop.period} loop x{loop.repeats} from token {loop.start}",
        )
    if rep_judged and rf >= th.rep_frac_max:
        return result("SEMANTIC_LOOP", f"rep_frac {rf:.3f} >= {th.rep_frac_max}")
    if mh is None or tp is None:
        return result("UNKNOWN", "no loop; entropy or tail perplexity not measured")
    if mh >= th.creative_min_entropy and tp < th.creative_max_tail_ppl:
        return result("CREATIVE", f"mean H {mh:.2f} nats, tail ppl {tp:.1f}")
    return result(
        "UNKNOWN",
        f"no loop, but mean H {mh:.2f} nats (creative >= {th.creative_min_entropy}) "
        f"or tail ppl {tp:.1f} (creative < {th.creative_max_tail_ppl})",
    )
