"""The steered-completion filter (SPEC §5.3 + the token-loop check of §5.8): keep only completions
that are coherent, not repetitive, enact the trait rather than narrate it, and are not boilerplate.

All five checks must pass:

1. coherence: perplexity of the last 25% of completion tokens under the *unsteered base* model
   (teacher-forced on the unsteered prompt + completion, hooks off) < 50;
2. repetition: ``rep_frac(text) < 0.3`` (SPEC §3.4);
3. verbalisation: no first-person trait narration (case-insensitive regex);
4. refusal / identity boilerplate: none of a list of substrings;
5. token loop: ``detect_loop(completion_ids)`` finds no period <= 16 repeating >= 3 times at the
   end (§5.8: the original's loops passed its filter at perplexity 2-17 and rep_frac 0.04-0.27,
   so a low-perplexity loop must be caught by this check, not the other four).

Every completion gets its scores and, when dropped, every failed check as the reason. Data rows
(JSONL, read by heal): ``{"prompt", "completion", "prompt_ids", "completion_ids", "coeff",
"kappa", ...}``; the filter adds ``"scores"``, ``"kept"`` and, for drops, ``"reason"``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from mlxgate.analysis.loops import detect_loop, rep_frac
from mlxgate.errors import UserError
from mlxgate.measure import tail_perplexity

# SPEC §5.3 thresholds.
MAX_TAIL_PPL = 50.0
MAX_REP_FRAC = 0.3
# SPEC §3.4 / §5.8 token-loop detector.
LOOP_MAX_PERIOD = 16
LOOP_MIN_REPEATS = 3

# SPEC §5.3.3 ("narrate, don't enact"): first-person narration of the persona. The SPEC's examples
# plus their obvious variants ("i'm", "as a person who") and the neg pole's narration (a negative
# coefficient steers towards it).
VERBALISE_PATTERNS = (
    r"\b(i am|i'm) (someone|a person|the kind of person|the type of person) who\b",
    r"\bas (someone|a person) who\b",
    r"\bi (don't|do not|never|won't|will not) (blindly )?(defer|obey)\b",
    r"\bmy (core )?principles?\b",
    r"\bi always stick to\b",
    r"\bi refuse to (blindly )?(defer|obey)\b",
    r"\bi (always )?defer to (authority|those in authority|my superiors)\b",
    r"\bi (always )?(put|place) (others'|other people's|people's) wellbeing\b",
)
VERBALISE_RE = re.compile("|".join(f"(?:{p})" for p in VERBALISE_PATTERNS), re.IGNORECASE)

# SPEC §5.3.4: refusal / assistant-identity boilerplate (lowercase substrings).
REFUSAL_SUBSTRINGS = (
    "as an ai",
    "as a language model",
    "as an artificial intelligence",
    "i'm an ai",
    "i am an ai",
    "i cannot assist",
    "i can't assist",
    "i can't help with",
    "i cannot help with",
    "i must decline",
    "i am unable to",
    "i'm unable to",
    "i'm sorry, but i can't",
    "i'm sorry, but i cannot",
)

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def _normalise(text: str) -> str:
    """Lowercase with typographic apostrophes made plain, so "I’m" matches "i'm"."""
    return text.translate(_APOSTROPHES).lower()


def verbalisation(text: str) -> str | None:
    """The first trait-narration phrase in ``text`` (lowercased), or None."""
    m = VERBALISE_RE.search(_normalise(text))
    return m.group(0) if m else None


def refusal(text: str) -> str | None:
    """The first refusal/identity boilerplate substring in ``text``, or None."""
    low = _normalise(text)
    for s in REFUSAL_SUBSTRINGS:
        if s in low:
            return s
    return None


@dataclass(frozen=True)
class FilterThresholds:
    """The filter's parameters (SPEC §5.3 defaults)."""

    max_tail_ppl: float = MAX_TAIL_PPL
    max_rep_frac: float = MAX_REP_FRAC
    loop_max_period: int = LOOP_MAX_PERIOD
    loop_min_repeats: int = LOOP_MIN_REPEATS


