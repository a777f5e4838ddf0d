"""The real CLI commands, unchanged, under ``mlx.launch -n 2 --backend ring`` (issue 9).

Each launched command runs ``python -m mlxgate.cli ...`` on 2 ranks, every rank in its own working
directory (``r0/``, ``r1/``: relative output paths land there) with its stdout and stderr in files,
so the tests see exactly what each rank wrote and printed. The outputs are compared with the same
command run as one process on a tiny llama fixture. Skipped, with the reason, where the ring
backend cannot start.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import mlxgate  # noqa: F401

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mlxgate.fixtures import make_tiny_checkpoint  # noqa: E402

from _ring import PY, launch, ring_dir  # noqa: E402

CLI = [PY, "-m", "mlxgate.cli"]
# Per-rank working directory and output files; "$0" "$@" is the CLI command line.
PER_RANK = 'mkdir -p r$MLX_RANK && cd r$MLX_RANK && exec "$0" "$@" >stdout.txt 2>stderr.txt'
PROMPTS = ["one", "two words", "a third prompt here", "four", "the fifth and last"]  # batches of 2: 2+2 | 1


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> Path:
    return ring_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("cli_dist") / "llama", "llama", seed=1))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ckpt) -> Path:
    """prompts.txt, kept.jsonl (heal data) and v.safetensors (steer extract, one process)."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    words = ["red", "blue", "green", "gold"]
    rows = [{"prompt": f"colour {i}?", "completion": f"It is {words[i % 4]}." * (1 + i % 3)} for i in range(9)]
    (d / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = single(["steer", "extract", "-m", ckpt, "--n", "4", "--batch-size", "4", "-o", "v.safetensors"], d)
    assert (d / "v.safetensors").exists(), p.stderr
    return d


def single(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


def launched(args: list[str], cwd: Path) -> tuple[Path, Path]:
    """Run the CLI command on 2 ranks in ``cwd``; returns the ranks' working directories."""
    p = launch(["bash", "-c", PER_RANK, *CLI, *args], cwd, timeout=180)
    r0, r1 = cwd / "r0", cwd / "r1"
    errs = "".join(f"\n--- {r.name}:\n" + (r / "stderr.txt").read_text()[-1500:] for r in (r0, r1) if (r / "stderr.txt").exists())
    assert p.returncode == 0 and "exited with code" not in p.stderr, p.stderr[-1500:] + errs
    return r0, r1


def files(d: Path) -> set[str]:
    return {str(f.relative_to(d)) for f in d.rglob("*") if f.is_file()}


def assert_rank1_quiet(r1: Path, must_log: bool = False) -> None:
    """Rank 1 wrote no file, printed nothing on stdout, and every stderr line names it."""
    assert files(r1) == {"stdout.txt", "stderr.txt"}, files(r1)
    assert (r1 / "stdout.txt").read_text() == ""
    lines = (r1 / "stderr.txt").read_text().splitlines()
    assert all(line.startswith("[rank 1/2] ") for line in lines), lines
    if must_log:
        assert lines, "rank 1 logged nothing"


def _same_measure(one: dict, two: dict) -> None:
    assert [r["prompt"] for r in two["prompts"]] == PROMPTS == [r["prompt"] for r in one["prompts"]]
    for a, b in zip(one["prompts"], two["prompts"]):
        assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
        np.testing.assert_allclose(b["entropy"], a["entropy"], rtol=0, atol=1e-5)
        assert (a["n"], a["finish"], a["basin"]) == (b["n"], b["finish"], b["basin"])
    assert two["overall"]["pooled"]["n"] == one["overall"]["pooled"]["n"]
    assert two["overall"]["pooled"]["mean"] == pytest.approx(one["overall"]["pooled"]["mean"], abs=1e-5)
    assert two["settings"] == one["settings"] and two["model"] == one["model"]


# ----------------------------------------------------------------------------- measure


def test_measure_greedy_under_launch(ring, ckpt, tmp_path):
    """Greedy measure, 5 prompts in batches of 2 (rank 0: batches 0-1, rank 1: batch 2): the one
    JSON file rank 0 writes equals the single process token for token, in input order."""
    args = ["measure", "-m", ckpt, *(x for p in PROMPTS for x in ("-p", p)), "--max-tokens", "4", "--batch-size", "2", "--format", "json", "--out", "m.json"]
    single(args, tmp_path)
    r0, r1 = launched(args, tmp_path)
    one, two = (json.loads((d / "m.json").read_text()) for d in (tmp_path, r0))
    _same_measure(one, two)
    # the order check has teeth: each prompt's H_t differs from every other's
    assert len({round(r["mean"], 4) for r in one["prompts"]}) == len(PROMPTS)
    assert files(r0) == {"m.json", "stdout.txt", "stderr.txt"} and (r0 / "stdout.txt").read_text() == ""
    assert_rank1_quiet(r1)


def test_measure_sampled_under_launch(ring, ckpt, inputs, tmp_path):
    """temp 1, seed 7, JSON on stdout: each batch is seeded from (seed, global batch index), so
    the sampled tokens equal the single process's although rank 1 starts at batch 2; only rank 0
    prints the report."""
    args = ["measure", "-m", ckpt, "--prompts", str(inputs / "prompts.txt"), "--max-tokens", "5", "--batch-size", "2",
            "--temp", "1.0", "--seed", "7", "--format", "json"]
    one = json.loads(single(args, tmp_path).stdout)
    r0, r1 = launched(args, tmp_path)
    two = json.loads((r0 / "stdout.txt").read_text())
    _same_measure(one, two)
    assert len({tuple(r["token_ids"]) for r in one["prompts"]}) == len(PROMPTS)  # really sampled
    assert_rank1_quiet(r1)


# ----------------------------------------------------------------------------- heal


def test_heal_under_launch(ring, ckpt, inputs, tmp_path):
    """2 epochs of 2 steps (8 train rows, micro-batch 4, 1 validation row): adapter weights equal
    the single process's (<= 1e-5 relative); only rank 0 writes the adapter directory; rank 1's
    log line carries its rank."""
    args = ["heal", "-m", ckpt, "--data", str(inputs / "kept.jsonl"), "--out", "a.adapter", "--epochs", "2", "--batch-size", "4",
            "--rank", "4", "--alpha", "8", "--lr", "2e-3", "--tau", "0", "--seed", "0"]
    single(args, tmp_path)
    r0, r1 = launched(args, tmp_path)
    ref, got = (mx.load(str(d / "a.adapter" / "adapters.safetensors")) for d in (tmp_path, r0))
    assert sorted(ref) == sorted(got) and len(ref) > 0
    for k in ref:
        a, b = np.array(ref[k], np.float64), np.array(got[k], np.float64)
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), k
    h1, h2 = (json.loads((d / "a.adapter" / "heal.json").read_text()) for d in (tmp_path, r0))
    assert (h1["summary"]["n_ranks"], h2["summary"]["n_ranks"]) == (1, 2)
    assert [h["tokens"] for h in h1["history"]] == [h["tokens"] for h in h2["history"]] and len(h1["history"]) == 4
    for a, b in zip(h1["history"], h2["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert h2["val"][-1]["sft"] == pytest.approx(h1["val"][-1]["sft"], rel=1e-5)
    assert "healed 8 examples" in (r0 / "stderr.txt").read_text()
    assert_rank1_quiet(r1, must_log=True)
    assert "rank 0 writes a.adapter" in (r1 / "stderr.txt").read_text()


# ----------------------------------------------------------------------------- eval tinymfv


def test_tinymfv_under_launch(ring, ckpt, tmp_path):
    """3 vignettes x 2 frames in batches of 2 (rank 0: 4 jobs, rank 1: 2): the JSON equals the
    single process's, all but the wall time."""
    args = ["eval", "tinymfv", "-m", ckpt, "--limit", "3", "--think-tokens", "3", "--batch-size", "2", "--format", "json", "--out", "t.json"]
    single(args, tmp_path)
    r0, r1 = launched(args, tmp_path)
    one, two = (json.loads((d / "t.json").read_text()) for d in (tmp_path, r0))
    for d in (one, two):
        d["settings"].pop("seconds")
    assert [r["id"] for r in one["rows"]] == [r["id"] for r in two["rows"]] and len(one["rows"]) == 3
    for a, b in zip(one["rows"], two["rows"]):
        assert (a["think_A"], a["think_B"], a["model_top"]) == (b["think_A"], b["think_B"], b["model_top"])
        for o in a["p"]:
            assert b["p"][o] == pytest.approx(a["p"][o], abs=1e-6)
    assert two["settings"] == one["settings"]
    for k, v in one["aggregates"].items():
        assert two["aggregates"][k] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), k
    assert_rank1_quiet(r1)


# ----------------------------------------------------------------------------- steer generate


@pytest.mark.parametrize("temp", ["0", "1.0"])
def test_steer_generate_under_launch(ring, ckpt, inputs, tmp_path, temp):
    """Steered generation of 5 prompts in batches of 2 with a vector from `steer extract`: the
    JSONL rank 0 writes equals the single process's, greedy and sampled (seed 3)."""
    args = ["steer", "generate", "-m", ckpt, "-v", str(inputs / "v.safetensors"), "-c", "2", "--prompts", str(inputs / "prompts.txt"),
            "--max-tokens", "4", "--batch-size", "2", "--temp", temp, "--seed", "3", "-o", "g.jsonl"]
    single(args, tmp_path)
    r0, r1 = launched(args, tmp_path)
    one, two = ([json.loads(x) for x in (d / "g.jsonl").read_text().splitlines()] for d in (tmp_path, r0))
    assert [r["prompt"] for r in one] == [r["prompt"] for r in two] == PROMPTS
    for a, b in zip(one, two):
        assert a["completion_ids"] == b["completion_ids"] and a["finish"] == b["finish"]
        assert b["entropy_mean"] == pytest.approx(a["entropy_mean"], abs=1e-5)
    if temp != "0":
        assert len({tuple(r["completion_ids"]) for r in one}) == len(PROMPTS)
    assert "wrote 5 completions" in (r0 / "stderr.txt").read_text()
    assert_rank1_quiet(r1, must_log=True)  # the dose line, prefixed


def test_steer_extract_under_launch(ring, ckpt, tmp_path):
    """6 contexts x 2 personas = 12 prompts in batches of 4 (rank 0: batches 0-1, rank 1: batch 2):
    the hidden states are gathered in order, so the vector is the single process's, bit for bit."""
    from safetensors.numpy import load_file

    args = ["steer", "extract", "-m", ckpt, "--n", "6", "--batch-size", "4", "-o", "v.safetensors"]
    single(args, tmp_path)
    r0, r1 = launched(args, tmp_path)
    one, two = load_file(str(tmp_path / "v.safetensors")), load_file(str(r0 / "v.safetensors"))
    assert sorted(one) == sorted(two) and one
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])
    assert_rank1_quiet(r1)


