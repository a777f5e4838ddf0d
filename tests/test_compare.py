"""compare: KL(A‖B) per position against a float64 oracle, aggregates against numpy, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

import mlx.core as mx
from _adapter_fixture import make_adapter, perturbed_copy
from mlxgate import compare as C
from mlxgate.cli import main
from mlxgate.prompts import prompt_ids



def np_kl(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """float64 KL(softmax(za) ‖ softmax(zb)) over the last axis."""

    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(za), log_softmax(zb)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_aggregates(kl) -> dict:
    kl = np.asarray(kl, dtype=np.float64)
    return {"mean": kl.mean(), "rmse": math.sqrt(np.mean(kl**2)), "p95": np.percentile(kl, 95), "max": kl.max()}


@pytest.fixture(scope="module")
def dirs(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    a = tiny_dirs["llama"]
    return {
        "a": a,
        "b": str(perturbed_copy(a, root / "perturbed")),
        "gemma": tiny_dirs["gemma3_text"],
        "adapter": str(make_adapter(a, root / "adapter")),
        "zero_adapter": str(make_adapter(a, root / "zero_adapter", b_std=0.0)),
        "small": str(root / "small"),
        "root": root,
    }


def run(args, **kw):
    result = CliRunner().invoke(main, ["compare", *args], **kw)
    return result


def run_json(args) -> dict:
    result = run([*args, "--format", "json"])
    assert result.exit_code == 0, result.output + str(result.exception)
    return json.loads(result.stdout)


class FakeLM:
    """A 'model' whose logits at position i are rows[i] of a fixed [L, V] array: lets a crafted
    logit sequence run through kl_positions (chunks and cache bookkeeping included)."""

    def __init__(self, rows: np.ndarray):
        self.rows = mx.array(rows.astype(np.float32))
        self.pos = 0

    def make_cache(self):
        self.pos = 0
        return []

    def __call__(self, x, cache=None):
        n = x.shape[1]
        out = self.rows[self.pos : self.pos + n][None]
        self.pos += n
        return out


def test_self_compare_is_zero_text_and_generations(dirs, tiny_models):
    # B is a second, independently loaded copy of A.
    rep = run_json(["-m", dirs["a"], "--model-b", dirs["a"], "--text", "the same tokens, twice over"])
    gen = run_json(["-m", dirs["a"], "--model-b", dirs["a"], "-p", "hello", "-p", "a second prompt", "--max-tokens", "12"])
    for report in (rep, gen):
        for block in [*report["prompts"], report["pooled"]]:
            a = block["aggregates"]
            assert block["n"] > 0
            assert a["mean"] <= 1e-6 and a["rmse"] <= 1e-6 and a["p95"] <= 1e-6 and a["max"] <= 1e-6
    # text: every position that predicts a token; generation: every generated token
    text_ids = prompt_ids(tiny_models["llama"][1], "the same tokens, twice over", raw=True)
    assert rep["prompts"][0]["n"] == len(text_ids) - 1 == len(rep["prompts"][0]["kl"])
    assert rep["prompts"][0]["token_ids"] == text_ids[1:]
    for row in gen["prompts"]:
        assert row["n"] == len(row["token_ids"]) == len(row["kl"]) and 1 <= row["n"] <= 12
    assert gen["pooled"]["n"] == sum(r["n"] for r in gen["prompts"])


def test_perturbed_copy_matches_float64_oracle(dirs, tiny_models):
    from mlxgate.models import load

    report = run_json(["-m", dirs["a"], "--model-b", dirs["b"], "-p", "hello there", "-p", "why", "--max-tokens", "16"])
    ma, tok, _ = tiny_models["llama"]
    mb, _, _ = load(dirs["b"])
    pooled = []
    for row, prompt in zip(report["prompts"], ("hello there", "why")):
        assert row["n"] > 0
        p = prompt_ids(tok, prompt)
        seq = mx.array([p + row["token_ids"]])
        # full-sequence forward (no cache) in float64 numpy: logits at index t-1 predict token t
        za = np.array(ma(seq)[0, len(p) - 1 : -1])
        zb = np.array(mb(seq)[0, len(p) - 1 : -1])
        oracle = np_kl(za, zb)
        got = np.array(row["kl"])
        assert got.shape == oracle.shape
        np.testing.assert_allclose(got, oracle, rtol=1e-3, atol=1e-6)
        assert got.min() > 0
        # aggregates are numpy's on the reported per-position KL (float64, to rounding)
        for k, v in np_aggregates(got).items():
            assert row["aggregates"][k] == pytest.approx(v, rel=1e-12, abs=1e-15)
        pooled.append(got)
    pooled = np.concatenate(pooled)
    for k, v in np_aggregates(pooled).items():
        assert report["pooled"]["aggregates"][k] == pytest.approx(v, rel=1e-12)
    assert report["pooled"]["aggregates"]["mean"] > 1e-4


def test_kl_positions_chunking_and_start_on_crafted_logits():
    rng = np.random.default_rng(0)
    za, zb = rng.normal(0, 2, (30, 17)), rng.normal(0, 2, (30, 17))
    ids = list(range(31))  # 31 tokens: logits 0..29 predict tokens 1..30
    for start, chunk in ((1, 512), (1, 7), (9, 4), (30, 8)):
        got = C.kl_positions(FakeLM(za), FakeLM(zb), ids, start, chunk=chunk)
        np.testing.assert_allclose(got, np_kl(za, zb)[start - 1 :], rtol=1e-5, atol=1e-6)
    assert C.kl_positions(FakeLM(za), FakeLM(zb), ids, 31).size == 0


def test_short_loop_lifts_rmse_over_tau_while_mean_stays_under():
    # SPEC §5.4: a 4-token loop inside a 60-token completion: mean ≈ 0.38 < τ = 0.5, rmse ≈ 1.5.
    rng = np.random.default_rng(1)
    V, L = 32, 60
    za = rng.normal(0, 1, (L, V))
    zb = za + rng.normal(0, 0.05, (L, V))  # small drift everywhere
    c = 6.0  # KL ≈ 5.6 nats at each loop position; A sure of token 0, B sure of token 1 at the loop positions
    for t in range(40, 44):
        za[t] = 0.0
        zb[t] = 0.0
        za[t, 0] = c
        zb[t, 1] = c
    ids = list(range(L + 1))
    kl = C.kl_positions(FakeLM(za), FakeLM(zb), ids, 1)
    np.testing.assert_allclose(kl, np_kl(za, zb), rtol=1e-4, atol=1e-6)
    aggs = C.kl_aggregates(kl)
    ref = np_aggregates(np_kl(za, zb))
    for k in ("mean", "rmse", "p95", "max"):
        assert aggs[k] == pytest.approx(ref[k], rel=1e-4)
    assert 0.3 < aggs["mean"] < 0.5 < 1.0 < aggs["rmse"]
    flags = C.over_threshold(aggs, 0.5)
    assert flags == {"mean": False, "rmse": True, "p95": True, "max": True}
    # without the loop, nothing fires
    calm = C.kl_aggregates(np.delete(kl, range(40, 44)))
    assert not any(C.over_threshold(calm, 0.5).values())


def test_threshold_column_and_pooled_row_in_table(dirs):
    result = run(["-m", dirs["a"], "--model-b", dirs["b"], "-p", "one", "-p", "two", "--max-tokens", "6", "--threshold", "1e-9"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "τ=1e-09" in out and "pooled over positions" in out
    assert out.count("mean,rmse,p95,max") == 3  # both prompts and the pooled row exceed a tiny τ


def test_adapter_b_and_zero_adapter(dirs, tmp_path):
    drift = run_json(["-m", dirs["a"], "--adapter", dirs["adapter"], "--text", "adapted or not"])
    assert drift["pooled"]["aggregates"]["mean"] > 1e-5
    assert drift["model_b"].endswith(dirs["adapter"])
    # a fresh adapter (B = 0) changes nothing: exactly the base model
    zero = run_json(["-m", dirs["a"], "--adapter", dirs["zero_adapter"], "--text", "adapted or not"])
    assert zero["pooled"]["aggregates"]["max"] <= 1e-6
    png = tmp_path / "kl.png"
    result = run(["-m", dirs["a"], "--adapter", dirs["adapter"], "-p", "x", "--max-tokens", "5", "--plot", str(png)])
    assert result.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("vocab", "different vocabularies"),
        ("both", "exactly one of --model-b"),
        ("neither", "exactly one of --model-b"),
        ("adapter_shape", "does not match model"),
        ("adapter_missing_file", "adapters.safetensors is missing"),
        ("text_and_prompt", "do not combine"),
    ],
)
def test_bad_input_exit_2(dirs, case, needle, tmp_path):
    a = dirs["a"]
    if case == "vocab":
        args = ["-m", a, "--model-b", dirs["gemma"], "--text", "hello"]
    elif case == "both":
        args = ["-m", a, "--model-b", a, "--adapter", dirs["adapter"], "--text", "hi"]
    elif case == "neither":
        args = ["-m", a, "--text", "hi"]
    elif case == "adapter_shape":
        from mlxgate.fixtures import make_tiny_checkpoint

        small = make_tiny_checkpoint(tmp_path / "small", "llama", hidden=32)
        args = ["-m", a, "--adapter", str(make_adapter(str(small), tmp_path / "small_adapter")), "--text", "hi"]
    elif case == "adapter_missing_file":
        (tmp_path / "ad").mkdir()
        (tmp_path / "ad" / "adapter_config.json").write_text("{}")
        args = ["-m", a, "--adapter", str(tmp_path / "ad"), "--text", "hi"]
    else:
        args = ["-m", a, "--model-b", a, "--text", "hi", "-p", "there"]
    result = run(args)
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert "Traceback" not in result.output


def test_kl_positions_gemma_chunks_across_the_sliding_window(tiny_dirs, tiny_models, tmp_path):
    # gemma3's window is 16: chunks of 8 through its rotating cache must equal one full forward.
    from mlxgate.models import load

    ma, tok, _ = tiny_models["gemma3_text"]
    mb, _, _ = load(str(perturbed_copy(tiny_dirs["gemma3_text"], tmp_path / "g")))
    ids = prompt_ids(tok, "a text well past the sixteen-token sliding window of the tiny gemma", raw=True)
    assert len(ids) > 40
    seq = mx.array([ids])
    oracle = np_kl(np.array(ma(seq)[0, :-1]), np.array(mb(seq)[0, :-1]))
    for chunk in (8, 512):
        got = C.kl_positions(ma, mb, ids, 1, chunk=chunk)
        np.testing.assert_allclose(got, oracle, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(C.kl_positions(ma, mb, ids, 20, chunk=8), oracle[19:], rtol=1e-3, atol=1e-6)
