"""The steered-completion filter (SPEC §5.3 + §5.8 token loops), data files, and collect."""

from __future__ import annotations

import json
import math

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import numpy as np
import pytest

import mlx.core as mx

from mlxgate import filter as F
from mlxgate.errors import UserError
from mlxgate.hooks import steering
from mlxgate.prompts import prompt_ids
from mlxgate.steer import collect as K
from mlxgate.steer import extract as E

NATURAL = (
    "I would talk to my manager first and explain what I saw on the floor, then write it down with the date and "
    "time so there is a record. If nothing changes after a week, the next step is the safety officer, because "
    "people could get hurt and that matters more than the numbers on the board this month."
)
LENIENT = F.FilterThresholds(max_tail_ppl=math.inf)
# Random tiny models write random bytes (rep_frac 1.0 for a one-"word" text): pass everything.
ANYTHING = F.FilterThresholds(max_tail_ppl=math.inf, max_rep_frac=2.0, loop_min_repeats=10**6)


# ----------------------------------------------------------------------------- text checks


@pytest.mark.parametrize(
    "text",
    [
        "Well, I am someone who always looks out for others.",
        "I\u2019m a person who cares.",  # typographic apostrophe
        "As someone who values wellbeing, I'd say no.",
        "I don't defer to anyone.",
        "I do not blindly obey orders.",
        "It goes against my principles.",
        "I always stick to what is right.",
        "I refuse to obey that order.",
        "I ALWAYS DEFER TO AUTHORITY.",
    ],
)
def test_verbalisation_hits(text):
    assert F.verbalisation(text) is not None


@pytest.mark.parametrize(
    "text",
    [NATURAL, "She is someone who helps.", "You should not defer the payment.", "The principal said no.", "I stick around."],
)
def test_verbalisation_misses(text):
    assert F.verbalisation(text) is None


@pytest.mark.parametrize(
    "text,hit",
    [
        ("As an AI, I have no feelings.", "as an ai"),
        ("Sorry, as a language model I can't.", "as a language model"),
        ("I cannot assist with that request.", "i cannot assist"),
        ("I can\u2019t help with this.", "i can't help with"),
        ("I must decline.", "i must decline"),
        ("I am unable to do that.", "i am unable to"),
        (NATURAL, None),
        ("The AI said hello.", None),
    ],
)
def test_refusal(text, hit):
    assert F.refusal(text) == hit


# ----------------------------------------------------------------------------- coherence score


def test_completion_nll_matches_float64_oracle(tiny_models):
    model, tok, _ = tiny_models["gemma3_text"]
    p = prompt_ids(tok, "Hello there")
    c = list(tok.encode(" a short answer", add_special_tokens=False))
    got = np.array(F.completion_nll(model, p, c))
    logits = np.array(model(mx.array([p + c]))[0].astype(mx.float32)).astype(np.float64)
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    oracle = np.array([-logp[len(p) - 1 + i, t] for i, t in enumerate(c)])
    np.testing.assert_allclose(got, oracle, atol=2e-4)
    row = {"prompt": "Hello there", "completion": " a short answer", "prompt_ids": p, "completion_ids": c}
    scores, reasons = F.score(model, row)
    k = math.ceil(len(c) * 0.25)
    assert scores["tail_ppl"] == pytest.approx(math.exp(oracle[-k:].mean()), rel=1e-3)
    assert scores["mean_nll"] == pytest.approx(oracle.mean(), rel=1e-3)
    # The decision follows the computed perplexity (a random model is far above 50).
    assert (scores["tail_ppl"] >= 50) == any(r.startswith("incoherent") for r in reasons)


def test_coherence_refuses_to_score_under_steering(tiny_models):
    model, tok, _ = tiny_models["llama"]
    p = prompt_ids(tok, "Hi")
    with steering(model, {1: mx.ones((64,))}, 1.0):
        with pytest.raises(RuntimeError, match="unsteered"):
            F.completion_nll(model, p, [40, 41])


def _row(tok, text, ids=None, prompt="Hi"):
    return {
        "prompt": prompt,
        "completion": text,
        "prompt_ids": prompt_ids(tok, prompt),
        "completion_ids": list(tok.encode(text, add_special_tokens=False)) if ids is None else ids,
        "coeff": 0.5,
        "kappa": 1.0,
    }


def test_filter_reasons_for_each_check(tiny_models):
    model, tok, _ = tiny_models["llama"]
    looped = NATURAL + " ok ok ok ok"  # byte tokens: " ok" is a period-3 loop x4 at the end
    rows = [
        _row(tok, NATURAL),
        _row(tok, looped),
        _row(tok, "I am someone who cares. " + NATURAL),
        _row(tok, NATURAL + " As an AI I cannot assist."),
        _row(tok, "ha ha ha ha ha ha ha ha ha ha"),
        _row(tok, "", ids=[]),
    ]
    kept, dropped = F.filter_rows(model, rows, LENIENT)
    assert [r["completion"] for r in kept] == [NATURAL]
    assert kept[0]["kept"] is True and "reason" not in kept[0]
    assert kept[0]["scores"]["loop"] is None and kept[0]["scores"]["rep_frac"] < 0.3
    by_text = {r["completion"]: r for r in dropped}
    loop_row = by_text[looped]
    # The §5.8 case: low rep_frac (passes the repetition check) but the loop detector catches it.
    assert loop_row["scores"]["rep_frac"] < 0.3 and loop_row["reason"] == "token loop: period 3 x4 from token %d" % (len(loop_row["completion_ids"]) - 12)
    assert loop_row["scores"]["loop"] == {"period": 3, "start": len(loop_row["completion_ids"]) - 12, "repeats": 4}
    assert by_text["I am someone who cares. " + NATURAL]["reason"] == "verbalises the trait: 'i am someone who'"
    assert by_text[NATURAL + " As an AI I cannot assist."]["reason"] == "refusal/identity boilerplate: 'as an ai'"
    ha = by_text["ha ha ha ha ha ha ha ha ha ha"]["reason"].split("; ")
    assert ha[0].startswith("repetitive: rep_frac") and ha[1].startswith("token loop: period 3")
    assert by_text[""]["reason"] == "empty completion" and by_text[""]["kept"] is False