def test_steer_filter_under_launch(ring, ckpt, inputs, tmp_path):
    """--filter-dir: each rank scores its block of the completions; the kept/dropped files rank 0
    writes equal the single process's byte for byte."""
    args = ["steer", "generate", "-m", ckpt, "-v", str(inputs / "v.safetensors"), "-c", "2", "--prompts", str(inputs / "prompts.txt"),
            "--max-tokens", "6", "--batch-size", "2", "--temp", "1.0", "--seed", "5", "-o", "g.jsonl", "--filter-dir", "f"]
    single(args, tmp_path)
    r0, r1 = launched(args, tmp_path)
    for name in ("kept.jsonl", "dropped.jsonl"):
        assert (tmp_path / "f" / name).read_bytes() == (r0 / "f" / name).read_bytes(), name
    rows = [json.loads(x) for n in ("kept.jsonl", "dropped.jsonl") for x in (r0 / "f" / n).read_text().splitlines()]
    assert len(rows) == len(PROMPTS) and all(r["scores"]["tail_ppl"] is not None for r in rows)
    assert_rank1_quiet(r1, must_log=True)


# ----------------------------------------------------------------------------- one process


def test_batch_seeds_single_process(ckpt):
    """Alone, every batch is this rank's; batch 0 keeps the seed (a one-batch run samples exactly as
    a plain seeded ``generate``), later batches get distinct seeds; unseeded stays unseeded."""
    from mlxgate.batches import batch_seed, rank_batches
    from mlxgate.generate import generate
    from mlxgate.measure import measure_prompts
    from mlxgate.models import load
    from mlxgate.prompts import prompt_ids

    assert rank_batches(5, 2) == [(0, [0, 1]), (1, [2, 3]), (2, [4])]
    assert rank_batches(0, 3) == [] and rank_batches(2, 0) == [(0, [0]), (1, [1])]
    assert batch_seed(None, 3) is None and batch_seed(11, 0) == 11
    seeds = {batch_seed(s, b) for s in range(4) for b in range(1, 50)}
    assert len(seeds) == 4 * 49 and not seeds & set(range(4))
    model, tok, _ = load(ckpt)
    rep = measure_prompts(model, tok, PROMPTS[:3], max_tokens=5, temp=1.0, seed=7, batch_size=3)
    ref = generate(model, [prompt_ids(tok, p) for p in PROMPTS[:3]], 5, set(tok.eos_token_ids), temp=1.0, seed=7, batch_size=3)
    assert [r["token_ids"] for r in rep["prompts"]] == [c.tokens for c in ref]


def test_bad_input_names_the_rank(ring):
    """A bad flag under launch: the error line carries the rank. Both ranks fail the same way, and
    mlx.launch SIGTERMs the other as soon as the first exits, so the slower one may print nothing;
    whatever a rank prints is that one prefixed line."""
    for r in (0, 1):
        (ring / f"r{r}" / "stderr.txt").unlink(missing_ok=True)
    launch(["bash", "-c", PER_RANK, *CLI, "measure", "--model", str(ring / "no-such-model"), "--prompt", "hi"], ring, timeout=60)
    printed = 0
    for r in (0, 1):
        lines = [x for x in (ring / f"r{r}" / "stderr.txt").read_text().splitlines() if x.strip()]
        assert len(lines) <= 1, lines
        for line in lines:
            assert line.startswith(f"[rank {r}] mlxgate: error: model path not found"), lines
            printed += 1
    assert printed >= 1
