"""Heal (SPEC §5.4, §7): masks, the hinge barrier on the aggregate KL, the loss against a float64
oracle, training on a tiny fixture, the entropy objective's stability, mlx-lm's adapter loader,
and the CLI's bad-input handling."""

from __future__ import annotations

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxgate import heal as H
from mlxgate import lora
from mlxgate.analysis.kl_stats import kl_aggregates
from mlxgate.fixtures import make_tiny_checkpoint
from mlxgate.models import load

N_LAYERS = 6  # adapted blocks [1, 4): blocks on both sides stay un-adapted


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("heal") / "llama6", "llama", seed=3, n_layers=N_LAYERS))


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["red", "blue", "green", "gold", "grey"]
    out = []
    for i in range(n):
        w = words[int(rng.integers(len(words)))]
        out.append({"prompt": f"colour {i}?", "completion": f"It is {w}. {w} is nice."})
    return out


def _logits_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


# ----------------------------------------------------------------------------- data and masks


def test_collate_masks_prompt_and_padding_and_select():
    a = H.Example([5, 6, 7], [8, 9])  # 5 tokens
    b = H.Example([5, 6], [10, 11, 12, 13])  # 6 tokens
    ids, mask = H.collate([a, b])
    assert ids.shape == (2, 17) and mask.shape == (2, 16)  # 1 + bucket(5) = 1 + 16
    pad = [0] * 11
    assert np.array(ids).tolist() == [[5, 6, 7, 8, 9] + pad + [0], [5, 6, 10, 11, 12, 13] + pad]
    # target j is ids[j+1]: completion targets only.
    assert np.array(mask).tolist() == [[0, 0, 1, 1] + [0] * 12, [0, 1, 1, 1, 1] + [0] * 11]
    sel, w = H.select(mask)
    assert np.array(sel).tolist() == [2, 3, 17, 18, 19, 20] + [0] * 10
    assert np.array(w).tolist() == [1.0] * 6 + [0.0] * 10


def test_bucket_grid():
    assert [H.bucket(n) for n in (0, 1, 16, 17, 64, 65, 110, 116, 129, 142, 161, 300, 513)] == [
        16, 16, 16, 32, 64, 80, 112, 128, 160, 160, 192, 320, 640]
    assert all(0 <= H.bucket(n) - n < max(16, n / 4) for n in range(1, 5000))  # <= 25% padding past 64


def test_make_examples_eos_finish_and_drops(tiny_dir):
    _, tok, _ = load(tiny_dir)
    eos = tok.eos_token_id
    recs = [
        {"prompt": "hi", "completion": "ab"},
        {"prompt": "hi", "completion": "ab", "finish": "length"},
        {"prompt": "hi", "completion": ""},
        {"prompt_ids": [1, 2, 3], "completion_ids": [70, 71]},
        {"prompt_ids": [1, 2, 3], "completion_ids": [70, eos]},
        {"prompt": "x" * 50, "completion": "y" * 50},
    ]
    ex, dropped = H.make_examples(tok, recs, max_seq_len=64)
    ab = tok.encode("ab", add_special_tokens=False)
    assert [e.completion_ids for e in ex] == [ab + [eos], ab, [70, 71, eos], [70, eos]]
    from mlxgate.prompts import prompt_ids

    assert ex[0].prompt_ids == prompt_ids(tok, "hi")
    assert dropped == {"empty_completion": 1, "too_long": 1}


def test_turn_end_id_is_the_token_closing_an_assistant_turn(tmp_path):
    """Gemma ends a turn with <end_of_turn>, not <eos>: completions are trained to stop the way
    the model's chat format does."""
    _, tok, _ = load(str(make_tiny_checkpoint(tmp_path / "g", "gemma3_text")))
    end = H.turn_end_id(tok)
    assert len(tok.eos_token_ids) == 2 and tok.convert_ids_to_tokens(end) == "<end_of_turn>" and end != tok.eos_token_id
    ex, _ = H.make_examples(tok, [{"prompt": "hi", "completion": "ok"}])
    assert ex[0].completion_ids[-1] == end


