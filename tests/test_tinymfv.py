"""tinymfv evaluation (SPEC §5.6): shipped data, prompts and frames, the spliced token sequence,
the word readout against an unbatched float64 oracle, p / pmass / <F>_nats / coherence / top-1, the
steered path, the CLI and its bad-input errors."""

from __future__ import annotations

import hashlib
import json
import math
import re
from importlib import resources

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import numpy as np
import pytest
from click.testing import CliRunner

import mlx.core as mx
import mlx.nn as nn

from mlxgate import tinymfv as T
from mlxgate.cli import main
from mlxgate.errors import UserError
from mlxgate.hooks import steering
from mlxgate.prompts import chat_ids

SHA = {
    "other_violate": "68c275c23475c688d40b1826b7133fe9239e1472c51cd4839f99f5dcdd53940c",
    "self_violate": "16e2a4bcb928fa6c572b473ace8c880e367a36cc75be635bfc18a6c804b4ce2a",
}


# ----------------------------------------------------------------------------- a fake word-level world


class FakeTokenizer:
    """Specials <pad> 0, <eot> 1, <sot> 2; the 7 option words as single tokens 3..9; bytes 10..265.
    A ChatML-like template; ``continue_final_message`` cuts after the last message's content (as
    transformers does)."""

    SPECIALS = ("<pad>", "<eot>", "<sot>")
    chat_template = "fake"
    bos_token_id = None
    eos_token_ids = {1}
    eos_token_id = 1
    all_special_ids = [0, 1, 2]

    def __init__(self):
        self.pieces = list(self.SPECIALS) + list(T.OPTIONS)
        self.vocab_size = len(self.pieces) + 256

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids, i = [], 0
        while i < len(text):
            for j, piece in enumerate(self.pieces):
                if text.startswith(piece, i):
                    ids.append(j)
                    i += len(piece)
                    break
            else:
                ids.extend(len(self.pieces) + b for b in text[i].encode("utf-8"))
                i += 1
        return ids

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for k in ids:
            if k >= len(self.pieces):
                buf.append(k - len(self.pieces))
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append(self.pieces[k])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False, continue_final_message=False):
        text = "".join(f"<sot>{m['role']}\n{m['content']}<eot>\n" for m in messages)
        if continue_final_message:
            final = messages[-1]["content"]
            text = text[: text.rindex(final) + len(final)]
        elif add_generation_prompt:
            text += "<sot>assistant\n"
        return text


