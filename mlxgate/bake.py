"""Bake: fold a stack of LoRA rounds into the weights and write an HF-layout checkpoint (SPEC §5.5).

W' = W + Σ_rounds scale_r · (lora_a_r @ lora_b_r)ᵀ for every adapted projection, summed in float32,
then cast to the output dtype. The result (config.json, safetensors, the source's tokenizer files)
loads with :func:`mlxgate.models.load` and with mlx-lm. Adapters are read in mlx-lm's format, so
rounds trained by ``mlx_lm.lora`` bake the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_unflatten  # noqa: E402

from mlxgate import lora  # noqa: E402
from mlxgate.errors import UserError  # noqa: E402
from mlxgate.io import atomic_dir  # noqa: E402

# Files of a checkpoint directory that are not weights or config: copied verbatim.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "*.tiktoken",
)
BAKE_RECORD = "bake.json"
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def fold(model: nn.Module, rounds: list[dict[str, lora.LoRAFactors]]) -> int:
    """Add every round's ΔW to the weights of ``model`` in place (float32 sum, cast back; quantized
    layers come back dequantized). Returns the number of modules changed."""
    modules = dict(model.named_modules())
    paths = sorted({p for r in rounds for p in r})
    new = []
    for path in paths:
        lin = modules.get(path)
        if not isinstance(lin, (nn.Linear, nn.QuantizedLinear)):
            raise UserError(f"adapter module {path} is not a linear layer of this model; wrong --model for these adapters?")
        w = lin.weight
        if isinstance(lin, nn.QuantizedLinear):
            w = mx.dequantize(w, lin.scales, lin.biases, group_size=lin.group_size, bits=lin.bits, mode=lin.mode)
        acc = w.astype(mx.float32)
        for r in rounds:
            if path in r:
                f = r[path]
                if f.a.shape[0] != acc.shape[1] or f.b.shape[1] != acc.shape[0]:
                    raise UserError(f"adapter for {path} has shape {tuple(f.a.shape)}x{tuple(f.b.shape)}, weight is {tuple(acc.shape)}")
                acc = acc + f.scale * (f.a.astype(mx.float32) @ f.b.astype(mx.float32)).T
        out = nn.Linear(acc.shape[1], acc.shape[0], bias="bias" in lin)
        out.weight = acc.astype(w.dtype)
        if "bias" in lin:
            out.bias = lin.bias
        new.append((path, out))
    model.update_modules(tree_unflatten(new))
    return len(new)


def _source_dtype(config: dict) -> str:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return name if name in _DTYPES else "float32"


def bake(model_name: str, adapter_dirs: Iterable[str | Path], out: str | Path, dtype: str | None = None) -> Path:
    """Fuse ``adapter_dirs`` (oldest first) into ``model_name`` and write the checkpoint to ``out``
    atomically. ``dtype``: of the saved weights (default: the source's ``torch_dtype``, else float32)."""
    from mlx_lm.utils import dequantize_model, save_config, save_model

    from mlxgate.models import load

    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise UserError("give at least one --adapters directory to bake")
    rounds = [lora.read_adapter(d)[1] for d in dirs]
    model, _, info = load(model_name, dtype="float32")
    src = Path(info.path)
    config = json.loads((src / "config.json").read_text())
    dtype = dtype or _source_dtype(config)
    if dtype not in _DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(_DTYPES)}")
    n = fold(model, rounds)
    if "quantization" in config or "quantization_config" in config:
        model = dequantize_model(model)  # folded layers already are; keep the checkpoint uniform
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    model.set_dtype(_DTYPES[dtype])
    config["torch_dtype"] = dtype
    with atomic_dir(out) as tmp:
        save_model(tmp, model)
        save_config(config, config_path=tmp / "config.json")
        for pattern in TOKENIZER_FILES:
            for f in src.glob(pattern):
                shutil.copy2(f, tmp / f.name)
        record = {"base": model_name, "base_path": str(src), "adapters": [str(d.resolve()) for d in dirs], "modules": n, "dtype": dtype}
        (tmp / BAKE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)