def test_read_records_errors_and_kept_flag(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d", "kept": false}\n')
    assert H.read_records(p) == [{"prompt": "a", "completion": "b"}]
    for text in ("", "\n\n", '{"prompt": "a"}\n', "not json\n", "[1, 2]\n", '{"prompt": "a", "completion": "b", "kept": false}\n'):
        p.write_text(text)
        with pytest.raises(mlxgate.errors.UserError):
            H.read_records(p)


def test_split_val_is_one_eighth_and_seeded():
    ex = [H.Example([1], [i, 2]) for i in range(17)]
    train, val = H.split_val(ex, 1 / 8, seed=4)
    assert len(val) == 2 and len(train) == 15
    assert sorted(e.completion_ids[0] for e in train + val) == list(range(17))
    assert H.split_val(ex, 1 / 8, seed=4)[1] == val


def test_schedule_warmup_then_cosine():
    cfg = H.HealConfig(lr=1e-3)
    sched = H._schedule(cfg, 100)  # 10 warmup steps
    got = [float(sched(mx.array(s))) for s in (0, 5, 10, 55, 100)]
    want = [0.0, 5e-4, 1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * 45 / 90)), 0.0]
    np.testing.assert_allclose(got, want, atol=1e-9)


# ----------------------------------------------------------------------------- barrier


def _loop_pair(vocab: int = 512, n_prompt: int = 8, n_completion: int = 60, loop: tuple = (30, 31, 32, 33), kl_loop: float = 5.7):
    """Reference and student logits [1, T, V]: equal on every completion position but the 4 of a
    token loop, where the student puts a spike of mass on one token (KL_t = kl_loop); the prompt
    positions differ wildly, but are masked out."""
    rng = np.random.default_rng(0)
    T = n_prompt + n_completion
    ref = rng.normal(0, 1, (T, vocab))
    student = ref.copy()
    student[:n_prompt] += rng.normal(0, 20, (n_prompt, vocab))

    def kl_of(row, c):
        s = row.copy()
        s[np.argmin(row)] += c  # the loop token: one the reference finds unlikely
        lp, lq = _log_softmax(s), _log_softmax(row)
        return float(np.sum(np.exp(lp) * (lp - lq)))

    for t in loop:
        lo, hi = 0.0, 100.0
        for _ in range(80):  # bisection: KL grows with the spike
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if kl_of(ref[n_prompt + t], mid) < kl_loop else (lo, mid)
        student[n_prompt + t, np.argmin(ref[n_prompt + t])] += lo
    mask = np.zeros(T)
    mask[n_prompt:] = 1
    return ref[None], student[None], mask[None]


def test_barrier_rmse_fires_on_a_short_loop_mean_does_not():
    ref, student, mask = _loop_pair()
    kl_np = np.sum(np.exp(_log_softmax(student)) * (_log_softmax(student) - _log_softmax(ref)), -1)
    aggs = kl_aggregates(kl_np, mask)
    assert aggs["n"] == 60
    assert abs(aggs["mean"] - 0.38) < 0.01 and abs(aggs["rmse"] - 1.47) < 0.03  # SPEC §5.4: ≈0.38, ≈1.5
    tau, lam = 0.5, 0.3
    ref_mx, m = mx.array(ref, dtype=mx.float32), mx.array(mask, dtype=mx.float32)
    for agg in ("mean", "rmse", "p95", "max"):

        def f(s):
            return H.barrier_term(H.kl_per_position(s, ref_mx, "rev"), m, agg, tau, lam)[0]

        value, grad = mx.value_and_grad(f)(mx.array(student, dtype=mx.float32))
        g = np.abs(np.array(grad))
        want = lam * max(aggs[agg] - tau, 0.0)
        assert float(value) == pytest.approx(want, rel=1e-4, abs=1e-6), agg
        assert g[0, :8].max() == 0.0, agg  # prompt positions: no gradient whatever their KL
        if agg == "mean":
            assert float(value) == 0.0 and g.max() == 0.0
            continue
        assert float(value) > 0.25, agg
        pushed = set(np.flatnonzero(g[0].max(-1) > 1e-6) - 8)
        loop = {30, 31, 32, 33}
        # rmse pushes on every loop position; p95 on the order statistics it interpolates, max on
        # the arg-max (ties in float32 share it): all inside the loop, never elsewhere.
        assert pushed == loop if agg == "rmse" else (pushed and pushed <= loop), (agg, pushed)


# ----------------------------------------------------------------------------- loss