class EotLover(nn.Module):
    """A random 2-block llama whose raw logits favour <eot> by +8, so an unsuppressed greedy
    decode would end every turn at once."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        from mlx_lm.models import llama

        mx.random.seed(seed)
        args = llama.ModelArgs(
            model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=vocab, tie_word_embeddings=True,
        )
        self.inner = llama.Model(args)
        bias = np.zeros(vocab, dtype=np.float32)
        bias[1] = 8.0
        self.bias = mx.array(bias)
        mx.eval(self.parameters())

    @property
    def layers(self):
        return self.inner.layers

    def __call__(self, x, cache=None):
        return self.inner(x, cache=cache) + self.bias


@pytest.fixture(scope="module")
def fake():
    tok = FakeTokenizer()
    return EotLover(tok.vocab_size), tok


ROWS = [
    {"id": "r0", "foundation_coarse": "Care", "text": "You see a boy kick a dog.", **{c: 0.0 for c in T.HUMAN_COLUMNS.values()}, "human_Care": 80.0},
    {"id": "r1", "foundation_coarse": "Authority", "text": "You see a girl ignore her teacher.", **{c: 5.0 for c in T.HUMAN_COLUMNS.values()}, "human_Authority": 60.0},
    {"id": "r2", "foundation_coarse": "Social Norms", "text": "You see a man eat soup with a fork.", **{c: 1.0 for c in T.HUMAN_COLUMNS.values()}, "human_SocialNorms": 40.0},
]


def logsoftmax64(z) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def oracle_greedy(model, prompt: list[int], n: int, banned: list[int]) -> list[int]:
    """Greedy decode without a cache, one prompt at a time: full forward each step."""
    seq = list(prompt)
    for _ in range(n):
        z = np.array(model(mx.array([seq]))[0, -1]).astype(np.float64)
        z[banned] = -np.inf
        seq.append(int(z.argmax()))
    return seq[len(prompt) :]


# ----------------------------------------------------------------------------- data


def test_shipped_data_is_package_data():
    root = resources.files("mlxgate").joinpath("data/tinymfv")
    assert "Clifford" in root.joinpath("NOTICE.md").read_text(encoding="utf-8")
    for cond, sha in SHA.items():
        assert hashlib.sha256(root.joinpath(f"vignettes_classic_{cond}.jsonl").read_bytes()).hexdigest() == sha
        assert T.data_sha256(cond) == sha
    other, self_ = T.load_rows("other_violate"), T.load_rows("self_violate")
    assert len(other) == len(self_) == T.N_CLASSIC == 132
    assert [r["id"] for r in other] == [r["id"] for r in self_]
    assert other[0]["text"].startswith("You see") and not self_[0]["text"].startswith("You see")
    # Every row carries all seven human columns and a unique majority equal to its coarse label.
    for r in other:
        top = T.human_top(r)
        assert len(top) == 1
        assert top[0][:4] == r["foundation_coarse"].lower()[:4]


def test_limit_spreads_rows_and_bad_inputs():
    all_rows = T.load_rows()
    rows = T.load_rows(limit=7)
    firsts = {}
    for r in all_rows:
        firsts.setdefault(r["foundation_coarse"], r["id"])
    assert [r["id"] for r in rows] == list(firsts.values())  # the first vignette of each foundation
    rows = T.load_rows(limit=16)
    counts = {f: sum(r["foundation_coarse"] == f for r in rows) for f in firsts}
    assert sorted(counts.values()) == [2, 2, 2, 2, 2, 3, 3]  # round-robin: 16 = 7 + 7 + 2
    pos = {r["id"]: i for i, r in enumerate(all_rows)}
    assert [pos[r["id"]] for r in rows] == sorted(pos[r["id"]] for r in rows)  # file order kept
    assert len(T.load_rows(limit=500)) == 132
    with pytest.raises(UserError, match="--limit"):
        T.load_rows(limit=0)
    with pytest.raises(UserError, match="unknown tinymfv condition"):
        T.load_rows("both_violate")


# ----------------------------------------------------------------------------- prompts


def test_frames_a_in_spec_order_b_reversed():
    text = "You see a man spit on a flag."
    a, b = T.frame_prompt(text, T.FRAMES["A"]), T.frame_prompt(text, T.FRAMES["B"])
    for prompt in (a, b):
        assert prompt.startswith(text + "\n\n")
        hint = prompt[len(text) + 2 :]
        for o, g in T.GLOSSES.items():
            assert f"- {o}: {g}\n" in hint + "\n"
    spec = ["care", "fairness", "loyalty", "authority", "sanctity", "liberty", "social"]
    gloss_order = lambda p: re.findall(r"^- (\w+):", p, flags=re.M)  # noqa: E731
    assert gloss_order(a) == spec and gloss_order(b) == spec[::-1]
    assert "<one of: care, fairness, loyalty, authority, sanctity, liberty, social>" in a
    assert "<one of: social, liberty, sanctity, authority, loyalty, fairness, care>" in b


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_splice_equals_rendered_conversation(tiny_models, family):
    """P + T + S is exactly the template's rendering of the whole conversation with T as the
    assistant's text, the turn after the prefill stays open, and S ends with the prefill."""
    _, tok, _ = tiny_models[family]
    prompt = T.frame_prompt("You see a man spit on a flag.")
    p, s = T.frame_ids(tok, prompt)
    thought = "Spitting on a flag is disrespect"
    t = list(tok.encode(thought, add_special_tokens=False))
    full = chat_ids(
        tok,
        [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": thought},
            {"role": "user", "content": T.JUST_ANSWER},
            {"role": "assistant", "content": T.PREFILL},
        ],
        continue_final=True,
    )
    assert p + t + s == full
    pre = list(tok.encode(T.PREFILL, add_special_tokens=False))
    assert s[-len(pre) :] == pre
    assert not set(s[-len(pre) :]) & set(T.end_of_turn_ids(tok, s))
    assert s[0] in T.end_of_turn_ids(tok, s)  # the think turn's close is suppressed while thinking
    assert tok.decode(s).count(T.JUST_ANSWER) == 1