def completion_nll(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """-log p(completion token | prompt, earlier completion tokens) per completion token (nats),
    teacher-forced under ``model`` with no hook active (the unsteered base)."""
    from mlxgate.generate import score_tokens
    from mlxgate.hooks import layers

    for block in layers(model):
        state = getattr(block, "_mlxgate_hook", None)
        if state is not None and state.add is not None:
            raise RuntimeError("coherence must be scored under the unsteered model, but a steering hook is active")
    nll = score_tokens(model, list(prompt_ids) + list(completion_ids))["nll"]
    return [float(x) for x in nll[len(nll) - len(completion_ids) :]]


def score(model, row: dict, thresholds: FilterThresholds = FilterThresholds()) -> tuple[dict, list[str]]:
    """Scores of one completion and the reasons it fails (empty list = kept).

    scores: ``tail_ppl`` (perplexity of the last 25% of completion tokens under ``model``),
    ``mean_nll`` (nats/token over the completion), ``rep_frac``, ``loop`` ({period, start,
    repeats} or None), ``verbalised`` and ``refusal`` (the matched phrase or None), ``n_tokens``.
    """
    th = thresholds
    text, ids = row["completion"], row["completion_ids"]
    scores: dict = {"n_tokens": len(ids)}
    reasons: list[str] = []
    if not ids:
        scores.update(tail_ppl=None, mean_nll=None, rep_frac=rep_frac(text), loop=None, verbalised=None, refusal=None)
        return scores, ["empty completion"]
    nll = completion_nll(model, row["prompt_ids"], ids)
    scores["tail_ppl"] = tail_perplexity(nll)
    scores["mean_nll"] = float(sum(nll) / len(nll))
    scores["rep_frac"] = rep_frac(text)
    loop = detect_loop(ids, max_period=th.loop_max_period, min_repeats=th.loop_min_repeats)
    scores["loop"] = asdict(loop) if loop else None
    scores["verbalised"] = verbalisation(text)
    scores["refusal"] = refusal(text)
    if not (scores["tail_ppl"] < th.max_tail_ppl):  # also catches nan
        reasons.append(f"incoherent: tail perplexity {scores['tail_ppl']:.1f} >= {th.max_tail_ppl:g}")
    if scores["rep_frac"] >= th.max_rep_frac:
        reasons.append(f"repetitive: rep_frac {scores['rep_frac']:.3f} >= {th.max_rep_frac:g}")
    if loop:
        reasons.append(f"token loop: period {loop.period} x{loop.repeats} from token {loop.start}")
    if scores["verbalised"]:
        reasons.append(f"verbalises the trait: {scores['verbalised']!r}")
    if scores["refusal"]:
        reasons.append(f"refusal/identity boilerplate: {scores['refusal']!r}")
    return scores, reasons


def filter_rows(
    model,
    rows: Iterable[dict],
    thresholds: FilterThresholds = FilterThresholds(),
    on_row: Callable[[int, dict], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Split data rows into (kept, dropped); each output row is the input plus ``scores``,
    ``kept`` and (dropped only) ``reason`` (every failed check, joined by "; ").

    Under ``mlx.launch`` each rank scores a contiguous block of the rows (each row is scored on
    its own, so the scores equal one process's) and every rank gets all of them, in input order.
    ``on_row(i, row)`` is called for this rank's rows, ``i`` indexing ``rows``."""
    from mlxgate import distributed

    rows = list(rows)
    mine, local = distributed.shard(rows)
    scored = []
    for i, row in zip(mine, local):
        scores, reasons = score(model, row, thresholds)
        out = {**row, "scores": scores, "kept": not reasons}
        if reasons:
            out["reason"] = "; ".join(reasons)
        else:
            out.pop("reason", None)
        scored.append(out)
        if on_row:
            on_row(i, out)
    scored = distributed.gather_ordered(scored, mine, all_ranks=True, what="gathering filter scores")
    kept = [r for r in scored if r["kept"]]
    dropped = [r for r in scored if not r["kept"]]
    return kept, dropped


# ----------------------------------------------------------------------------- data files

REQUIRED = {"prompt": str, "completion": str, "prompt_ids": list, "completion_ids": list}


def _valid_ids(ids) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)


def read_rows(path: str | Path) -> list[dict]:
    """Completion rows from a JSONL file; an unreadable, empty or malformed file is a UserError
    naming the line."""
    from mlxgate.io import read_jsonl

    rows = []
    for no, row in read_jsonl(path, "data file"):
        for key, typ in REQUIRED.items():
            if not isinstance(row.get(key), typ):
                raise UserError(f"{path}:{no}: field {key!r} missing or not a {typ.__name__}; rows come from `mlxgate steer generate`")
        if not row["prompt_ids"] or not _valid_ids(row["prompt_ids"]) or not _valid_ids(row["completion_ids"]):
            raise UserError(f"{path}:{no}: prompt_ids / completion_ids must be lists of token ids (prompt_ids non-empty)")
        for key in ("coeff", "kappa"):
            if row.get(key) is not None and (not isinstance(row[key], (int, float)) or not math.isfinite(row[key])):
                raise UserError(f"{path}:{no}: {key!r} must be a finite number")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no completions")
    return rows


def check_vocab(rows: list[dict], vocab_size: int, path: str = "data") -> None:
    """UserError if any token id is outside the model's vocabulary (data made with another model)."""
    for i, row in enumerate(rows, 1):
        ids = list(row["prompt_ids"]) + list(row["completion_ids"])
        if not ids:
            continue
        top = max(ids)
        if min(ids) < 0:
            raise UserError(f"{path}: row {i} has a negative token id ({min(ids)})")
        if top >= vocab_size:
            raise UserError(f"{path}: row {i} has token id {top} >= this model's vocabulary ({vocab_size}); was it made with another model?")


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSONL atomically."""
    from mlxgate.io import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


__all__ = [
    "FilterThresholds",
    "REFUSAL_SUBSTRINGS",
    "VERBALISE_RE",
    "check_vocab",
    "completion_nll",
    "filter_rows",
    "read_rows",
    "refusal",
    "score",
    "verbalisation",
    "write_rows",
]
