"""CER (SPEC §6): architecture size, control law, one step against a float64 oracle, mirror test,
commutation cost, gradients of the entropy/mass terms, a tiny training run, checkpoint and CLI."""

from __future__ import annotations

import json
import math

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxgate.cer.commutation import commutation_cost
from mlxgate.cer.mirror import PUBLISHED, make_input, run_mirror, summarize
from mlxgate.cer.model import (
    BRAKE,
    ESCAPE,
    NONE,
    CERConfig,
    CoherentEntropyReactor,
    apply_control,
    control_decision,
    count_parameters,
    phase_update,
    semantic_mass,
    state_entropy,
)
from mlxgate.cer.train import (
    TrainConfig,
    load_checkpoint,
    loss_terms,
    markov_chain,
    sample_batch,
    save_checkpoint,
    train,
)
from mlxgate.cli_cer import cer_group, parse_seeds
from mlxgate.errors import UserError

TINY = CERConfig(input_dim=16, hidden_dim=64, output_dim=16, num_blocks=1, refinement_steps=2, num_heads=2,
                 target_entropy=2.5)


def np_entropy(z) -> np.ndarray:
    """float64 softmax entropy over the last axis (nats)."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(axis=-1)


def z_with_entropy(h: float, shape=(2, 3, 256), seed=0) -> mx.array:
    """A state whose mean softmax entropy is h (to ~1e-6 nats), by bisection on a logit scale."""
    base = np.random.default_rng(seed).normal(size=shape)
    lo, hi = 0.0, 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if np_entropy(base * mid).mean() > h:
            lo = mid
        else:
            hi = mid
    return mx.array((base * (lo + hi) / 2).astype(np.float32))


# --- architecture -----------------------------------------------------------------------------


def test_parameter_count_defaults():
    mx.random.seed(0)
    model = CoherentEntropyReactor()
    assert count_parameters(model) == 1_645_952
    shapes = dict((k, v.shape) for k, v in tree_flatten(model.parameters()))
    assert shapes["blocks.0.attn.in_proj.weight"] == (768, 256)
    assert shapes["blocks.1.ffn.layers.3.weight"] == (256, 1024)
    assert not any("phase" in k for k in shapes)


def test_torch_style_attention_init():
    mx.random.seed(1)
    attn = CoherentEntropyReactor().blocks[0].attn
    bound = math.sqrt(6 / (256 + 768))
    w = np.array(attn.in_proj.weight)
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
    assert not np.any(np.array(attn.in_proj.bias)) and not np.any(np.array(attn.out_proj.bias))


# --- control law on hand-built states ---------------------------------------------------------


def test_escape_clamped_noise_scale():
    z = mx.zeros((2, 3, 256))
    z[..., 0] = 60.0  # H ~ 0: deficit 3.0 clamps to 2.0
    noise = mx.array(np.random.default_rng(1).normal(size=z.shape).astype(np.float32))
    out, action, deficit = apply_control(z, state_entropy(z), CERConfig(), noise=noise)
    assert action == ESCAPE and deficit == pytest.approx(2.0)
    np.testing.assert_allclose(np.array(out - z), 0.2 * np.array(noise), atol=1e-5)


def test_escape_unclamped_noise_scale():
    z = z_with_entropy(2.6)
    h = np_entropy(z).mean()
    noise = mx.ones(z.shape)
    out, action, deficit = apply_control(z, state_entropy(z), CERConfig(), noise=noise)
    assert action == ESCAPE
    assert deficit == pytest.approx(3.0 - h, abs=1e-5)
    np.testing.assert_allclose(np.array(out - z), (3.0 - h) * 0.1, atol=1e-5)


def test_brake_divisor():
    z = z_with_entropy(4.8)
    h = np_entropy(z).mean()
    out, action, deficit = apply_control(z, state_entropy(z))
    assert action == BRAKE and deficit == pytest.approx(-(h - 3.0), abs=1e-5)
    np.testing.assert_allclose(np.array(out), np.array(z) / (1 - 0.1 * (h - 3.0)), rtol=1e-5)


def test_brake_divisor_floor():
    # Excess 5.2 nats (target 0) would give 1 - 0.52 < 0.5: the floor 0.5 holds, z doubles.
    z = z_with_entropy(5.2)
    out, action, deficit = apply_control(z, state_entropy(z), CERConfig(target_entropy=0.0))
    assert action == BRAKE and deficit == pytest.approx(-5.2, abs=1e-4)
    np.testing.assert_allclose(np.array(out), 2.0 * np.array(z), rtol=1e-6)


@pytest.mark.parametrize("h", [3.0, 3.2, 3.5])
def test_inside_band_no_control(h):
    assert control_decision(h) == (NONE, 0.0, 1.0)


def test_band_edges():
    assert control_decision(2.999)[0] == ESCAPE
    assert control_decision(3.501)[0] == BRAKE
    z = z_with_entropy(3.25)
    out, action, deficit = apply_control(z, state_entropy(z))
    assert action == NONE and deficit == 0.0 and out is z


def test_phase_update_formula():
    for phase, h in [(0.0, 4.2), (0.3, 2.1), (-1.0, 3.0)]:
        expected = phase + 0.1 * 2.0 * math.sin(3.0 - h)
        assert phase_update(phase, h) == pytest.approx(expected, abs=1e-12)
        assert phase_update(mx.array(phase), mx.array(h)).item() == pytest.approx(expected, abs=1e-6)


def test_semantic_mass_oracle():
    z = mx.zeros((1, 2, 8))
    assert semantic_mass(z).item() == pytest.approx(1 - 1 / 8, abs=1e-7)
    z[..., 3] = 80.0
    assert semantic_mass(z).item() == pytest.approx(0.0, abs=1e-6)
    r = np.random.default_rng(2).normal(size=(3, 5, 17))
    p = np.exp(r) / np.exp(r).sum(-1, keepdims=True)
    assert semantic_mass(mx.array(r.astype(np.float32))).item() == pytest.approx((1 - (p**2).sum(-1)).mean(), abs=1e-6)


# --- one full refinement step against float64 ------------------------------------------------


def test_one_step_matches_float64_oracle():
    mx.random.seed(3)
    cfg = CERConfig(num_blocks=1, refinement_steps=1, dropout=0.0)
    model = CoherentEntropyReactor(cfg)
    model.eval()
    x = make_input("UNIFORM")
    z_block = model.blocks[0](model.encoder(x))
    h1 = np_entropy(z_block).mean()
    phase = 0.1 * 2.0 * math.sin(3.0 - h1)
    z_mod = np.array(z_block, dtype=np.float64) * (1 + 0.3 * math.sin(phase))
    h2 = np_entropy(z_mod).mean()
    assert h2 > 3.5  # this state brakes
    z_out = z_mod / max(0.5, 1 - 0.1 * (h2 - 3.0))
    step = model(x).trajectory[0]
    assert step.phase == pytest.approx(phase, abs=1e-5)
    assert step.action == BRAKE and step.deficit == pytest.approx(-(h2 - 3.0), abs=1e-4)
    assert step.entropy == pytest.approx(np_entropy(z_out).mean(), abs=1e-4)
    p = np.exp(z_out - z_out.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert step.mass == pytest.approx((1 - (p**2).sum(-1)).mean(), abs=1e-5)
    assert step.max_p == pytest.approx(p.max(-1).mean(), abs=1e-5)
    assert step.sum_p == pytest.approx(1.0, abs=1e-5)


def test_phase_is_carried_and_reset():
    mx.random.seed(4)
    model = CoherentEntropyReactor(TINY)
    model.eval()
    x = make_input("UNIFORM", (2, 4, 16))
    first = [s.phase for s in model(x).trajectory]
    assert model.phase == pytest.approx(first[-1])
    second = [s.phase for s in model(x).trajectory]
    assert second[0] != pytest.approx(first[0])
    model.reset_phase()
    assert [s.phase for s in model(x).trajectory] == pytest.approx(first, abs=1e-7)


# --- mirror test ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mirror_summary():
    seeds = list(range(10))
    return summarize(run_mirror(seeds, dropout=True), seeds, True)


def test_mirror_inputs():
    assert make_input("PEAKED").shape == (4, 16, 128)
    p0 = math.exp(10) / (math.exp(10) + 127)
    h_peaked = -(p0 * math.log(p0) + (1 - p0) * math.log((1 - p0) / 127))
    assert state_entropy(mx.log(make_input("PEAKED"))).item() == pytest.approx(h_peaked, abs=1e-5)
    assert state_entropy(mx.log(make_input("UNIFORM"))).item() == pytest.approx(math.log(128), abs=1e-5)


def test_mirror_reproduces_published_statistics(mirror_summary):
    for name, row in mirror_summary["conditions"].items():
        pub = PUBLISHED[name]
        assert row["n_steps"] == 60
        assert abs(row["last_step_entropy"]["mean"] - pub["final_mean"]) <= pub["final_std"], name
        assert row["verdict"]["final_agrees"]
        # Overwhelmingly BRAKE, no runaway ESCAPE: the original's pattern.
        assert row["actions"][BRAKE] >= 54 and row["actions"][ESCAPE] <= 2, (name, row["actions"])
        # Attention diffuses entropy: the first step is far above the (PEAKED) input.
        assert row["first_step_entropy"]["mean"] > 4.5


def test_mirror_deterministic():
    a = summarize(run_mirror([7], dropout=True), [7], True)
    b = summarize(run_mirror([7], dropout=True), [7], True)
    assert a["conditions"]["RANDOM"]["trajectories"] == b["conditions"]["RANDOM"]["trajectories"]
    c = summarize(run_mirror([7], dropout=False), [7], False)
    assert c["conditions"]["RANDOM"]["trajectories"] != a["conditions"]["RANDOM"]["trajectories"]


# --- commutation cost -------------------------------------------------------------------------


def test_commutation_cost_definitions():
    mx.random.seed(5)
    model = CoherentEntropyReactor(TINY)
    x = make_input("RANDOM", (2, 4, 16))
    zero = commutation_cost(model, x, epsilon=0.0, same_phase=True)
    assert zero["entropy_difference"] == pytest.approx(0.0, abs=1e-6)
    assert zero["symmetric_kl"] == pytest.approx(0.0, abs=1e-6)
    model.reset_phase()
    c = commutation_cost(model, x, epsilon=0.1, same_phase=True)
    assert c["entropy_difference"] == pytest.approx(abs(c["entropy_perturb_after"] - c["entropy_perturb_before"]))
    assert c["symmetric_kl"] > 0
    assert model.training  # mode restored


# --- gradients and training -------------------------------------------------------------------


def _grads(cfg: CERConfig, term: int, x=None):
    mx.random.seed(6)
    model = CoherentEntropyReactor(cfg)
    model.eval()
    b = sample_batch(np.random.default_rng(0), markov_chain(cfg.input_dim, 4, 1), 4, 8, 0.5)
    if x is not None:
        b.x = x

    def f(m):
        return loss_terms(m, b, TrainConfig())[term]

    _, g = nn.value_and_grad(model, f)(model)
    return dict(tree_flatten(g)), model


@pytest.mark.parametrize("term", [2, 3], ids=["entropy_term", "mass_term"])
def test_entropy_and_mass_terms_have_gradients(term):
    g, _ = _grads(TINY, term)
    for name in ("encoder.proj.weight", "blocks.0.attn.in_proj.weight", "blocks.0.ffn.layers.0.weight"):
        assert float(mx.abs(g[name]).max()) > 1e-6, name
    # The state terms do not depend on the output projection.
    assert float(mx.abs(g["output_proj.weight"]).max()) == 0.0


def test_detach_mode_cuts_gradients_like_the_original():
    # With the original's no_grad control every braked state is cut from the graph: zero grads.
    x = make_input("UNIFORM", (4, 8, 16))
    g, model = _grads(CERConfig(**{**TINY.to_dict(), "control_grad": "detach"}), 2, x=x)
    model.reset_phase()
    assert all(s.action == BRAKE for s in model(x).trajectory)
    assert all(float(mx.abs(v).max()) == 0.0 for v in g.values())
    g_stop, _ = _grads(TINY, 2, x=x)
    g_pass, _ = _grads(CERConfig(**{**TINY.to_dict(), "control_grad": "pass"}), 2, x=x)
    w = "blocks.0.attn.in_proj.weight"
    assert float(mx.abs(g_stop[w]).max()) > 0
    assert float(mx.abs(g_stop[w] - g_pass[w]).max()) > 1e-7


def test_markov_task_bayes_posterior():
    t = markov_chain(16, 3, 9)
    assert np.allclose(t.sum(1), 1) and ((t > 0).sum(1) == 3).all()
    b = sample_batch(np.random.default_rng(1), t, 8, 9, 1.0)
    sym, mask, x = np.array(b.targets), np.array(b.mask) > 0, np.array(b.x)
    assert mask[:, 0::2].sum() == 0 and mask[:, 1::2].all()
    np.testing.assert_allclose(x[mask], 1 / 16)
    for i in range(8):
        for pos in (3, 8):
            post = t[sym[i, pos - 1]] * (t[:, sym[i, pos + 1]] if pos + 1 < 9 else 1)
            assert b.bayes_logp[i, pos] == pytest.approx(np.log(post[sym[i, pos]] / post.sum()), abs=1e-12)


@pytest.fixture(scope="module")
def tiny_run():
    tc = TrainConfig(steps=60, batch=16, seq=8, lr=3e-3, entropy_weight=1.0, mass_weight=0.1, seed=0,
                     eval_every=30, eval_batch=64)
    return tc, train(tc, TINY, progress=False)


def test_tiny_training_trains(tiny_run):
    _, (log, _) = tiny_run
    u, f = log["untrained"], log["final"]
    losses = [r["loss"] for r in log["history"]]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert f["ce"] < u["ce"]
    assert f["abs_gap_to_target"] < u["abs_gap_to_target"]
    assert all(math.isfinite(r["loss"]) for r in log["history"])


def test_training_deterministic_and_checkpoint_roundtrip(tiny_run, tmp_path):
    tc, (log, model) = tiny_run
    short = TrainConfig(**{**tc.__dict__, "steps": 5, "eval_every": 5})
    a, _ = train(short, TINY, progress=False)
    b, _ = train(short, TINY, progress=False)
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    path = tmp_path / "c.safetensors"
    save_checkpoint(model, path)
    back = load_checkpoint(path)
    assert back.config == model.config and back.phase == pytest.approx(model.phase)
    model.eval(), back.eval()
    x = make_input("RANDOM", (2, 4, 16))
    ys = []
    for m in (model, back):  # same phase and same ESCAPE noise draws
        m.reset_phase()
        mx.random.seed(11)
        ys.append(np.array(m(x).y))
    np.testing.assert_array_equal(ys[0], ys[1])


# --- CLI --------------------------------------------------------------------------------------


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,4-5") == [1, 4, 5]
    for bad in ("abc", "3-1", "", "-2"):
        with pytest.raises(UserError):
            parse_seeds(bad)


def test_cli_mirror_json_and_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(cer_group, ["mirror", "--seeds", "0-1", "--format", "json", "--plot", str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["seeds"] == [0, 1] and set(data["conditions"]) == {"PEAKED", "UNIFORM", "RANDOM"}
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    assert runner.invoke(cer_group, ["mirror", "--seeds", "abc"]).exit_code == 2
    assert runner.invoke(cer_group, ["mirror", "--format", "xml"]).exit_code == 2
    assert runner.invoke(cer_group, ["mirror", "--seeds", "0", "--plot", str(tmp_path / "m.jpg")]).exit_code == 2


def test_cli_train_writes_log_and_checkpoint(tmp_path):
    res = CliRunner().invoke(cer_group, ["train", "--out", str(tmp_path), "--steps", "2", "--batch", "2",
                                         "--seq", "4", "--eval-every", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert len(log["history"]) == 2 and len(log["evals"]) == 2
    model = load_checkpoint(tmp_path / "cer.safetensors")
    assert count_parameters(model) == 1_645_952


def test_mirror_lists_the_evidence_for_every_non_brake_step(mirror_summary):
    for row in mirror_summary["conditions"].values():
        steps = row["non_brake_steps"]
        assert len(steps) == row["actions"]["ESCAPE"] + row["actions"]["none"]
        for s in steps:
            if s["action"] == "none":  # nothing fired: H sat inside the no-action band
                assert 3.0 <= s["entropy"] <= 3.5
