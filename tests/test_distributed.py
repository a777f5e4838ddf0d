"""mlxgate.distributed and data parallelism under ``mlx.launch -n 2 --backend ring``.

The 2-rank tests launch real processes on this machine (skipped, with the reason, where the ring
backend cannot start). They compare against a single process on the same data: heal's adapter
weights and per-step barrier values, and sharded measure output token for token.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import mlxgate  # noqa: F401

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlxgate import distributed as D  # noqa: E402
from mlxgate.fixtures import make_tiny_checkpoint  # noqa: E402

from _ring import PY, launch, ring_dir  # noqa: E402

SCRIPTS = Path(__file__).parent / "dist_scripts"


def _launch(args: list[str], cwd: Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return launch([PY, *args], cwd, timeout, env)


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> Path:
    """A working directory where a 2-rank ring job is known to run; skips the test otherwise."""
    return ring_dir(tmp_path_factory)


def test_two_rank_helpers(ring):
    """broadcast takes rank 0's object; gather_ordered puts results in index order on every rank;
    rank_batches deals whole batches (5 items, batches of 2: rank 0 gets batches 0-1, rank 1 batch 2)."""
    lines = sorted(x for x in (ring / "probe.out").read_text().splitlines() if x.startswith("BCAST"))
    assert lines == ["BCAST {'r': 0} [0, 10] [(0, [0, 1]), (1, [2, 3])]", "BCAST {'r': 0} [0, 10] [(2, [4])]"]


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("dist") / "llama6", "llama", seed=3, n_layers=6))


# ----------------------------------------------------------------------------- single-process helpers


def test_shard_blocks_cover_in_order():
    items = list("abcdefg")
    parts = [D.shard(items, 3, r) for r in range(3)]
    assert [p[0] for p in parts] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [x for p in parts for x in p[1]] == items
    assert D.shard([], 2, 1) == ([], [])
    assert D.shard(["a"], 2, 1) == ([], [])


def test_size_one_is_identity():
    assert (D.size(), D.rank(), D.is_main(), D.prefix()) == (1, 0, True, "")
    assert D.gather_ordered(["x", "y"], [0, 1]) == ["x", "y"]
    tree = {"a": mx.ones(3)}
    assert D.all_sum_tree(tree) is tree
    assert D.all_sum_scalars([1.5, 2.0]) == [1.5, 2.0]
    assert D.main_only(lambda v: v + 1, 1) == 2
    assert D.error_prefix() == ""
    assert D.broadcast({"round": 3}) == {"round": 3}


# ----------------------------------------------------------------------------- two ranks


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("agg,compiled", [("rmse", "1"), ("p95", "0")])
def test_heal_two_ranks_equals_single_process(ring, fixture_dir, agg, compiled):
    """5 steps, global micro-batch 4 (one step has a single row, so rank 1 holds none): the
    adapter weights and every step's barrier aggregate match one process on the same batches."""
    script = str(SCRIPTS / "heal_dp.py")
    single = subprocess.run([PY, script, fixture_dir, "single", agg, compiled], cwd=ring, capture_output=True, text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    dp = _launch([script, fixture_dir, "dp", agg, compiled], ring)
    assert dp.returncode == 0, dp.stderr[-2000:]
    ref, r0, r1 = (mx.load(str(ring / f)) for f in ("single.rank0.safetensors", "dp.rank0.safetensors", "dp.rank1.safetensors"))
    assert sorted(ref) == sorted(r0) == sorted(r1)
    rel = max(_rel(np.array(r0[k], np.float64), np.array(ref[k], np.float64)) for k in ref)
    assert rel <= 1e-5, f"adapter weights differ from the single process by {rel:.2e} (relative)"
    for k in ref:  # every rank ends with the same weights, bit for bit
        assert np.array_equal(np.array(r0[k]), np.array(r1[k])), k
    hs, hd = (json.loads((ring / f).read_text()) for f in ("single.json", "dp.json"))
    assert hd["summary"]["n_ranks"] == 2 and hs["summary"]["n_ranks"] == 1
    assert len(hs["history"]) == len(hd["history"]) == 5
    for a, b in zip(hs["history"], hd["history"]):
        assert a["tokens"] == b["tokens"]
        assert b["kl_agg"] == pytest.approx(a["kl_agg"], rel=1e-4, abs=1e-7)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert max(h["kl_agg"] for h in hs["history"]) > 1e-3  # the barrier saw real KL, not only zeros
    assert (ring / "dp.adapter" / "adapters.safetensors").exists()  # written by rank 0 only, once


def test_dead_rank_stops_the_other_with_its_name(ring, fixture_dir):
    """Rank 1 SIGKILLs itself after 2 steps of a long run: rank 0 stops at once with a message
    naming rank 1, and no adapter (or half-written temporary) is left behind."""
    p = _launch([str(SCRIPTS / "heal_dp.py"), fixture_dir, "dead", "rmse", "1", "1", "2"], ring, timeout=120, env={"MLXGATE_DIST_TIMEOUT": "60"})
    assert p.returncode != 0 or "exited with code" in p.stderr
    assert "rank 0: lost contact with rank 1" in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert not (ring / "dead.adapter").exists()
    assert not [f for f in os.listdir(ring) if f.startswith(".dead.adapter")]


def test_measure_sharded_equals_unsharded(ring, fixture_dir):
    """7 prompts in decode batches of 2 over 2 ranks (batches 2+2 | 2+1): every rank gets the
    gathered report, identical to one process token for token and in entropy."""
    script = str(SCRIPTS / "measure_dp.py")
    single = subprocess.run([PY, script, fixture_dir, "m1.json", "2"], cwd=ring, capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-2000:]
    dp = _launch([script, fixture_dir, "m2.json", "2"], ring, timeout=120)
    assert dp.returncode == 0, dp.stderr[-2000:]
    one = json.loads((ring / "m1.json.rank0").read_text())
    for r in (0, 1):
        two = json.loads((ring / f"m2.json.rank{r}").read_text())
        assert [row["prompt"] for row in two["prompts"]] == [row["prompt"] for row in one["prompts"]]
        assert [row["token_ids"] for row in two["prompts"]] == [row["token_ids"] for row in one["prompts"]]
        assert sum(len(row["token_ids"]) for row in one["prompts"]) == 7 * 12 - sum(12 - len(row["token_ids"]) for row in one["prompts"])
        for a, b in zip(one["prompts"], two["prompts"]):
            np.testing.assert_array_equal(a["entropy"], b["entropy"])
        assert two["overall"] == one["overall"]
