"""A stack of LoRA rounds on one frozen copy of the weights (SPEC §5.4, §5.5).

Each heal round trains a fresh LoRA on top of the earlier rounds. Instead of baking the earlier
rounds into a second copy of the weights, every adapted projection becomes a
:class:`StackedLoRALinear`: the frozen base linear, the frozen earlier rounds folded into one
low-rank pair, and the trainable current round. A shared :class:`LoRASwitch` turns the current
round off (the ``prev`` reference) or every round off (the ``base`` reference) for the frozen
reference forward of the KL barrier, so student and reference share all weights.

Layout and names follow mlx-lm's ``LoRALinear`` (``linear``, ``lora_a`` [in, r], ``lora_b``
[r, out], ``scale`` an absolute multiplier: y = x Wᵀ + scale · (x A) B), so the current round's
parameters flatten to exactly the keys ``mlx_lm.tuner.utils.load_adapters`` expects.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from mlxgate.errors import UserError  # noqa: E402

# SPEC §5.4: all linear projections of the adapted blocks.
LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# SPEC §5.4: blocks [int(0.2 n), int(0.8 n)).
BLOCK_LO, BLOCK_HI = 0.2, 0.8
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapted_blocks(n_layers: int) -> range:
    """Indices of the blocks that get LoRA: [int(0.2 n), int(0.8 n)) (SPEC §5.4)."""
    return range(int(BLOCK_LO * n_layers), int(BLOCK_HI * n_layers))


class LoRASwitch:
    """Shared on/off state of every stacked layer: ``current`` (this round) and ``prev`` (earlier
    rounds). Read at call time, so under ``mx.compile`` it is fixed when the function is traced."""

    def __init__(self) -> None:
        self.current = True
        self.prev = True


@dataclass(frozen=True)
class LoRAFactors:
    """One finished round of one module: ΔW = scale · (a @ b)ᵀ, a [in, r], b [r, out]."""

    a: mx.array
    b: mx.array
    scale: float


def _dims(linear: nn.Module) -> tuple[int, int]:
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return in_dims, out_dims


class StackedLoRALinear(nn.Module):
    """y = linear(x) + [prev on] (x prev_a) prev_b + [current on] scale · (x lora_a) lora_b.

    ``prev_a`` [in, R] and ``prev_b`` [R, out] hold all earlier rounds concatenated along the rank
    axis, each round's scale folded into its rows of ``prev_b`` (Σ s_i A_i B_i = [A_1..A_k]
    [s_1 B_1; ..; s_k B_k]), so any number of rounds costs two thin matmuls. The LoRA factors are
    float32 whatever the base dtype (optimizer state stays float32); the update is cast to x.dtype.
    """

    def __init__(self, linear: nn.Module, rank: int, scale: float, switch: LoRASwitch, prev: list[LoRAFactors] = ()):
        super().__init__()
        self.linear = linear
        in_dims, out_dims = _dims(linear)
        bound = 1.0 / math.sqrt(in_dims)  # mlx-lm's LoRALinear init; B = 0 so ΔW starts at 0
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        self.scale = float(scale)
        self.switch = switch
        self.has_prev = bool(prev)
        if prev:
            self.prev_a = mx.concatenate([p.a.astype(mx.float32) for p in prev], axis=1)
            self.prev_b = mx.concatenate([p.scale * p.b.astype(mx.float32) for p in prev], axis=0)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        if self.has_prev and self.switch.prev:
            y = y + ((x @ self.prev_a) @ self.prev_b).astype(x.dtype)
        if self.switch.current:
            y = y + (self.scale * ((x @ self.lora_a) @ self.lora_b)).astype(x.dtype)
        return y


def attach(model: nn.Module, rank: int, scale: float, prev: list[dict[str, LoRAFactors]] = (), seed: int = 0) -> LoRASwitch:
    """Freeze ``model`` and replace the q,k,v,o,gate,up,down projections of the adapted blocks
    with :class:`StackedLoRALinear` (``prev``: one {module path: factors} per earlier round).
    Only ``lora_a``/``lora_b`` of the current round are trainable. Returns the shared switch."""
    if any(isinstance(m, StackedLoRALinear) for _, m in model.named_modules()):
        raise ValueError("model already has a LoRA stack; load a fresh model for each heal round")
    switch = LoRASwitch()
    model.freeze()
    mx.random.seed(seed)
    n = len(model.layers)
    block_paths = {id(m): p for p, m in model.named_modules()}
    found = 0
    for i in adapted_blocks(n):
        block = model.layers[i]
        named = dict(block.named_modules())
        new = []
        for key in LORA_KEYS:
            lin = named.get(key)
            if lin is None:
                continue
            if not isinstance(lin, (nn.Linear, nn.QuantizedLinear)):
                raise UserError(f"block {i} {key} is a {type(lin).__name__}, not a linear layer; cannot add LoRA")
            path = f"{block_paths[id(block)]}.{key}"
            factors = [r[path] for r in prev if path in r]
            in_dims, out_dims = _dims(lin)
            for f in factors:
                if f.a.shape[0] != in_dims or f.b.shape[-1] != out_dims:
                    raise UserError(f"an earlier adapter's {path} is {f.a.shape[0]}->{f.b.shape[-1]}, the model's is {in_dims}->{out_dims}: adapter from another model?")
            new.append((key, StackedLoRALinear(lin, rank, scale, switch, factors)))
        found += len(new)
        block.update_modules(tree_unflatten(new))
    if found == 0:
        raise UserError(f"no {', '.join(k.split('.')[-1] for k in LORA_KEYS)} projections found in the model's blocks; cannot add LoRA")
    for _, m in model.named_modules():
        if isinstance(m, StackedLoRALinear):
            m.freeze(recurse=False)
            m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return switch


def stacked_layers(model: nn.Module) -> list[tuple[str, StackedLoRALinear]]:
    """(path, layer) of every stacked LoRA layer, in model order."""
    return sorted(((p, m) for p, m in model.named_modules() if isinstance(m, StackedLoRALinear)), key=lambda t: t[0])


@contextmanager
def lora_mode(switch: LoRASwitch, current: bool, prev: bool) -> Iterator[None]:
    """Temporarily set which rounds are active (e.g. the frozen reference forward)."""
    old = (switch.current, switch.prev)
    switch.current, switch.prev = current, prev
    try:
        yield
    finally:
        switch.current, switch.prev = old


def current_weights(model: nn.Module) -> dict[str, mx.array]:
    """{path.lora_a / path.lora_b: array} of this round: the content of adapters.safetensors."""
    return {k: v for k, v in tree_flatten(model.trainable_parameters())}


def adapter_config(n_layers: int, rank: int, scale: float, dropout: float = 0.0) -> dict:
    """adapter_config.json in mlx-lm's format for a round over blocks [int(0.2n), int(0.8n)).

    mlx-lm adds LoRA layers to the LAST ``num_layers`` blocks. So num_layers = n - int(0.2 n): the
    range then covers every adapted block, and the blocks [int(0.8 n), n) get LoRA layers whose
    lora_b stays at mlx-lm's zero init (they are not in the weights file and ``load_adapters``
    loads with strict=False), i.e. ΔW = 0 there.
    """
    return {
        "fine_tune_type": "lora",
        "num_layers": n_layers - adapted_blocks(n_layers).start,
        "lora_parameters": {"rank": int(rank), "scale": float(scale), "dropout": float(dropout), "keys": list(LORA_KEYS)},
        "mlxgate": {"adapted_blocks": [adapted_blocks(n_layers).start, adapted_blocks(n_layers).stop], "n_layers": n_layers},
    }


def read_adapter(path: str | Path) -> tuple[dict, dict[str, LoRAFactors]]:
    """(config, {module path: factors}) of an adapter directory in mlx-lm's format."""
    path = Path(path)
    cfg_path, w_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{path} is not an adapter directory (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text())
        weights = mx.load(str(w_path))
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"cannot read adapter {path}: {err}") from None
    if config.get("fine_tune_type", "lora") != "lora":
        raise UserError(f"{path}: fine_tune_type {config.get('fine_tune_type')!r} is not supported (only lora)")
    try:
        scale = float(config["lora_parameters"]["scale"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path / ADAPTER_CONFIG}: missing lora_parameters.scale") from None
    modules: dict[str, LoRAFactors] = {}
    for key in weights:
        if key.endswith(".lora_a"):
            base = key[: -len(".lora_a")]
            if base + ".lora_b" not in weights:
                raise UserError(f"{path}: {key} has no matching lora_b")
            modules[base] = LoRAFactors(weights[key], weights[base + ".lora_b"], scale)
    if not modules:
        raise UserError(f"{path}: no lora_a/lora_b tensors in {ADAPTER_WEIGHTS}")
    return config, modules