@pytest.mark.parametrize("objective, lam_h", [("sft", 0.0), ("sft-entropy", 0.25)])
def test_loss_matches_float64_oracle_and_ignores_prompt_and_padding_labels(tiny_dir, objective, lam_h):
    model, tok, _ = load(tiny_dir)
    switch = lora.attach(model, rank=4, scale=2.0, seed=1)
    layers = [m for _, m in lora.stacked_layers(model)]
    rng = np.random.default_rng(1)
    for m in layers:  # a non-zero current round so KL, barrier and spectral are all non-zero
        m.lora_b = mx.array(rng.normal(0, 0.3, m.lora_b.shape), dtype=mx.float32)
    ex = [H.Example([1, 40, 41, 42, 2], [50, 51, 52, 53, 54, 2]), H.Example([1, 43, 2], [60, 61, 2])]
    ids, mask = H.collate(ex)
    sel, w = H.select(mask)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    cfg = H.HealConfig(tau=0.01, agg="rmse", spectral_lam=0.01, objective=objective, entropy_lam=lam_h)
    loss = H.make_loss(switch, layers, cfg, lam_r=0.7)
    out = [float(x) for x in loss(model, inputs, targets, sel, w)]

    with lora.lora_mode(switch, current=False, prev=True):
        ref = _logits_np(model(inputs))
    stu = _logits_np(model(inputs))
    m = np.array(mask) > 0
    t = np.array(targets)
    lp, lq = _log_softmax(stu), _log_softmax(ref)
    nll = -np.take_along_axis(lp, t[..., None], -1)[..., 0]
    kl = np.sum(np.exp(lp) * (lp - lq), -1)
    sft = nll[m].mean()
    rmse = math.sqrt(np.mean(kl[m] ** 2) + 1e-8)
    barrier = 0.7 * max(rmse - 0.01, 0.0)
    ent = -(np.exp(lp) * lp).sum(-1)[m].mean()
    total, o_sft, o_agg, o_mean, o_bar, o_spec, o_ent = out
    assert o_sft == pytest.approx(sft, rel=1e-5)
    assert o_agg == pytest.approx(rmse, rel=1e-4) and o_mean == pytest.approx(kl[m].mean(), rel=1e-4)
    assert o_bar == pytest.approx(barrier, rel=1e-4) and barrier > 0.01
    exact = [lora_sigma(m) for m in layers]
    assert 0.01 * 0.5 * np.mean(exact) < o_spec <= 0.01 * np.mean(exact) * (1 + 1e-5)
    if objective == "sft":
        assert math.isnan(o_ent) and total == pytest.approx(o_sft + o_bar + o_spec, rel=1e-6)
    else:
        assert o_ent == pytest.approx(ent, rel=1e-5)
        assert total == pytest.approx(o_sft + o_bar + o_spec - lam_h * ent, rel=1e-5)

    # Labels at prompt and padding positions, and the padding inputs, change nothing.
    t2, i2 = np.array(targets), np.array(inputs)
    t2[~m] = rng.integers(3, 250, int((~m).sum()))
    i2[0, 11:] = rng.integers(3, 250, i2.shape[1] - 11)  # row 0 is 11 tokens long
    i2[1, 5:] = rng.integers(3, 250, i2.shape[1] - 5)
    out2 = [float(x) for x in loss(model, mx.array(i2), mx.array(t2), sel, w)]
    np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-7)
    # A completion label does change it (the check above can fail).
    t3 = np.array(targets)
    t3[0, 6] = 99
    assert float(loss(model, inputs, mx.array(t3), sel, w)[1]) != pytest.approx(sft, rel=1e-4)


def lora_sigma(m: lora.StackedLoRALinear) -> float:
    from mlxgate.analysis.spectral import lora_delta_spectrum

    return lora_delta_spectrum(m.lora_a, m.lora_b, m.scale)["sigma_max"]


def test_reference_modes_share_weights(tiny_dir, tmp_path):
    """ref prev = earlier rounds on, this round off; ref base = everything off = the plain model."""
    plain, _, _ = load(tiny_dir)
    ids = mx.array([[1, 40, 41, 42, 43, 44]])
    base_logits = np.array(plain(ids))
    prev_dir = _train(tiny_dir, tmp_path / "r0", epochs=1)
    model, _, _ = load(tiny_dir)
    switch = lora.attach(model, 4, 2.0, [lora.read_adapter(prev_dir)[1]])
    for m in (m for _, m in lora.stacked_layers(model)):
        m.lora_b = mx.ones(m.lora_b.shape) * 0.01
    with lora.lora_mode(switch, current=False, prev=False):
        np.testing.assert_allclose(np.array(model(ids)), base_logits, atol=1e-5)
    with lora.lora_mode(switch, current=False, prev=True):
        prev_logits = np.array(model(ids))
    student = np.array(model(ids))
    assert np.abs(prev_logits - base_logits).max() > 1e-3 and np.abs(student - prev_logits).max() > 1e-3