# ----------------------------------------------------------------------------- scoring


def test_score_aggregate_oracle():
    pa = np.array([[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.02], [0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.05]])
    pb = np.array([[0.3, 0.3, 0.1, 0.1, 0.1, 0.05, 0.01], [0.05, 0.05, 0.05, 0.7, 0.05, 0.05, 0.04]])
    sc = T.score(np.log(pa), np.log(pb))
    geo = np.sqrt(pa * pb)  # softmax of the mean log-prob is the normalised geometric mean
    p = geo / geo.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(sc["p"], p, rtol=1e-13)
    np.testing.assert_allclose(sc["score"], np.log(geo), rtol=1e-13)
    np.testing.assert_allclose(sc["pmass"], [(1.0 + 0.96) / 2, (0.95 + 0.99) / 2], rtol=1e-13)
    humans = [["care"], ["loyalty", "authority"]]  # a tie counts if the model picks either
    agg = T.aggregate(sc["p"], sc["pmass"], humans)
    for i, o in enumerate(T.OPTIONS):
        assert agg[T.NATS_KEYS[o]] == pytest.approx(math.log((p[0, i] + p[1, i]) / 2), rel=1e-13)
    assert agg["auth_nats"] == pytest.approx(math.log((p[0, 3] + p[1, 3]) / 2), rel=1e-13)
    assert agg["coherence"] == pytest.approx((0.98 + 0.97) / 2, rel=1e-13)
    assert agg["top1_agreement"] == 1.0 and agg["n_human_ties"] == 1
    agg2 = T.aggregate(sc["p"], sc["pmass"], [["fairness"], []])  # unlabelled rows are not counted
    assert agg2["top1_agreement"] == 0.0 and agg2["n_labelled"] == 1


def test_coh_cost():
    base = {"aggregates": {"coherence": 0.996, "auth_nats": -2.35}}
    later = {"coherence": 0.62, "auth_nats": -6.8}
    assert T.coh_cost(base, later) == pytest.approx(0.376 / 4.45, rel=1e-12)
    assert T.coh_cost(later, base) == pytest.approx(0.376 / 4.45, rel=1e-12)
    assert T.coh_cost(base, {"coherence": 0.9, "auth_nats": -2.35}) == math.inf
    assert math.isnan(T.coh_cost(base, base))


# ----------------------------------------------------------------------------- end to end (fake world)


def _sequences(model, tok, rows, think_tokens):
    """(P, T, S) of every (row, frame) from the oracle: unbatched, uncached greedy thinking."""
    out = []
    for row in rows:
        for frame, order in T.FRAMES.items():
            p, s = T.frame_ids(tok, T.frame_prompt(row["text"], order))
            out.append((p, oracle_greedy(model, p, think_tokens, T.end_of_turn_ids(tok, s)), s))
    return out


def test_token_sequence_think_budget_and_prefill(fake):
    model, tok = fake
    p, s = T.frame_ids(tok, T.frame_prompt(ROWS[0]["text"]))
    eot = T.end_of_turn_ids(tok, s)
    assert eot == [1]
    # Without suppression the model would close its turn at once: the suppression is what holds.
    z = np.array(model(mx.array([p]))[0, -1])
    assert int(z.argmax()) == 1
    prompts = [T.frame_ids(tok, T.frame_prompt(r["text"], o))[0] for r in ROWS for o in T.FRAMES.values()]
    thoughts = T.think(model, prompts, 6, eot)
    for prompt, t in zip(prompts, thoughts):
        assert len(t) == 6 and 1 not in t
        assert t == oracle_greedy(model, prompt, 6, eot)  # batched, left-padded == unbatched
    seq = p + thoughts[0] + s
    assert seq[-len(tok.encode(T.PREFILL)) :] == tok.encode(T.PREFILL)
    assert seq[len(p) + 6] == 1  # the turn is closed right after the think budget
    assert T.think(model, prompts[:2], 0, eot) == [[], []]