def test_filter_default_threshold_drops_random_model_text(tiny_models):
    model, tok, _ = tiny_models["llama"]
    kept, dropped = F.filter_rows(model, [_row(tok, NATURAL)])
    assert not kept and dropped[0]["reason"].startswith("incoherent: tail perplexity")
    assert dropped[0]["scores"]["tail_ppl"] > 50


# ----------------------------------------------------------------------------- data files


def test_rows_roundtrip_and_bad_files(tiny_models, tmp_path):
    _, tok, _ = tiny_models["llama"]
    rows = [_row(tok, NATURAL), _row(tok, "Fine.")]
    path = tmp_path / "g.jsonl"
    F.write_rows(path, rows)
    assert F.read_rows(path) == rows
    cases = {
        "": "holds no completions",
        "{not json\n": "g.jsonl:1: not valid JSON",
        '[1, 2]\n': "must be a JSON object",
        json.dumps({**rows[0], "completion_ids": "abc"}) + "\n": "'completion_ids' missing or not a list",
        json.dumps({**rows[0], "prompt_ids": []}) + "\n": "prompt_ids non-empty",
        json.dumps({**rows[0], "completion_ids": [1, -2]}) + "\n": "lists of token ids",
        json.dumps(rows[0]) + "\n" + json.dumps({**rows[0], "coeff": "big"}) + "\n": "g.jsonl:2: 'coeff' must be a finite number",
    }
    for text, match in cases.items():
        path.write_text(text)
        with pytest.raises(UserError, match=match):
            F.read_rows(path)
    with pytest.raises(UserError, match="not found"):
        F.read_rows(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="vocabulary"):
        F.check_vocab([{**rows[0], "completion_ids": [10**6]}], 300)


# ----------------------------------------------------------------------------- collect (walk-C + filter)


@pytest.fixture(scope="module")
def llama_vector(tiny_models):
    model, tok, info = tiny_models["llama"]
    return E.extract(model, tok, ["Hi", "What is rain?", "Tell me a story."], [1, 2], info=info)


def test_collect_rows_format_and_alpha_mix(tiny_models, llama_vector):
    model, tok, _ = tiny_models["llama"]
    contexts = ["Hi", "What is rain?", "Tell me a story.", "Plan my day."]
    res = K.settle_and_collect(model, tok, llama_vector, contexts, n_keep=5, batch_n=6, min_keep=3, kappa=0.8, max_tokens=6, seed=1, thresholds=ANYTHING)
    assert res.kappa == 0.8 and res.batches == 1 and res.walk.steps == 0
    assert len(res.kept) + len(res.dropped) >= 5 and len(res.kept) <= 5
    for i, row in enumerate(res.kept + res.dropped):
        assert row["prompt"] in contexts
        assert row["prompt_ids"] == prompt_ids(tok, row["prompt"])  # the unsteered prompt, no persona
        assert row["alpha"] in K.ALPHAS and row["coeff"] == pytest.approx(row["alpha"] * 0.8)
        assert row["kappa"] == 0.8 and tok.decode(row["completion_ids"]) == row["completion"]
        assert not set(row["completion_ids"]) & set(tok.eos_token_ids)
        assert set(row["scores"]) >= {"tail_ppl", "rep_frac", "loop"}
        assert row["kept"] == ("reason" not in row)
    assert K.alpha_mix(6) == [0.5, 0.75, 1.0, 0.5, 0.75, 1.0]


def test_collect_walks_then_fails_clearly_when_nothing_passes(tiny_models, llama_vector):
    model, tok, _ = tiny_models["llama"]
    events = []
    res = K.settle_and_collect(model, tok, llama_vector, ["Hi", "What is rain?"], n_keep=4, min_keep=2, probe_n=3, max_tokens=3, seed=0, thresholds=ANYTHING, on_event=events.append)
    assert res.walk.steps == 6 and res.kappa > 1.0 / 1.05  # every probe passes: κ climbs to the top
    assert [e["stage"] for e in events][:7] == ["walk"] * 6 + ["settled"]
    assert len(res.probes) == 18 and len(res.kept) == 4
    strict = F.FilterThresholds(max_tail_ppl=0.0)
    with pytest.raises(K.CollectError, match="only 0 of 6 steered completions passed") as err:
        K.settle_and_collect(model, tok, llama_vector, ["Hi"], n_keep=4, batch_n=2, max_batches=3, min_keep=2, kappa=0.5, max_tokens=3, thresholds=strict)
    assert isinstance(err.value, UserError) and err.value.result.batches == 3 and len(err.value.result.dropped) == 6
