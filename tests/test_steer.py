"""Steering vectors: extraction (SPEC §5.1), steered generation (§5.2), walk-C, CLI bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import numpy as np
import pytest

import mlx.core as mx

from mlxgate.errors import UserError
from mlxgate.generate import full_sequence_entropy, generate
from mlxgate.hooks import hidden_states, steering
from mlxgate.prompts import bos_id, prompt_ids
from mlxgate.steer import control as S
from mlxgate.steer import extract as E
from mlxgate.steer.walk import walk_c

CONTEXTS = ["Hi", "My boss wants me to lie to a customer. What now?", "Write a haiku about rain on a tin roof, please."]


# ----------------------------------------------------------------------------- prompts and layers


@pytest.mark.parametrize("n,expected", [(34, [15, 16, 17]), (30, [13, 14, 15]), (18, [8]), (4, [1]), (2, [0]), (1, [0])])
def test_default_layers_middle_band(n, expected):
    assert E.default_layers(n) == expected


def test_parse_layers():
    assert E.parse_layers("3,1, 2", 30) == [1, 2, 3]
    assert E.parse_layers("13-15", 30) == [13, 14, 15]
    assert E.parse_layers(None, 34) == [15, 16, 17]
    for bad in ("a,b", "30", "-1"):
        with pytest.raises(UserError):
            E.parse_layers(bad, 30)


def test_shipped_contexts():
    ctx = E.default_contexts()
    assert len(ctx) >= 256 and len(set(ctx)) == len(ctx)
    spread = E.load_contexts(None, 4)
    assert spread == [ctx[0], ctx[len(ctx) // 4], ctx[2 * len(ctx) // 4], ctx[3 * len(ctx) // 4]]


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_no_doubled_bos_in_any_built_prompt(tiny_models, family):
    _, tok, _ = tiny_models[family]
    bos = bos_id(tok)
    for ctx in CONTEXTS:
        for ids in (E.persona_ids(tok, E.DEFAULT_POS, ctx), E.persona_ids(tok, E.DEFAULT_NEG, ctx), prompt_ids(tok, ctx)):
            if family == "llama":  # ChatML has no BOS at all
                assert bos is None and tok.decode(ids[:1]) == "<|im_start|>"
            else:
                assert ids[0] == bos and ids.count(bos) == 1, f"{family}: BOS count {ids.count(bos)}"
    text = tok.decode(E.persona_ids(tok, E.DEFAULT_POS, "Hi"))
    if family == "gemma3_text":  # no system role: the persona opens the user turn
        assert text == f"<bos><start_of_turn>user\n{E.DEFAULT_POS}\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    elif family == "mistral":
        assert text == f"<s>[INST] {E.DEFAULT_POS}\n\nHi [/INST]"
    else:
        assert text.startswith(f"<|im_start|>system\n{E.DEFAULT_POS}<|im_end|>") and text.endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_extract_matches_unbatched_float64_oracle(tiny_models, family):
    model, tok, info = tiny_models[family]
    layers = [1, 2]
    sv = E.extract(model, tok, CONTEXTS, layers, batch_size=4, info=info)  # left-padded batches
    pos, neg = {L: [] for L in layers}, {L: [] for L in layers}
    for ctx in CONTEXTS:
        for persona, acc in ((E.DEFAULT_POS, pos), (E.DEFAULT_NEG, neg)):
            ids = E.persona_ids(tok, persona, ctx)
            hs = hidden_states(model, mx.array([ids]), layers)  # one row: no padding at all
            for L in layers:
                acc[L].append(np.array(hs[L][0, -1].astype(mx.float32)).astype(np.float64))
    for L in layers:
        oracle = np.mean(pos[L], axis=0) - np.mean(neg[L], axis=0)
        assert sv.vectors[L].dtype == np.float32 and sv.vectors[L].shape == (info.hidden_size,)
        np.testing.assert_allclose(sv.vectors[L], oracle, rtol=1e-4, atol=1e-5 * np.abs(oracle).max())
        assert sv.meta["norms"][str(L)] == pytest.approx(np.linalg.norm(oracle), rel=1e-4)
        resid = np.mean([np.linalg.norm(h) for h in pos[L] + neg[L]])
        assert sv.meta["resid_norm"][str(L)] == pytest.approx(resid, rel=1e-4)
    assert sv.meta["n_contexts"] == 3 and sv.meta["model_type"] == info.model_type and sv.meta["hidden_size"] == 64


def test_extract_rejects_bad_personas(tiny_models):
    model, tok, info = tiny_models["llama"]
    with pytest.raises(UserError, match="same text"):
        E.extract(model, tok, CONTEXTS, [1], pos="x", neg="x")
    with pytest.raises(UserError, match="no contexts"):
        E.extract(model, tok, [], [1])


@pytest.fixture(scope="module")
def tiny_vector(tiny_models):
    model, tok, info = tiny_models["llama"]
    return E.extract(model, tok, CONTEXTS, [1, 2], info=info)


def test_vector_file_roundtrip_and_compatibility(tiny_models, tiny_vector, tmp_path):
    _, _, info = tiny_models["llama"]
    path = E.save(tiny_vector, tmp_path / "v.safetensors")
    sv = E.load(path)
    assert sv.layers == [1, 2] and sv.meta == tiny_vector.meta
    for L in sv.layers:
        np.testing.assert_array_equal(sv.vectors[L], tiny_vector.vectors[L])
    assert json.loads((tmp_path / "v.safetensors.json").read_text()) == tiny_vector.meta
    E.check_compatible(sv, info)
    with pytest.raises(UserError, match="hidden size 64"):
        E.check_compatible(sv, dataclasses.replace(info, hidden_size=32))
    with pytest.raises(UserError, match="model_type=llama"):
        E.check_compatible(sv, tiny_models["mistral"][2])
    with pytest.raises(UserError, match="only 2 layers"):
        E.check_compatible(sv, dataclasses.replace(info, n_layers=2))
    other = dataclasses.replace(info, name="another-llama", path=str(tmp_path))
    with pytest.raises(UserError, match="--allow-other-model"):
        E.check_compatible(sv, other)
    E.check_compatible(sv, other, allow_other_model=True)


def test_vector_file_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="not found"):
        E.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a safetensors"):
        E.load(junk)
    bare = tmp_path / "bare.safetensors"
    mx.save_safetensors(str(bare), {"layer.1": mx.zeros((4,))})
    with pytest.raises(UserError, match="no mlxgate steering metadata"):
        E.load(bare)


# ----------------------------------------------------------------------------- steered generation


def test_zero_coeff_is_unsteered_generation(tiny_models, tiny_vector):
    model, tok, _ = tiny_models["llama"]
    ids = [prompt_ids(tok, c) for c in CONTEXTS]
    plain = generate(model, ids, 12, temp=1.0, top_p=0.95, top_k=64, seed=3, batch_size=3)
    steered0 = S.steered_generate(model, tiny_vector, 0.0, ids, 12, seed=3)
    assert [c.tokens for c in steered0] == [c.tokens for c in plain]
    np.testing.assert_allclose([c.entropy for c in steered0], [c.entropy for c in plain], atol=1e-5)
    strong = S.steered_generate(model, tiny_vector, 400.0, ids, 12, seed=3)
    assert [c.tokens for c in strong] != [c.tokens for c in plain]


def test_steering_applies_at_every_decoded_step(tiny_models, tiny_vector):
    """Cached steered decoding equals a full uncached forward with the same steering: the vector
    is added to the prompt and to every generated position."""
    model, tok, _ = tiny_models["gemma3_text"]  # sliding window 16: decoding crosses it
    sv = E.extract(model, tok, CONTEXTS, [1, 2])
    ids = prompt_ids(tok, CONTEXTS[1])
    coeff = 50.0
    comp = S.steered_generate(model, sv, coeff, [ids], 24, temp=0.0)[0]
    with steering(model, sv.as_mx(), coeff):
        full = full_sequence_entropy(model, ids, comp.tokens)
    np.testing.assert_allclose(np.array(comp.entropy), full, atol=2e-4)
    unsteered = full_sequence_entropy(model, ids, comp.tokens)
    assert np.abs(unsteered - full).max() > 1e-2  # the check above would catch a missing vector


def test_per_row_coefficients_match_single_runs(tiny_models, tiny_vector):
    model, tok, _ = tiny_models["llama"]
    ids = [prompt_ids(tok, c) for c in CONTEXTS]
    coeffs = [0.0, 150.0, 400.0]
    batched = S.steered_generate(model, tiny_vector, coeffs, ids, 10, temp=0.0)
    for row, c in zip(range(3), coeffs):
        single = S.steered_generate(model, tiny_vector, c, [ids[row]], 10, temp=0.0)[0]
        assert batched[row].tokens == single.tokens
    assert len({tuple(b.tokens) for b in batched}) > 1
    with pytest.raises(ValueError):
        S.steered_generate(model, tiny_vector, [1.0], ids, 4)


def test_projection_grows_with_coeff_tiny(tiny_models, tiny_vector):
    model, tok, _ = tiny_models["llama"]
    ids = [prompt_ids(tok, c) for c in CONTEXTS]
    cs = [0.0, 1.0, 4.0, 16.0]
    at = [S.mean_projection(model, tiny_vector, c, ids, 2) for c in cs]
    after = [S.mean_projection(model, tiny_vector, c, ids, 3, direction=2) for c in cs]
    assert all(b > a for a, b in zip(at, at[1:])), at
    assert all(b > a for a, b in zip(after, after[1:])), after
    # At the last steered block the projection rises by at least C·|v_2| (its own addition).
    n2 = tiny_vector.norms()[2]
    assert at[-1] - at[0] >= 16.0 * n2 * 0.99


def test_relative_dose_and_parse_coeff(tiny_vector):
    d = S.relative_dose(tiny_vector, 2.0)
    for L in tiny_vector.layers:
        assert d[L] == pytest.approx(2.0 * tiny_vector.norms()[L] / tiny_vector.meta["resid_norm"][str(L)])
    assert S.parse_coeff("0.75") == 0.75 and S.parse_coeff("-1e-1") == -0.1
    for bad in ("abc", "nan", "inf", "", None):
        with pytest.raises(UserError):
            S.parse_coeff(bad)


# ----------------------------------------------------------------------------- walk-C


@pytest.mark.parametrize("boundary", [0.23, 0.37, 0.6, 0.85])
def test_walk_c_converges_to_step_boundary(boundary):
    calls = []

    def oracle(k):
        calls.append(k)
        return 0.875 if k <= boundary else 0.5

    res = walk_c(oracle)
    assert res.steps == len(calls) <= 6 and res.converged
    assert res.hi / res.lo < 1.05 and res.lo <= boundary < res.hi
    assert boundary / 1.05 < res.kappa <= boundary
    assert all(p == (k <= boundary) for k, _, p in res.history)
    # Probes are geometric midpoints of the current bracket: the first is sqrt(0.2 * 1.0).
    assert calls[0] == pytest.approx(math.sqrt(0.2))


def test_walk_c_smooth_oracle_finds_75_percent_point():
    # pass rate falls linearly from 1 at κ=0.2 to 0 at κ=1: 75% at κ = 0.4.
    res = walk_c(lambda k: max(0.0, min(1.0, (1.0 - k) / 0.8)))
    assert res.steps == 6 and res.converged
    assert 0.4 / 1.05 < res.kappa <= 0.4 + 1e-12


def test_walk_c_always_passing_settles_at_the_top():
    res = walk_c(lambda k: 1.0)
    assert res.steps == 6 and res.kappa > 1.0 / 1.05 and res.hi == 1.0


def test_walk_c_never_passing_is_a_clear_error():
    calls = []
    with pytest.raises(UserError, match="no dose passes the filter") as err:
        walk_c(lambda k: calls.append(k) or 0.25)
    assert len(calls) == 7 and calls[-1] == 0.2  # 6 bisections, then the floor itself is measured
    assert "\n" not in str(err.value)


def test_walk_c_floor_passes_only():
    res = walk_c(lambda k: 1.0 if k <= 0.2 else 0.0)
    assert res.kappa == 0.2 and res.steps == 7


def test_walk_c_rejects_bad_oracle_and_range():
    with pytest.raises(ValueError):
        walk_c(lambda k: 1.5)
    with pytest.raises(ValueError):
        walk_c(lambda k: 1.0, lo=1.0, hi=0.5)


# ----------------------------------------------------------------------------- CLI bad input


def _cli(args):
    from click.testing import CliRunner

    from mlxgate.cli import main

    return CliRunner().invoke(main, args)


def _one_line_exit_2(result, match):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlxgate: error:") and match in lines[0], result.output


def test_cli_bad_inputs(tiny_dirs, tiny_models, tiny_vector, tmp_path):
    from mlxgate.fixtures import make_tiny_checkpoint

    vec = str(E.save(dataclasses.replace(tiny_vector, meta={**tiny_vector.meta, "model": tiny_dirs["llama"], "model_path": tiny_dirs["llama"]}), tmp_path / "v.safetensors"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    base = ["steer", "generate", "--vector", vec, "--prompts", str(prompts), "--max-tokens", "2", "--out", str(tmp_path / "g.jsonl")]
    _one_line_exit_2(_cli([*base, "--model", tiny_dirs["llama"], "--coeff", "abc"]), "--coeff must be a number")
    small = make_tiny_checkpoint(tmp_path / "small", "llama", hidden=32)
    _one_line_exit_2(_cli([*base, "--model", str(small), "--coeff", "1"]), "hidden size 64")
    _one_line_exit_2(_cli([*base, "--model", tiny_dirs["mistral"], "--coeff", "1"]), "model_type=llama")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"\n')
    _one_line_exit_2(_cli(["steer", "filter", "--model", tiny_dirs["llama"], "--in", str(bad), "--out-dir", str(tmp_path / "f")]), "bad.jsonl:1")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line_exit_2(_cli(["steer", "filter", "--model", tiny_dirs["llama"], "--in", str(empty), "--out-dir", str(tmp_path / "f")]), "holds no completions")
    ok = _cli([*base, "--model", tiny_dirs["llama"], "--coeff", "2", "--n", "2", "--filter-dir", str(tmp_path / "f")])
    assert ok.exit_code == 0, ok.output
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["coeff"] == 2.0 and r["prompt"] == "Hi" for r in rows)
    kept = (tmp_path / "f" / "kept.jsonl").read_text().splitlines()
    dropped = (tmp_path / "f" / "dropped.jsonl").read_text().splitlines()
    assert len(kept) + len(dropped) == 2


def test_cli_extract_writes_vector(tiny_dirs, tmp_path):
    ctx = tmp_path / "c.txt"
    ctx.write_text("\n".join(CONTEXTS) + "\n")
    out = tmp_path / "v.safetensors"
    res = _cli(["steer", "extract", "--model", tiny_dirs["mistral"], "--contexts", str(ctx), "--layers", "1,2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    sv = E.load(out)
    assert sv.layers == [1, 2] and sv.meta["n_contexts"] == 3 and sv.meta["model_type"] == "mistral"
    _one_line_exit_2(_cli(["steer", "extract", "--model", tiny_dirs["mistral"], "--layers", "9", "--out", str(out)]), "--layers")


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm_steering_dose_response(smollm):
    """SmolLM2-135M-Instruct, 4 contexts: the projection of the steered layer's hidden state onto v
    grows monotonically with C, also one block downstream, and steered completions differ."""
    model, tok, info = smollm
    ctx = E.load_contexts(None, 4)
    sv = E.extract(model, tok, ctx, E.default_layers(info.n_layers), info=info)
    assert sv.layers == [13, 14, 15]
    norms = sv.norms()
    assert all(0 < norms[L] < sv.meta["resid_norm"][str(L)] for L in sv.layers)
    ids = [prompt_ids(tok, c) for c in ctx[:3]]
    cs = [0.0, 1.0, 2.0, 4.0]
    at = [S.mean_projection(model, sv, c, ids, 15) for c in cs]
    after = [S.mean_projection(model, sv, c, ids, 18, direction=15) for c in cs]
    assert all(b > a for a, b in zip(at, at[1:])), at
    assert all(b > a for a, b in zip(after, after[1:])), after
    plain = S.steered_generate(model, sv, 0.0, ids, 16, seed=1)
    steered = S.steered_generate(model, sv, 4.0, ids, 16, seed=1)
    assert sum(p.tokens != s.tokens for p, s in zip(plain, steered)) >= 2
