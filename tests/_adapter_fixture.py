"""Test helpers: LoRA adapters in mlx-lm's own format, and perturbed checkpoint copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten


def make_adapter(model_dir: str, out_dir, rank: int = 4, scale: float = 2.0, num_layers: int = 2, b_std: float = 0.05, seed: int = 3) -> Path:
    """adapters.safetensors + adapter_config.json for the model at ``model_dir``, as mlx-lm writes
    them (linear_to_lora_layers on the last ``num_layers`` blocks); lora_b ~ N(0, b_std²) so ΔW
    is nonzero (b_std = 0 gives the fresh-adapter B = 0)."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from mlxgate.models import load

    model, _, _ = load(model_dir)
    params = {"rank": rank, "scale": scale, "dropout": 0.0}
    linear_to_lora_layers(model, num_layers, params)
    rng = np.random.default_rng(seed)
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if name.endswith("lora_b"):
            value = mx.array(rng.normal(0.0, b_std, size=value.shape).astype(np.float32))
        if name.endswith(("lora_a", "lora_b")):
            weights[name] = value
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    config = {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": params}
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def perturbed_copy(model_dir: str, out_dir, std: float = 0.05, seed: int = 7) -> Path:
    """A copy of a checkpoint with N(0, std²) noise added to every block's MLP down projection."""
    out = Path(out_dir)
    shutil.copytree(model_dir, out)
    weights = mx.load(str(out / "model.safetensors"))
    rng = np.random.default_rng(seed)
    for name in list(weights):
        if name.endswith("mlp.down_proj.weight"):
            w = weights[name]
            weights[name] = w + mx.array(rng.normal(0.0, std, size=w.shape).astype(np.float32)).astype(w.dtype)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out
