"""measure: entropy against a float64 oracle, per-prompt statistics, batching, teacher forcing, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
from mlxgate import measure as M
from mlxgate import ops
from mlxgate.errors import UserError
from mlxgate.generate import full_sequence_entropy, generate
from mlxgate.prompts import prompt_ids


def np_entropy(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def test_entropy_matches_float64_oracle_on_model_logits(tiny_models):
    model, tok, _ = tiny_models["llama"]
    logits = model(mx.array([prompt_ids(tok, "oracle check", raw=True)]))[0]
    got = np.array(ops.entropy(logits))
    np.testing.assert_allclose(got, np_entropy(np.array(logits)), rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_batched_equals_unbatched_and_cache_equals_recompute(tiny_models, family):
    model, tok, _ = tiny_models[family]
    # Lengths differ a lot, so left padding matters; gemma's window (16) is crossed.
    prompts = [prompt_ids(tok, p) for p in ("a", "a much longer prompt than the first one", "mid length")]
    batched = generate(model, prompts, 24, eos_ids=set())
    for p, b in zip(prompts, batched):
        single = generate(model, [p], 24, eos_ids=set())[0]
        assert single.tokens == b.tokens
        np.testing.assert_allclose(single.entropy, b.entropy, atol=1e-4)
        np.testing.assert_allclose(single.entropy, full_sequence_entropy(model, p, single.tokens), atol=1e-4)


def test_measure_prompts_statistics(tiny_models):
    model, tok, _ = tiny_models["mistral"]
    report = M.measure_prompts(model, tok, ["first prompt", "second"], max_tokens=12, zones="cer")
    assert len(report["prompts"]) == 2
    for row in report["prompts"]:
        h = np.array(row["entropy"])
        assert row["n"] == len(row["token_ids"]) == len(h) == len(row["tokens"])
        assert row["mean"] == pytest.approx(h.mean()) and row["std"] == pytest.approx(h.std())
        assert row["min"] == pytest.approx(h.min()) and row["max"] == pytest.approx(h.max())
        assert row["zone"] in ("LASER", "CAGE", "LANTERN", "CHAOS")
    pooled = np.concatenate([r["entropy"] for r in report["prompts"]])
    o = report["overall"]
    assert o["pooled"]["n"] == pooled.size and o["pooled"]["mean"] == pytest.approx(pooled.mean())
    assert o["prompt_means"]["mean"] == pytest.approx(np.mean([r["mean"] for r in report["prompts"]]))
    assert sum(o["zone_counts"].values()) == pooled.size
    json.dumps(report)


def test_measure_text_nll_matches_numpy(tiny_models):
    model, tok, _ = tiny_models["gemma3_text"]
    text = "teacher forcing over a text that is longer than the sliding window of sixteen"
    report = M.measure_text(model, tok, text)
    ids = report["token_ids"]
    logits = np.array(model(mx.array([ids]))[0]).astype(np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(report["nll"], nll, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(report["entropy"], np_entropy(logits)[:-1], rtol=1e-4)
    assert report["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-4)


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\n two \n")
    assert M.load_prompts_file(txt) == ["one", " two "]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a"}\n{"prompt": "b", "x": 1}\n')
    assert M.load_prompts_file(jl) == ["a", "b"]
    jl.write_text('{"prompt": "a"}\n{not json}\n')
    with pytest.raises(UserError, match=":2: not valid JSON"):
        M.load_prompts_file(jl)
    jl.write_text('{"text": "a"}\n')
    with pytest.raises(UserError, match="prompt"):
        M.load_prompts_file(jl)


def test_tail_perplexity():
    assert M.tail_perplexity([]) is None
    assert M.tail_perplexity([9.0, 9.0, 9.0, 1.0]) == pytest.approx(np.e)  # last 25% of 4 = 1 position
    assert M.tail_perplexity([0.0] * 6 + [2.0, 2.0]) == pytest.approx(np.exp(2.0))


def test_cli_json_and_plot(tiny_dirs, tmp_path):
    from click.testing import CliRunner

    from mlxgate.cli import main

    out, png = tmp_path / "m.json", tmp_path / "m.png"
    result = CliRunner().invoke(
        main, ["measure", "--model", tiny_dirs["llama"], "-p", "hello", "-p", "world", "--max-tokens", "8", "--format", "json", "--out", str(out), "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["prompt"] for r in report["prompts"]] == ["hello", "world"]
    assert all(r["n"] == 8 for r in report["prompts"])  # the tiny model has no EOS preference
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = CliRunner().invoke(main, ["measure", "--model", tiny_dirs["llama"], "-p", "hello", "--max-tokens", "4", "--format", "jsonl"])
    lines = [json.loads(l) for l in result.output.strip().splitlines()]
    assert lines[0]["index"] == 0 and "overall" in lines[-1]
