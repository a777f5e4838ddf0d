"""Steered generation: add C·v_L to the output of every steered block (SPEC §5.2).

The vector is added at every position, in prompt processing and at every decoded step, through
:func:`mlxgate.hooks.steering`; decoding is the one batched, KV-cached core
(:func:`mlxgate.generate.generate`). Each prompt row may carry its own coefficient (per-row doses,
a [B, 1, 1] array), which is how the α mix of walk-C is generated in one batch.

Units of the coefficient (SPEC §5.1/§5.2 are literal: "add C·v_L", "no normalisation"): C
multiplies the raw mean-difference vector. C = 1 injects, at every position of every steered
block, exactly the average shift that swapping the neg persona prompt for the pos one produced at
the assistant tag; C = 0.5 half of it. This unit is model-independent without any rescaling: the
contrast is measured in the model's own residual stream, so it carries that model's hidden-state
scale (gemma-3's residual norms are ~30x SmolLM2's and so are its vectors). It is also the unit
of the original (steer-heal-love's steering.py steers with the raw, uncalibrated mean-diff at
C = alpha, alpha in {0.5, 0.75, 1.0}; C = 0.5 coherent, C = 1 collapses gemma-3-4b-it), which a
residual-norm-relative C would not reproduce; and it gives walk-C's range a meaning: κ = 1 is the
persona's full effect, never more. To compare doses across
models anyway, the vector file records ``resid_norm`` (mean ‖h_L‖ at the last prompt token) and
:func:`relative_dose` gives C·‖v_L‖ / resid_norm_L, the injected norm as a fraction of the
typical residual norm (reported beside every generation). Note that the steered band's additions
accumulate down the residual stream: block L+1 sees C·v_L too.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mlxgate.generate import Completion, generate
from mlxgate.hooks import steering
from mlxgate.steer.extract import SteeringVector

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

# SPEC §5.2 sampling (paper setting): temperature 1.0, top-p 0.95, top-k 64, no repetition
# penalty, up to 512 new tokens.
TEMP = 1.0
TOP_P = 0.95
TOP_K = 64
MAX_TOKENS = 512
GEN_BATCH = 16  # rows decoded together


def parse_coeff(text, name: str = "--coeff") -> float:
    """A finite float from user input (``--coeff``, ``--kappa``); anything else is a UserError."""
    from mlxgate.errors import UserError

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number like 0.5; got {text!r}") from None
    if not math.isfinite(value):
        raise UserError(f"{name} must be a finite number; got {text!r}")
    return value


def relative_dose(sv: SteeringVector, coeff: float) -> dict[int, float | None]:
    """{L: C·‖v_L‖ / mean ‖h_L‖}: the injected norm per block as a fraction of the residual norm
    at the assistant tag (None if the vector file has no residual norms)."""
    resid = sv.meta.get("resid_norm") or {}
    norms = sv.norms()
    return {L: (abs(coeff) * norms[L] / resid[str(L)] if resid.get(str(L)) else None) for L in sv.layers}


def steered_generate(
    model: nn.Module,
    sv: SteeringVector | dict[int, mx.array],
    coeffs: float | Sequence[float],
    prompts: list[list[int]],
    max_tokens: int = MAX_TOKENS,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    temp: float = TEMP,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: int | None = None,
    batch_size: int = GEN_BATCH,
    with_logprobs: bool = False,
) -> list[Completion]:
    """Generate for each prompt (token ids) with ``coeffs[i] · v_L`` added to block L's output at every
    position. ``coeffs``: one C for all rows or one per prompt. Returns mlxgate Completions
    (``tokens`` EOS excluded, ``entropy`` H_t in nats of the steered model's raw logits).

    The random state is seeded once (``seed``), then rows are decoded in batches of ``batch_size``
    with a [B, 1, 1] coefficient array; the hooks are removed on exit, exceptions included.
    """
    vectors = sv.as_mx() if isinstance(sv, SteeringVector) else sv
    if isinstance(coeffs, (int, float)):
        coeffs = [float(coeffs)] * len(prompts)
    coeffs = [float(c) for c in coeffs]
    if len(coeffs) != len(prompts):
        raise ValueError(f"{len(coeffs)} coefficients for {len(prompts)} prompts")
    if seed is not None:
        mx.random.seed(seed)
    out: list[Completion] = []
    for start in range(0, len(prompts), max(1, batch_size)):
        rows = prompts[start : start + batch_size]
        c = mx.array(np.array(coeffs[start : start + batch_size], dtype=np.float32)[:, None, None])
        with steering(model, vectors, c):
            out.extend(
                generate(
                    model, rows, max_tokens, eos_ids, temp=temp, top_p=top_p, top_k=top_k,
                    seed=None, batch_size=len(rows), with_logprobs=with_logprobs,
                )
            )
    return out


def mean_projection(
    model: nn.Module,
    sv: SteeringVector,
    coeff: float,
    prompts: list[list[int]],
    layer: int,
    direction: int | None = None,
    batch_size: int = GEN_BATCH,
) -> float:
    """Mean over prompts and positions of h_layer · v̂ (residual units) with the steering active at
    ``coeff``, v̂ the unit vector of layer ``direction`` (default ``layer``; give it to read a block
    downstream of the steered band). The dose-response check: it must grow with C. Padding excluded."""
    from mlxgate.generate import left_pad, make_cache
    from mlxgate.hooks import capture

    vhat = sv.vectors[layer if direction is None else direction].astype(np.float64)
    vhat = vhat / np.linalg.norm(vhat)
    total, count = 0.0, 0
    vectors = sv.as_mx()
    for start in range(0, len(prompts), batch_size):
        rows = prompts[start : start + batch_size]
        tokens, padding = left_pad(rows)
        cache = make_cache(model, padding if len(rows) > 1 else None)
        with steering(model, vectors, coeff), capture(model, [layer]) as got:
            model(tokens, cache=cache)
            h = got[layer][-1].astype(mx.float32)
            mx.eval(h)
        proj = np.array(h).astype(np.float64) @ vhat  # [B, L]
        for r, pad in enumerate(padding):
            total += float(proj[r, pad:].sum())
            count += proj.shape[1] - pad
    return total / count


__all__ = ["MAX_TOKENS", "TEMP", "TOP_K", "TOP_P", "mean_projection", "parse_coeff", "relative_dose", "steered_generate"]
