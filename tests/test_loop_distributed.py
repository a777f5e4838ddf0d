"""`mlxgate loop` under ``mlx.launch -n 2 --backend ring``: the same run as one process, only rank 0
writing the run directory, and a rank killed mid-round leaving a run that resumes.

The launched runs are the real CLI (``python -m mlxgate.cli loop``) on the tiny llama fixture; the
single-process run is the library on the same settings. Skipped, with the reason, where the ring
backend cannot start two ranks here.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from _ring import LAUNCH, PY, ring_dir  # noqa: E402
from mlxgate import loop as L  # noqa: E402

# Settings of tests/test_loop.py's TINY, with decode and eval batches small enough that both ranks
# get work: 8 contexts in batches of 4 (one per rank), 2 vignettes x 2 frames in batches of 2.
TINY = dict(
    rounds=2, n_contexts=8, max_tokens=10, gen_batch=4, n_keep=4, min_kept=2, max_batches=2, probe_n=4,
    kappa_lo=0.5, kappa_hi=1.0, max_tail_ppl=1e9, max_rep_frac=1.01, epochs=2, lr=1e-2, rank=4, alpha=8.0, heal_batch=4,
    eval_limit=2, think_tokens=2, eval_batch=2, sample_n=1, coh_floor=0.0, seed=3,
)


def _flags(model: str, run: Path) -> list[str]:
    out = ["--preset", "quick", "--model", model, "--run-dir", str(run)]
    for k, v in TINY.items():
        out += ["--" + k.replace("_", "-"), str(v)]
    return out


def _launch_cmd(args: list[str]) -> list[str]:
    return [str(LAUNCH), "-n", "2", "--backend", "ring", "--", PY, "-m", "mlxgate.cli", "loop", *args]


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "events.jsonl").read_text().splitlines()]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _kept_ids(run: Path, r: int) -> list[list[int]]:
    return [json.loads(x)["completion_ids"] for x in (run / "rounds" / f"r{r}" / "kept.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> Path:
    return ring_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def single(tiny_dirs, tmp_path_factory):
    run = tmp_path_factory.mktemp("loop1") / "run"
    cfg = L.make_config("quick", model=tiny_dirs["llama"], **TINY)
    L.run_loop(cfg, run)
    return run


@pytest.fixture(scope="module")
def launched(ring, tiny_dirs):
    run = ring / "run2"
    p = subprocess.run(_launch_cmd(_flags(tiny_dirs["llama"], run)), cwd=ring, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    return run, p


def test_two_ranks_run_the_same_loop(single, launched):
    """Same doses, same kept completions, same evaluation and (to the summation order of the
    gradient all-reduce) the same adapters as one process."""
    from safetensors.numpy import load_file

    run2, _ = launched
    one, two = L.load_records(single), L.load_records(run2)
    assert [r["round"] for r in two] == [0, 1, 2]
    # Round 1 starts from the same base: sharded extraction, generation and filter scoring give
    # the single process's bits (whole batches per rank, rows gathered in order).
    v1, v2 = (load_file(str(d / "rounds" / "r1" / "vector.safetensors")) for d in (single, run2))
    assert sorted(v1) == sorted(v2) and all(np.array_equal(v1[k], v2[k]) for k in v1)
    for name in ("probes.jsonl", "kept.jsonl", "dropped.jsonl"):
        assert (single / "rounds" / "r1" / name).read_bytes() == (run2 / "rounds" / "r1" / name).read_bytes(), name
    for a, b in zip(one, two):
        for key, value in a["eval"].items():
            if isinstance(value, float):
                assert b["eval"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for r in (1, 2):
        a, b = one[r], two[r]
        assert (a["kappa"], a["kept"], a["dropped"]) == (b["kappa"], b["kept"], b["dropped"])
        assert _kept_ids(single, r) == _kept_ids(run2, r)
        assert b["heal"]["n_ranks"] == 2 and a["heal"]["n_ranks"] == 1
        for k in ("mean", "rmse", "p95", "max"):
            assert b["kl"][k] == pytest.approx(a["kl"][k], rel=1e-3)
        wa = mx.load(str(single / "rounds" / f"r{r}" / "adapters.safetensors"))
        wb = mx.load(str(run2 / "rounds" / f"r{r}" / "adapters.safetensors"))
        assert sorted(wa) == sorted(wb)
        for k in wa:
            x, y = np.array(wa[k]), np.array(wb[k])
            # lr 1e-2 Adam turns summation-order differences of near-zero gradients into update
            # differences; the heal test pins the tight (1e-5) bound at a small learning rate.
            assert np.max(np.abs(x - y)) <= 2e-3 * np.max(np.abs(x)), k


def test_only_rank_zero_writes(single, launched):
    run2, p = launched
    assert sorted(_hashes(run2)) == sorted(_hashes(single))  # the same files, no extra per-rank ones
    assert not [q for q in run2.rglob(".*") if q.name != ".write-test"]
    stages = [(e["round"], e["stage"]) for e in _events(run2)]
    for once in [(0, "start"), (0, "round_done"), (1, "round_done"), (2, "round_done"), (2, "done"), (1, "bake"), (2, "bake")]:
        assert stages.count(once) == 1, once  # one writer: no event twice
    assert json.loads((run2 / "config.json").read_text())["n_ranks"] == 2
    assert [e["n_ranks"] for e in _events(run2) if e["stage"] == "start"] == [2]
    assert p.stdout.strip().splitlines() == [str(run2)]  # the run directory, printed by rank 0 only
    rank1 = [x for x in p.stderr.splitlines() if x.startswith("[rank 1/2] ")]
    assert any("round_done" in x for x in rank1) and rank1[-1] == "[rank 1/2] completed; the run directory is on rank 0"
    assert not any(x.startswith("[rank 1/2]") and " heal:" in x for x in p.stderr.splitlines())  # one line per round, not per step

    from mlxgate.cli import main

    out = CliRunner().invoke(main, ["dashboard", "--run", str(run2), "--once"])
    assert out.exit_code == 0 and "· 2 ranks" in out.output, out.output


def _rank_pid(run: Path, want: int) -> int | None:
    """The pid of the loop process of rank ``want`` (mlx.launch exports MLX_RANK to each)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(run).encode() in cmd and b"mlxgate.cli" in cmd and f"MLX_RANK={want}".encode() in env:
            return int(d.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds rank 1's process through /proc")
def test_dead_rank_leaves_a_resumable_run(ring, tiny_dirs, single):
    """SIGKILL rank 1 once round 2 has started: rank 0 stops with a line naming rank 1, round 1
    stays committed and parseable, and the run resumes to the single process's round 2."""
    run = ring / "run_killed"
    proc = subprocess.Popen(_launch_cmd(_flags(tiny_dirs["llama"], run)), cwd=ring, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "MLXGATE_DIST_TIMEOUT": "60"})
    events, killed, deadline = run / "events.jsonl", False, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if events.is_file() and any(x.endswith("}") and json.loads(x)["round"] == 2 for x in events.read_text().splitlines()):
            pid = _rank_pid(run, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert killed, f"round 2 never started under mlx.launch: {err[-2000:]}"
    assert "rank 0: lost contact with rank 1" in err, err[-3000:]
    assert "Traceback" not in err
    assert L.is_done(run, 1) and not L.is_done(run, 2)
    for q in run.rglob("*.json*"):  # nothing truncated: every JSON file and JSONL line parses
        if q.name.startswith("."):
            continue
        for line in (q.read_text().splitlines() if q.suffix == ".jsonl" else [q.read_text()]):
            json.loads(line)
    r1 = _hashes(run / "rounds" / "r1")

    res = subprocess.run([PY, "-m", "mlxgate.cli", "loop", "-q", "--resume", str(run)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert L.is_done(run, 2) and _hashes(run / "rounds" / "r1") == r1
    assert _kept_ids(run, 2) == _kept_ids(single, 2)
    assert [e["stage"] for e in _events(run)].count("resume") == 1
