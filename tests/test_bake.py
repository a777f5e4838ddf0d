"""Bake (SPEC §5.5): a stack of rounds folded into the weights gives the unfused stack's logits,
loads with mlxgate and mlx-lm, and matches mlx-lm's own fuse of the same adapter."""

from __future__ import annotations

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlxgate import heal as H
from mlxgate import lora
from mlxgate.bake import bake
from mlxgate.fixtures import make_tiny_checkpoint
from mlxgate.models import load

IDS = mx.array([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bake")
    return {
        "llama": str(make_tiny_checkpoint(root / "llama6", "llama", seed=5, n_layers=6)),
        "gemma3_text": str(make_tiny_checkpoint(root / "gemma", "gemma3_text", seed=6, n_layers=5)),
    }


def _round(model_dir: str, out: Path, prev: list[Path], seed: int, rank: int = 4, alpha: float = 8.0):
    """One adapter round with random non-zero B (as if trained), stacked on ``prev``; returns the
    in-memory stacked model (all rounds on)."""
    model, _, _ = load(model_dir)
    lora.attach(model, rank, alpha / rank, [lora.read_adapter(p)[1] for p in prev], seed=seed)
    rng = np.random.default_rng(seed)
    for _, m in lora.stacked_layers(model):
        m.lora_b = mx.array(rng.normal(0, 0.2, m.lora_b.shape), dtype=mx.float32)
    cfg = H.HealConfig(rank=rank, alpha=alpha)
    H.save_adapter(out, H.HealResult(lora.current_weights(model), len(model.layers), cfg))
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bake_stack_matches_unfused_stack(dirs, tmp_path, family):
    r0, r1 = tmp_path / "r0", tmp_path / "r1"
    _round(dirs[family], r0, [], seed=1)
    stacked = _round(dirs[family], r1, [r0], seed=2, rank=8, alpha=16.0)  # ranks may differ per round
    want = np.array(stacked(IDS))
    out = bake(dirs[family], [r0, r1], tmp_path / "baked")
    baked, tok, info = load(str(out))
    got = np.array(baked(IDS))
    plain, _, _ = load(dirs[family])
    assert np.abs(want - np.array(plain(IDS))).max() > 1e-2  # the stack changes the model
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert info.n_layers == len(plain.layers) and not any(isinstance(m, lora.StackedLoRALinear) for _, m in baked.named_modules())
    src_files = {p.name for p in Path(dirs[family]).iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= src_files <= {p.name for p in out.iterdir()}
    assert tok.encode("abc") == load(dirs[family])[1].encode("abc")
    rec = json.loads((out / "bake.json").read_text())
    assert rec["adapters"] == [str(r0.resolve()), str(r1.resolve())] and rec["modules"] == 7 * 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bake_matches_mlx_lm_fuse(dirs, tmp_path, monkeypatch):
    """mlx-lm's own fuse of our adapter (its loader picks the last num_layers blocks) equals bake."""
    from mlx_lm import fuse as mlx_fuse
    from mlx_lm.utils import load as mlx_lm_load

    r0 = tmp_path / "r0"
    _round(dirs["llama"], r0, [], seed=3)
    ours = bake(dirs["llama"], [r0], tmp_path / "baked")
    monkeypatch.setattr(sys, "argv", ["fuse", "--model", dirs["llama"], "--adapter-path", str(r0), "--save-path", str(tmp_path / "mlxfused")])
    mlx_fuse.main()
    theirs, _ = mlx_lm_load(str(tmp_path / "mlxfused"))
    mine, _ = mlx_lm_load(str(ours))
    np.testing.assert_allclose(np.array(mine(IDS)), np.array(theirs(IDS)), atol=1e-4)


def _cli(args):
    from mlxgate.cli import main

    return CliRunner().invoke(main, args)


def test_cli_bake_and_bad_adapters(dirs, tmp_path):
    r0 = tmp_path / "r0"
    stacked = _round(dirs["llama"], r0, [], seed=4)
    res = _cli(["bake", "--model", dirs["llama"], "--adapters", str(r0), "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.array(load(str(tmp_path / "b"))[0](IDS)), np.array(stacked(IDS)), atol=1e-4)

    wrong = tmp_path / "wrong"  # an adapter made for a model with another hidden size
    other = make_tiny_checkpoint(tmp_path / "other", "llama", seed=0, n_layers=6, hidden=32)
    _round(str(other), wrong, [], seed=5)
    for adapters, needle in (([str(tmp_path / "missing")], "not an adapter directory"), ([str(wrong)], "shape")):
        args = ["bake", "--model", dirs["llama"], "--out", str(tmp_path / "bad")]
        for a in adapters:
            args += ["--adapters", a]
        res = _cli(args)
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert res.exit_code == 2 and len(lines) == 1 and needle in lines[0], res.output
        assert not (tmp_path / "bad").exists()
