"""Hooks on decoder blocks: add a vector to a block's output (steering) or record it (hidden states).

Works for every mlx-lm family without editing its model files and without changing parameter
paths: the block instance's class is swapped for a subclass whose ``__call__`` applies the hook
(so ``model.layers.3.self_attn.q_proj`` stays that name, LoRA conversion and adapter files are
unaffected). State lives in a plain holder object, which ``nn.Module`` does not treat as a
parameter.

The residual stream "at layer L" is the output of block L (SPEC §5.1).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn

_HOOKED_CLASSES: dict[type, type] = {}


class HookState:
    """What a hooked block does: ``add`` ([d] or broadcastable to [B, L, d]) is added to its
    output; with ``capture`` its outputs are appended to ``captured`` ([B, L, d] each)."""

    def __init__(self):
        self.add: mx.array | None = None
        self.capture: bool = False
        self.captured: list[mx.array] = []


def _hooked_call(self, *args, **kwargs):
    out = self._mlxgate_base_call(*args, **kwargs)
    state: HookState = self._mlxgate_hook
    if state.add is not None:
        out = out + state.add.astype(out.dtype)
    if state.capture:
        state.captured.append(out)
    return out


def _hooked_class(cls: type) -> type:
    if cls not in _HOOKED_CLASSES:
        _HOOKED_CLASSES[cls] = type(
            f"Hooked{cls.__name__}", (cls,), {"__call__": _hooked_call, "_mlxgate_base_call": cls.__call__}
        )
    return _HOOKED_CLASSES[cls]


def layers(model: nn.Module) -> list:
    """The decoder blocks of an mlx-lm model (``model.layers`` for every family here)."""
    return model.layers


def hook(block: nn.Module) -> HookState:
    """Install (once) and return the hook state of one block."""
    state = getattr(block, "_mlxgate_hook", None)
    if isinstance(state, HookState):
        return state
    block.__class__ = _hooked_class(type(block))
    state = HookState()
    object.__setattr__(block, "_mlxgate_hook", state)
    return state


def unhook(model: nn.Module) -> None:
    """Remove every hook from the model's blocks (restore their original classes)."""
    for block in layers(model):
        state = getattr(block, "_mlxgate_hook", None)
        if isinstance(state, HookState):
            base = type(block).__mro__[1]
            block.__class__ = base
            object.__delattr__(block, "_mlxgate_hook")


@contextmanager
def steering(model: nn.Module, vectors: dict[int, mx.array], coeff: float | mx.array = 1.0) -> Iterator[None]:
    """Within the block, add ``coeff * vectors[L]`` to the output of every block L at every position
    (prompt and each decoded token; SPEC §5.2). ``coeff`` may be a [B, 1, 1] array for per-row doses."""
    blocks = layers(model)
    states = []
    try:
        for layer, vec in vectors.items():
            state = hook(blocks[layer])
            state.add = coeff * vec
            states.append(state)
        yield
    finally:
        for state in states:
            state.add = None


@contextmanager
def capture(model: nn.Module, layer_ids: list[int] | None = None) -> Iterator[dict[int, list[mx.array]]]:
    """Record the outputs ([B, L, d]) of the given blocks (default all) during the block.

    Yields ``{layer: [outputs of each forward call]}``; the lists fill as the model runs.
    """
    blocks = layers(model)
    layer_ids = list(range(len(blocks))) if layer_ids is None else list(layer_ids)
    out: dict[int, list[mx.array]] = {}
    states = []
    try:
        for layer in layer_ids:
            state = hook(blocks[layer])
            state.capture = True
            state.captured = out.setdefault(layer, [])
            states.append(state)
        yield out
    finally:
        for state in states:
            state.capture = False
            state.captured = []


def hidden_states(model: nn.Module, tokens: mx.array, layer_ids: list[int] | None = None) -> dict[int, mx.array]:
    """One forward pass over ``tokens`` [B, L]; the residual stream after each block [B, L, d]."""
    with capture(model, layer_ids) as got:
        model(tokens)
        result = {layer: outs[-1] for layer, outs in got.items()}
    mx.eval(result)
    return result
