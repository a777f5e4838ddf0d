"""`mlxgate loop` on a tiny random checkpoint: a 2-round run writes every file of its run directory,
its adapters load in mlx-lm and bake to the in-memory stack's logits, a SIGKILL in round 2 is
resumed without touching round 1, and bad input is one line and exit 2 with the run intact."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from mlxgate import loop as L  # noqa: E402
from mlxgate.errors import UserError  # noqa: E402

# A random byte-level model is incoherent and its text is all replacement characters (rep_frac
# 1.0), so the filter's thresholds are opened wide: the test exercises the plumbing, not the filter.
TINY = dict(
    rounds=2, n_contexts=8, max_tokens=10, gen_batch=8, n_keep=4, min_kept=2, max_batches=2, probe_n=4,
    kappa_lo=0.5, kappa_hi=1.0, max_tail_ppl=1e9, max_rep_frac=1.01, epochs=2, lr=1e-2, rank=4, alpha=8.0, heal_batch=4,
    eval_limit=2, think_tokens=2, eval_batch=4, sample_n=1, coh_floor=0.0, seed=3,
)
ROUND_FILES = (
    "vector.safetensors", "vector.safetensors.json", "kept.jsonl", "dropped.jsonl", "probes.jsonl", "walk.json",
    "eval_steered.json", "adapters.safetensors", "adapter_config.json", "heal.json", "eval.json", "samples.jsonl", "done.json",
)
RUN_FILES = ("config.json", "events.jsonl", "report.md", "trait_coherence.png", "kl.png", "kept_kappa.png", "entropy.png")


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _check_parses(run: Path) -> None:
    """Every JSON / JSONL file of the run parses (no truncated or half-written file)."""
    for p in run.rglob("*"):
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".jsonl":
            raw = p.read_text()
            assert raw == "" or raw.endswith("\n"), p
            for line in raw.splitlines():
                json.loads(line)
        elif p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p
    assert not [p for p in run.rglob(".*") if p.name != ".write-test"], "temporary files left behind"


def _logits(model, ids) -> np.ndarray:
    out = model(mx.array([ids], dtype=mx.int32))
    return np.array(out.astype(mx.float32))[0]


@pytest.fixture(scope="module")
def tiny_dir(tiny_dirs):
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def loop_run(tiny_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("loop") / "run"
    events = []
    cfg = L.make_config("quick", model=tiny_dir, **TINY)
    res = L.run_loop(cfg, run, on_event=events.append)
    return cfg, res, events


# ----------------------------------------------------------------------------- settings


def test_presets_and_overrides():
    paper = L.make_config("paper")
    assert (paper.model, paper.rounds, paper.n_contexts, paper.max_tokens, paper.n_keep, paper.min_kept) == ("gemma-3-4b-it", 8, 256, 512, 64, 30)
    assert (paper.agg, paper.ref, paper.tau, paper.lam, paper.epochs, paper.rank, paper.alpha, paper.coh_floor) == ("rmse", "prev", 0.5, 0.3, 6, 32, 64.0, 0.95)
    assert paper.eval_limit is None and paper.think_tokens == 128
    quick = L.make_config("quick", rounds=3)
    assert quick.rounds == 3 and quick.n_contexts == 16 and quick.min_kept <= quick.n_keep and quick.preset == "quick"
    with pytest.raises(UserError, match="unknown preset 'fast'"):
        L.make_config("fast")
    with pytest.raises(UserError, match="--rounds must be at least 1"):
        L.make_config("quick", rounds=0)
    with pytest.raises(UserError, match="--min-kept"):
        L.make_config("quick", n_keep=4, min_kept=5)


def test_effective_floor():
    cfg = L.make_config("paper")
    assert L.effective_floor(cfg, 0.996) == 0.95
    assert L.effective_floor(cfg, 0.5) == pytest.approx(0.475)


# ----------------------------------------------------------------------------- a 2-round run


def test_run_directory_complete(loop_run):
    cfg, res, events = loop_run
    run = res.run_dir
    assert res.stopped == "completed"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    for name in ("eval.json", "samples.jsonl", "done.json"):
        assert (run / "rounds" / "r0" / name).is_file()
    for r in (1, 2):
        for name in ROUND_FILES:
            assert (run / "rounds" / f"r{r}" / name).is_file(), (r, name)
    _check_parses(run)

    config = json.loads((run / "config.json").read_text())
    assert config["format"] == L.FORMAT and config["settings"] == asdict(cfg)
    assert config["model_info"]["n_layers"] == 4 and config["backend"] and config["versions"]["mlx"]
    assert config["n_ranks"] == 1  # one process: no mlx.launch group
    start = [e for e in events if e["stage"] == "start"]
    assert len(start) == 1 and start[0]["n_ranks"] == 1

    records = L.load_records(run)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in (1, 2):
        rec = records[r]
        kept = [json.loads(x) for x in (run / "rounds" / f"r{r}" / "kept.jsonl").read_text().splitlines()]
        dropped = [json.loads(x) for x in (run / "rounds" / f"r{r}" / "dropped.jsonl").read_text().splitlines()]
        assert len(kept) == rec["kept"] == cfg.n_keep  # the wide-open filter keeps everything
        assert all(k["kept"] and "tail_ppl" in k["scores"] and k["entropy_mean"] > 0 for k in kept)
        assert all("reason" in d for d in dropped)
        assert rec["lora_rank"] == cfg.rank * r and rec["heal"]["round"] == r - 1
        assert set(rec["kl"]) == {"mean", "rmse", "p95", "max"} and rec["kl"]["max"] >= rec["kl"]["p95"] >= 0
        assert 0 < rec["eval"]["coherence"] < 1 and records[r]["eval_steered"]["n_rows"] == cfg.eval_limit
        eval_json = json.loads((run / "rounds" / f"r{r}" / "eval.json").read_text())
        assert eval_json["aggregates"] == rec["eval"]
        assert set(rec["timings"]) == {"extract", "generate_filter", "steered_eval", "heal", "bake", "eval"}
    # the events carry the dashboard's field names, in order
    stages = [e["stage"] for e in events]
    assert stages[0] == "start" and stages[-1] == "done" and stages.count("round_done") == 3
    assert {"extract", "walk", "settled", "collect", "filter", "steered_eval", "heal", "bake", "eval"} <= set(stages)
    heal_ev = [e for e in events if e["stage"] == "heal"]
    assert all(0 < e["progress"] <= 1 and set(e["kl"]) == {"mean", "rmse"} for e in heal_ev)
    bake_ev = [e for e in events if e["stage"] == "bake"]
    assert [e["lora_rank"] for e in bake_ev] == [4, 8] and all("sigma_max" in e["adapter_spectra"] for e in bake_ev)
    lines = (run / "events.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == events

    report = (run / "report.md").read_text()
    assert "Status: completed." in report and "| 2 |" in report and "![kl.png](kl.png)" in report


def test_adapters_load_in_mlx_lm_and_bake_matches_stack(loop_run, tiny_dir):
    from mlx_lm.utils import load as mlx_lm_load

    from mlxgate import bake, lora
    from mlxgate.models import load

    _, res, _ = loop_run
    run = res.run_dir
    ids = list(res.tokenizer.encode("The quick brown fox jumps over the lazy dog."))
    r1, r2 = run / "rounds" / "r1", run / "rounds" / "r2"

    # round 1's adapter in mlx-lm == base with round 1 folded in
    lm_model, _ = mlx_lm_load(tiny_dir, adapter_path=str(r1))
    folded1, _, _ = load(tiny_dir, dtype="float32")
    bake.fold(folded1, [lora.read_adapter(r1)[1]])
    base, _, _ = load(tiny_dir, dtype="float32")
    got, want, plain = _logits(lm_model, ids), _logits(folded1, ids), _logits(base, ids)
    assert np.abs(want - plain).max() > 1e-5  # round 1 changed the model
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)

    # the run's in-memory stack (base + r1 + r2, all on) == base with both rounds baked
    folded12, _, _ = load(tiny_dir, dtype="float32")
    bake.fold(folded12, [lora.read_adapter(r1)[1], lora.read_adapter(r2)[1]])
    stack = _logits(res.model, ids)
    np.testing.assert_allclose(stack, _logits(folded12, ids), atol=2e-4, rtol=1e-4)
    assert np.abs(stack - want).max() > 1e-6  # round 2 contributes

    # the filter's "base" view of the stacked model is the pristine model
    switch = lora.stacked_layers(res.model)[0][1].switch
    np.testing.assert_allclose(_logits(L.BaseView(res.model, switch), ids), plain, atol=1e-5)
    assert (switch.current, switch.prev) == (True, True)  # restored after the base view


def test_dashboard_follows_run(loop_run):
    from mlxgate.cli import main

    _, res, _ = loop_run
    out = CliRunner().invoke(main, ["dashboard", "--run", str(res.run_dir), "--once"])
    assert out.exit_code == 0, out.output
    assert "coherence" in out.output and "round" in out.output
    assert "· 1 rank" in out.output  # the group size of the run, from its start event


# ----------------------------------------------------------------------------- kill and resume


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "mlxgate.cli", "loop", "-q", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_in_round_two_then_resume(tiny_dir, tmp_path):
    run = tmp_path / "run"
    settings = {**TINY, "kappa": 0.8}  # a fixed dose: the walk is tested elsewhere, this test is about files
    proc = _cli("--preset", "quick", "--model", tiny_dir, "--run-dir", str(run), *_flags(settings))
    events = run / "events.jsonl"
    deadline = time.time() + 400
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if events.is_file() and any(json.loads(x).get("round") == 2 for x in events.read_text().splitlines() if x.endswith("}")):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed, f"round 2 never started: {proc.stderr.read()[-2000:]}"
    assert L.is_done(run, 1) and not L.is_done(run, 2)
    before = _hashes(run / "rounds" / "r1")
    config_before = (run / "config.json").read_bytes()

    # a conflicting setting or another model is refused, and nothing of the run changes
    from mlxgate.cli import main

    snapshot = _hashes(run)
    for extra, msg in ((["--rounds", "5"], "--rounds 5 conflicts"), (["--model", "other-model"], "is a run of model")):
        out = CliRunner().invoke(main, ["loop", "--resume", str(run), *extra])
        assert out.exit_code == 2 and msg in out.stderr, out.output
    assert _hashes(run) == snapshot

    proc = _cli("--resume", str(run))
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert L.is_done(run, 2)
    assert _hashes(run / "rounds" / "r1") == before  # round 1 not recomputed: byte-identical
    assert (run / "config.json").read_bytes() == config_before
    _check_parses(run)
    stages = [json.loads(x)["stage"] for x in (run / "events.jsonl").read_text().splitlines()]
    assert "resume" in stages and stages[-1] == "done"
    resume_ev = [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines() if '"resume"' in x][0]
    assert resume_ev["completed_rounds"] == [1]
    for name in ROUND_FILES:
        assert (run / "rounds" / "r2" / name).is_file()
    # round 2 trained on top of round 1 read back from its files
    assert json.loads((run / "rounds" / "r2" / "done.json").read_text())["lora_rank"] == 2 * TINY["rank"]


# ----------------------------------------------------------------------------- bad input


def _invoke(*args, env=None):
    from mlxgate.cli import main

    return CliRunner().invoke(main, ["loop", *args], env=env)


def _one_line_error(out, pattern: str) -> None:
    assert out.exit_code == 2, out.output
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and pattern in lines[0], out.stderr
    assert "Traceback" not in out.output


def test_bad_input(tmp_path, tiny_dir):
    _one_line_error(_invoke("--preset", "fast"), "unknown preset 'fast'")
    _one_line_error(_invoke("--preset", "quick", "--rounds", "0"), "--rounds must be at least 1")
    not_run = tmp_path / "not_a_run"
    not_run.mkdir()
    (not_run / "notes.txt").write_text("hello")
    _one_line_error(_invoke("--resume", str(not_run)), "not a loop run")
    assert (not_run / "notes.txt").read_text() == "hello" and len(list(not_run.iterdir())) == 1
    bad_cfg = tmp_path / "bad_cfg"
    bad_cfg.mkdir()
    (bad_cfg / "config.json").write_text('{"format": "something else"}')
    _one_line_error(_invoke("--resume", str(bad_cfg)), "is not an mlxgate loop config")
    # run dir under a regular file: the file is untouched
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    _one_line_error(_invoke("--preset", "quick", "--model", tiny_dir, "--run-dir", str(blocker / "run")), "cannot create run directory")
    assert blocker.read_text() == "keep me"
    # an existing run is never overwritten by a new one
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text(json.dumps({"format": L.FORMAT, "settings": {}}))
    _one_line_error(_invoke("--preset", "quick", "--model", tiny_dir, "--run-dir", str(existing)), "--resume")
    assert json.loads((existing / "config.json").read_text()) == {"format": L.FORMAT, "settings": {}}


def test_uncached_model_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MLXGATE_HOME", str(tmp_path / "home"))
    run = tmp_path / "run"
    out = _invoke("--run-dir", str(run))  # the default model: gemma-3-4b-it
    _one_line_error(out, "gemma-3-4b-it")
    assert "--model smollm2-135m-instruct" in out.stderr and "fetch" in out.stderr
    assert not run.exists()  # no empty run directory left behind