# ----------------------------------------------------------------------------- training


def _train(tiny_dir, out, epochs=3, **kw) -> Path:
    model, tok, _ = load(tiny_dir)
    ex, _ = H.make_examples(tok, _records(24))
    cfg = H.HealConfig(epochs=epochs, batch_size=2, lr=2e-3, rank=4, alpha=8, seed=0, **kw)
    return H.heal(model, tok, ex, cfg, out=out).adapter_dir


def test_heal_tiny_loss_decreases_and_writes_adapter(tiny_dir, tmp_path):
    model, tok, _ = load(tiny_dir)
    ex, _ = H.make_examples(tok, _records(24))
    steps = []
    cfg = H.HealConfig(epochs=4, batch_size=2, grad_accum=2, lr=2e-3, rank=4, alpha=8)
    res = H.heal(model, tok, ex, cfg, on_step=steps.append, out=tmp_path / "ad")
    hist = res.history
    assert steps == hist and len(hist) == 4 * 11  # 21 train examples -> 11 micro-batches per epoch
    assert H.total_steps(len(ex), cfg) == len(hist)  # what the CLI and the loop count progress to
    assert res.summary["optimizer_steps"] == 4 * 6 and res.summary["n_val"] == 3
    first, last = np.mean([h["sft"] for h in hist[:11]]), np.mean([h["sft"] for h in hist[-11:]])
    assert last < first - 0.5
    assert res.val[-1]["sft"] < res.val[0]["sft"]
    assert hist[0]["kl_agg"] == pytest.approx(1e-4, abs=1e-6)  # fresh adapter: rmse = sqrt(0 + 1e-8)
    assert res.summary["hinge_active_frac"] == pytest.approx(np.mean([h["kl_agg"] > cfg.tau for h in hist]))
    # accumulation 2 over 11 micro-batches: updates after micro-batches 2,4,6,8,10 and 11 of each epoch
    assert [h["grad_norm"] is not None for h in hist[:11]] == [False, True] * 5 + [True]
    assert sum(h["grad_norm"] is not None for h in hist) == res.summary["optimizer_steps"]
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["adapter_config.json", "adapters.safetensors", "heal.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["ad"]  # no temp directories left
    cfgj = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfgj["fine_tune_type"] == "lora" and cfgj["num_layers"] == N_LAYERS - 1
    assert cfgj["lora_parameters"] == {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": list(lora.LORA_KEYS)}
    w = mx.load(str(tmp_path / "ad" / "adapters.safetensors"))
    assert len(w) == 2 * 7 * 3 and {int(k.split(".")[2]) for k in w} == {1, 2, 3}


def test_barrier_lowers_kl_to_reference(tiny_dir, tmp_path):
    finals = {}
    for lam in (0.0, 30.0):
        model, tok, _ = load(tiny_dir)
        ex, _ = H.make_examples(tok, _records(24))
        cfg = H.HealConfig(epochs=3, batch_size=2, lr=2e-3, rank=4, alpha=8, lam=lam, tau=0.0, val_frac=0.0)
        res = H.heal(model, tok, ex, cfg)
        switch = next(m for _, m in lora.stacked_layers(model)).switch
        finals[lam] = H.evaluate(model, switch, ex, cfg)
    assert finals[30.0]["kl_rmse"] < 0.5 * finals[0.0]["kl_rmse"]
    assert finals[0.0]["sft"] < finals[30.0]["sft"]  # the barrier costs some fit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_entropy_objective_50_steps_finite(tiny_dir, dtype):
    """CE − λH (IRIS Gate's NaN-at-every-λ objective, SPEC §7) trains 50 steps at every λ."""
    late_entropy = {}
    for lam_h in (0.01, 0.1, 1.0):
        model, tok, _ = load(tiny_dir, dtype=dtype)
        ex, _ = H.make_examples(tok, _records(50, seed=2))
        cfg = H.HealConfig(epochs=1, batch_size=1, lr=5e-3, rank=4, alpha=8, val_frac=0.0, objective="sft-entropy", entropy_lam=lam_h)
        res = H.heal(model, tok, ex, cfg)
        assert len(res.history) == 50
        for h in res.history:
            assert all(math.isfinite(h[k]) for k in ("loss", "sft", "kl_agg", "entropy", "barrier", "spectral")), (dtype, lam_h, h)
        assert all(bool(mx.all(mx.isfinite(v))) for v in res.weights.values())
        h = res.history[-1]
        assert h["loss"] == pytest.approx(h["sft"] + h["barrier"] + h["spectral"] - lam_h * h["entropy"], abs=1e-4 if dtype == "float32" else 2e-2)
        late_entropy[lam_h] = np.mean([h["entropy"] for h in res.history[-10:]])
    assert late_entropy[1.0] > late_entropy[0.01] + 0.05  # the −λH term is live


# ----------------------------------------------------------------------------- mlx-lm's loader


def test_adapter_loads_in_mlx_lm_with_same_logits(tiny_dir, tmp_path):
    from mlx_lm.utils import load as mlx_lm_load

    model, tok, _ = load(tiny_dir)
    ex, _ = H.make_examples(tok, _records(16))
    cfg = H.HealConfig(epochs=2, batch_size=2, lr=5e-3, rank=4, alpha=8)
    H.heal(model, tok, ex, cfg, out=tmp_path / "ad")
    ids = mx.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    ours = np.array(model(ids))
    theirs_model, _ = mlx_lm_load(tiny_dir, adapter_path=str(tmp_path / "ad"))
    theirs = np.array(theirs_model(ids))
    plain, _, _ = load(tiny_dir)
    assert np.abs(ours - np.array(plain(ids))).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    # mlx-lm put LoRA layers on blocks 1..5 (num_layers = 5); block 0 is plain, block 4/5 have B = 0.
    from mlx_lm.tuner.lora import LoRALinear

    kinds = [isinstance(b.self_attn.q_proj, LoRALinear) for b in theirs_model.layers]
    assert kinds == [False, True, True, True, True, True]
    assert float(mx.abs(theirs_model.layers[4].mlp.down_proj.lora_b).max()) == 0.0


# ----------------------------------------------------------------------------- CLI


def _cli(args):
    from mlxgate.cli import main

    return CliRunner().invoke(main, args)


@pytest.mark.parametrize(
    "content, needle",
    [("", "no examples"), ("{bad json\n", "not valid JSON"), ('{"prompt": "a", "completion": ""}\n' * 3, "dropped"),
     ('{"prompt": "a", "completion": "x", "completion_ids": [5, 300, 7]}\n', "token id 300 >= this model's vocabulary"),
     ('{"prompt": "a", "completion": "x", "completion_ids": [5, -1, 7]}\n', "negative token id")],
)
def test_cli_heal_bad_input_exit_2_no_adapter(tiny_dir, tmp_path, content, needle):
    data = tmp_path / "kept.jsonl"
    data.write_text(content)
    out = tmp_path / "out" / "r0"
    res = _cli(["heal", "--model", tiny_dir, "--data", str(data), "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mlxgate: error:") and needle in lines[0]
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))


def test_cli_heal_writes_adapter(tiny_dir, tmp_path):
    data = tmp_path / "kept.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(10)))
    out = tmp_path / "r0"
    res = _cli(["heal", "--model", tiny_dir, "--data", str(data), "--out", str(out), "--epochs", "1", "--rank", "4", "--alpha", "8", "--agg", "p95"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "heal.json").read_text())
    assert rec["config"]["agg"] == "p95" and rec["config"]["scale"] == 2.0 and len(rec["history"]) == 3
    assert "hinge active on" in res.output


def test_round_two_reference_prev_vs_base(tiny_dir, tmp_path):
    """Round 2 on top of round 1: the fresh adapter starts at KL ≈ 0 to ref prev (round 1 on) but
    not to ref base (round 1 off); λ_r follows λ·(1+r)^pow with r = number of earlier rounds."""
    r0 = _train(tiny_dir, tmp_path / "r0", epochs=2)
    first = {}
    for ref in ("prev", "base"):
        model, tok, _ = load(tiny_dir)
        ex, _ = H.make_examples(tok, _records(12))
        cfg = H.HealConfig(epochs=1, batch_size=4, lr=1e-3, rank=4, alpha=8, ref=ref, lam_pow=1.0, val_frac=0.0)
        res = H.heal(model, tok, ex, cfg, prev_adapters=[r0])
        first[ref] = res.history[0]["kl_mean"]
        assert res.summary["round"] == 1 and res.summary["lam_r"] == pytest.approx(0.3 * 2)
    assert first["prev"] < 1e-6 < 1e-3 < first["base"]
    model, tok, _ = load(tiny_dir)
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(mlxgate.errors.UserError, match="not an adapter directory"):
        H.heal(model, tok, H.make_examples(tok, _records(4))[0], H.HealConfig(epochs=1), prev_adapters=[bad])