def test_evaluate_against_oracle(fake):
    model, tok = fake
    think_tokens = 5
    res = T.evaluate_tinymfv(model, tok, rows=ROWS, think_tokens=think_tokens, batch_size=4)
    opt = [tok.encode(o)[0] for o in T.OPTIONS]
    assert opt == list(range(3, 10)) and T.option_tokens(tok) == opt
    lp = {"A": [], "B": []}
    seqs = _sequences(model, tok, ROWS, think_tokens)
    for k, (p, t, s) in enumerate(seqs):
        z = np.array(model(mx.array([p + t + s]))[0, -1])  # unbatched, no cache, no padding
        lp["AB"[k % 2]].append(logsoftmax64(z)[opt])
    la, lb = np.array(lp["A"]), np.array(lp["B"])
    assert np.abs(la - lb).max() > 1e-3  # the frames really differ
    s_avg = (la + lb) / 2
    p = np.exp(s_avg - s_avg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pmass = (np.exp(la).sum(1) + np.exp(lb).sum(1)) / 2
    for r, row in enumerate(res["rows"]):
        np.testing.assert_allclose([row["lp_A"][o] for o in T.OPTIONS], la[r], atol=2e-5)
        np.testing.assert_allclose([row["lp_B"][o] for o in T.OPTIONS], lb[r], atol=2e-5)
        np.testing.assert_allclose([row["p"][o] for o in T.OPTIONS], p[r], rtol=1e-4)
        assert row["pmass"] == pytest.approx(pmass[r], rel=1e-4)
        assert row["model_top"] == T.OPTIONS[int(p[r].argmax())]
        assert row["think_A"] == tok.decode(seqs[2 * r][1]) and row["think_B"] == tok.decode(seqs[2 * r + 1][1])
    agg = res["aggregates"]
    for i, o in enumerate(T.OPTIONS):
        assert agg[T.NATS_KEYS[o]] == pytest.approx(math.log(p[:, i].mean()), abs=1e-4)
    assert agg["coherence"] == pytest.approx(pmass.mean(), rel=1e-4)
    agree = [T.OPTIONS[int(p[r].argmax())] == T.human_top(ROWS[r])[0] for r in range(3)]
    assert agg["top1_agreement"] == pytest.approx(np.mean(agree))
    st = res["settings"]
    assert st["readout"] == "word" and st["shared_first_tokens"] == {}
    assert st["option_tokens"]["authority"] == {"id": 6, "token": "authority"}
    assert st["frames"]["B"] == list(T.OPTIONS[::-1]) and st["suppressed_ids"] == [1]
    # Batch size does not change the numbers (left padding is masked).
    res1 = T.evaluate_tinymfv(model, tok, rows=ROWS, think_tokens=think_tokens, batch_size=1)
    for r1, r4 in zip(res1["rows"], res["rows"]):
        assert r1["think_A"] == r4["think_A"]
        np.testing.assert_allclose(list(r1["lp_B"].values()), list(r4["lp_B"].values()), atol=2e-5)


def test_steered_evaluation(fake):
    model, tok = fake
    rng = np.random.default_rng(0)
    vec = {1: rng.standard_normal(32).astype(np.float32)}
    plain = T.evaluate_tinymfv(model, tok, rows=ROWS[:1], think_tokens=3)
    zero = T.evaluate_tinymfv(model, tok, rows=ROWS[:1], think_tokens=3, steer={"vectors": vec, "coeff": 0.0})
    res = T.evaluate_tinymfv(model, tok, rows=ROWS[:1], think_tokens=3, steer={"vectors": vec, "coeff": 2.0})
    np.testing.assert_allclose(list(zero["rows"][0]["lp_A"].values()), list(plain["rows"][0]["lp_A"].values()), atol=1e-6)
    assert res["settings"]["steer"] == {"layers": [1], "coeff": 2.0}
    with steering(model, {1: mx.array(vec[1])}, 2.0):
        seqs = _sequences(model, tok, ROWS[:1], 3)
        opt = T.option_tokens(tok)
        want = [logsoftmax64(np.array(model(mx.array([p + t + s]))[0, -1]))[opt] for p, t, s in seqs]
    got = [list(res["rows"][0][f"lp_{f}"].values()) for f in "AB"]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(np.array(got) - np.array([list(plain["rows"][0][f"lp_{f}"].values()) for f in "AB"])).max() > 1e-3
    # The hooks are off again after the evaluation.
    again = T.evaluate_tinymfv(model, tok, rows=ROWS[:1], think_tokens=3)
    assert again["rows"][0]["lp_A"] == pytest.approx(plain["rows"][0]["lp_A"], abs=1e-6)
    with pytest.raises(UserError, match="layers \\[7\\]"):
        T.evaluate_tinymfv(model, tok, rows=ROWS[:1], think_tokens=1, steer={"vectors": {7: vec[1]}, "coeff": 1.0})


def test_evaluate_bad_inputs(fake):
    model, tok = fake
    with pytest.raises(UserError, match="unknown tinymfv condition"):
        T.evaluate_tinymfv(model, tok, rows=ROWS, condition="others")
    with pytest.raises(UserError, match="--think-tokens"):
        T.evaluate_tinymfv(model, tok, rows=ROWS, think_tokens=-1)
    with pytest.raises(UserError, match="--batch-size"):
        T.evaluate_tinymfv(model, tok, rows=ROWS, batch_size=0)
    with pytest.raises(UserError, match="no tinymfv rows"):
        T.evaluate_tinymfv(model, tok, rows=[])


# ----------------------------------------------------------------------------- real fixture checkpoints


def test_gemma3_fixture_sliding_window_readout(tiny_models):
    """Sequences far longer than the 16-token sliding window, batched and left-padded, match the
    unbatched uncached forward; byte-level tokenizers share first tokens and say so."""
    model, tok, _ = tiny_models["gemma3_text"]
    rows = ROWS[:2]
    res = T.evaluate_tinymfv(model, tok, rows=rows, think_tokens=4, batch_size=3)
    assert res["settings"]["shared_first_tokens"] == {"l": ["loyalty", "liberty"], "s": ["sanctity", "social"]}
    opt = T.option_tokens(tok)
    for k, (p, t, s) in enumerate(_sequences(model, tok, rows, 4)):
        z = np.array(model(mx.array([p + t + s]))[0, -1])
        got = res["rows"][k // 2][f"lp_{'AB'[k % 2]}"]
        np.testing.assert_allclose([got[o] for o in T.OPTIONS], logsoftmax64(z)[opt], atol=5e-5)


# ----------------------------------------------------------------------------- CLI


def test_cli_json_and_table(tiny_dirs, tmp_path):
    out = tmp_path / "mfv.json"
    args = ["eval", "tinymfv", "--model", tiny_dirs["llama"], "--limit", "2", "--think-tokens", "2", "--batch-size", "4"]
    r = CliRunner().invoke(main, [*args, "--format", "json", "--out", str(out)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 2 and res["settings"]["n_rows"] == 2 and res["settings"]["limit"] == 2
    assert res["settings"]["model"]["model_type"] == "llama" and res["settings"]["readout"] == "word"
    assert set(T.NATS_KEYS.values()) <= set(res["aggregates"]) and 0 < res["aggregates"]["coherence"] <= 1
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "auth_nats" in r.output and "coherence" in r.output and "readout: word" in r.output


def test_cli_bad_inputs(tiny_dirs, tmp_path):
    from mlxgate.steer import extract as E

    run = lambda *a: CliRunner().invoke(main, ["eval", "tinymfv", "--model", tiny_dirs["llama"], *a])  # noqa: E731
    for args, msg in (
        (["--limit", "0"], "--limit must be at least 1"),
        (["--condition", "both"], "unknown tinymfv condition"),
        (["--think-tokens", "-3"], "--think-tokens"),
        (["--coeff", "0.5"], "--coeff needs --vector"),
    ):
        r = run(*args)
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    # A vector extracted from another model (hidden size 32, not 64).
    sv = E.SteeringVector({1: np.ones(32, np.float32)}, {"model": "other", "model_type": "llama", "n_layers": 4, "hidden_size": 32})
    path = E.save(sv, tmp_path / "v.safetensors")
    r = run("--vector", str(path), "--coeff", "1.0", "--limit", "1")
    assert r.exit_code == 2 and "hidden size 32" in r.output
    r = run("--vector", str(path), "--coeff", "abc", "--limit", "1")
    assert r.exit_code == 2 and "--coeff must be a number" in r.output


# ----------------------------------------------------------------------------- the embedded instruct model


def _llama_last_logits(model, seq: list[int]) -> np.ndarray:
    """Last-position logits of an mlx-lm llama without a cache or padding, applying the head to
    that one position only (the full [L, V] head is most of a 135M model's forward)."""
    h = model.model(mx.array([seq]))[:, -1]
    head = model.model.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head
    return np.array(head(h)[0]).astype(np.float64)


@pytest.mark.slow
def test_smollm_word_readout_and_oracle(smollm):
    """SmolLM2's option tokens are distinct word pieces; the batched readout of a real model matches
    the unbatched forward, and the thinking never closes the turn."""
    model, tok, _ = smollm
    pieces = {o: tok.decode([i]) for o, i in zip(T.OPTIONS, T.option_tokens(tok))}
    assert pieces == {"care": "care", "fairness": "fair", "loyalty": "l", "authority": "author", "sanctity": "san", "liberty": "lib", "social": "social"}
    rows = T.load_rows(limit=1)
    n = 3
    res = T.evaluate_tinymfv(model, tok, rows=rows, think_tokens=n, batch_size=2)
    assert res["settings"]["suppressed_ids"] == [2]  # <|im_end|>, SmolLM2's EOS and end-of-turn
    opt = T.option_tokens(tok)
    for k, (frame, order) in enumerate(T.FRAMES.items()):
        p, s = T.frame_ids(tok, T.frame_prompt(rows[0]["text"], order))
        t = []
        for _ in range(n):  # uncached greedy with <|im_end|> banned
            z = _llama_last_logits(model, p + t)
            z[2] = -np.inf
            t.append(int(z.argmax()))
        assert res["rows"][0][f"think_{frame}"] == tok.decode(t)
        got = res["rows"][0][f"lp_{frame}"]
        want = logsoftmax64(_llama_last_logits(model, p + t + s))[opt]
        np.testing.assert_allclose([got[o] for o in T.OPTIONS], want, atol=2e-3)
    assert 0.0 < res["aggregates"]["coherence"] <= 1.0


def test_cli_adapters_and_vector_match_library(tiny_dirs, tmp_path):
    """--adapters folds the rounds like mlx-lm's own adapter loading; --vector/--coeff steer like
    the library's steer=dict(vectors, coeff)."""
    from _adapter_fixture import make_adapter

    from mlxgate.models import load
    from mlxgate.steer import extract as E

    src = tiny_dirs["llama"]
    adapter = make_adapter(src, tmp_path / "ad", b_std=0.2)
    vec = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    path = E.save(E.SteeringVector({2: vec}, {"model": src, "model_type": "llama", "n_layers": 4, "hidden_size": 64}), tmp_path / "v.safetensors")
    args = ["eval", "tinymfv", "--model", src, "--limit", "1", "--think-tokens", "2", "--format", "json"]

    def cli(*extra):
        out = tmp_path / "o.json"
        r = CliRunner().invoke(main, [*args, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())

    rows = T.load_rows(limit=1)
    lp = lambda res: np.array([list(res["rows"][0][f"lp_{f}"].values()) for f in "AB"])  # noqa: E731
    model, tok, _ = load(src, adapter_path=str(adapter))
    adapted = cli("--adapters", str(adapter))
    assert adapted["settings"]["adapted_modules"] > 0
    np.testing.assert_allclose(lp(adapted), lp(T.evaluate_tinymfv(model, tok, rows=rows, think_tokens=2)), atol=1e-4)
    model, tok, _ = load(src)
    plain = cli()
    assert np.abs(lp(adapted) - lp(plain)).max() > 1e-3
    steered = cli("--vector", str(path), "--coeff", "3")
    assert steered["settings"]["steer"] == {"layers": [2], "coeff": 3.0}
    want = T.evaluate_tinymfv(model, tok, rows=rows, think_tokens=2, steer={"vectors": {2: vec}, "coeff": 3.0})
    np.testing.assert_allclose(lp(steered), lp(want), atol=1e-4)
    assert np.abs(lp(steered) - lp(plain)).max() > 1e-3
