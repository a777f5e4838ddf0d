"""Aggregates of per-position KL (nats) over a set of positions S (SPEC §3.3, §5.4).

Two versions of the same four numbers:
- ``kl_aggregates``: float64 numpy, for reports (``compare``, run records).
- ``aggregate_kl``: mlx, differentiable, for the heal step's barrier ``relu(agg_S KL - tau)``.
S is the pooled, flattened set of positions where ``mask`` is true (all positions if no mask).
An empty S gives 0.0 for every aggregate (and n = 0): "no positions, no drift", so a barrier on an
empty micro-batch is inactive rather than NaN.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import numpy as np

from mlxgate.errors import UserError

KL_AGGS = ("mean", "rmse", "p95", "max")
# SPEC §3.3: rmse = sqrt(mean(KL^2) + 1e-8) in the training barrier, where the epsilon keeps the
# gradient finite at KL = 0. Reports (kl_aggregates) use the exact sqrt(mean(KL^2)), so a model
# compared with itself reports 0 (issue 5's acceptance; the issue wins over SPEC).
RMSE_EPS = 1e-8
P95_PERCENT = 95


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, mx.array):
        x = np.array(x.astype(mx.float32) if x.dtype != mx.bool_ else x)
    return np.asarray(x)


def kl_aggregates(kl_values: Any, mask: Any = None) -> dict[str, float | int]:
    """mean, rmse, p95, max and n of per-position KL values (nats), in float64.

    ``kl_values``: any shape (e.g. [batch, seq]), numpy/mlx/list; ``mask``: same shape, true where
    a position belongs to S. p95 is numpy's default linear interpolation; rmse is exact (no
    epsilon: that is only for the barrier's gradient). Empty S: zeros, n = 0.
    """
    vals = _to_numpy(kl_values).astype(np.float64).ravel()
    if mask is not None:
        m = _to_numpy(mask).astype(bool).ravel()
        if m.shape != vals.shape:
            raise ValueError(f"mask has {m.size} entries, KL values {vals.size}")
        vals = vals[m]
    if vals.size == 0:
        return {"mean": 0.0, "rmse": 0.0, "p95": 0.0, "max": 0.0, "n": 0}
    return {
        "mean": float(vals.mean()),
        "rmse": float(math.sqrt(float(np.mean(vals**2)))),
        "p95": float(np.percentile(vals, P95_PERCENT)),
        "max": float(vals.max()),
        "n": int(vals.size),
    }


def _masked_percentile(x: mx.array, m: mx.array, n: mx.array, percent: int) -> mx.array:
    # Linear interpolation at virtual index (n-1)*percent/100, as numpy's default. The index is
    # split in integer arithmetic so it stays exact for any n (float32 would drift for large n);
    # int32 is enough below ~22M positions.
    order = mx.stop_gradient(mx.argsort(mx.where(m, x, mx.inf)))  # masked-out positions last
    xs = mx.take(x, order)
    num = (n - 1) * percent
    lo = mx.maximum(num // 100, 0)
    frac = (num - (num // 100) * 100).astype(mx.float32) / 100.0
    hi = mx.minimum(lo + 1, mx.maximum(n - 1, 0))
    a, b = mx.take(xs, lo), mx.take(xs, hi)
    return a + frac * (b - a)


def aggregate_kl(kl: mx.array, agg: str = "rmse", mask: mx.array | None = None) -> mx.array:
    """Differentiable aggregate of per-position KL ``kl`` (any shape, nats) -> float32 scalar.

    ``agg``: mean | rmse | p95 | max. ``mask``: same shape as ``kl``, true for positions in S.
    Gradients flow to the positions that make the value: all of S for mean/rmse, the two
    order statistics p95 interpolates between (weights 1-frac, frac), the arg-max for max.
    Empty S returns 0.0 (gradient 0). Works under ``mx.compile`` (no host sync).
    """
    if agg not in KL_AGGS:
        raise UserError(f"unknown KL aggregate {agg!r}; choose one of {', '.join(KL_AGGS)}")
    x = kl.astype(mx.float32).reshape(-1)
    if mask is None:
        m = mx.ones(x.shape, dtype=mx.bool_)
    else:
        if mask.size != x.size:
            raise ValueError(f"mask has {mask.size} entries, KL values {x.size}")
        m = mask.reshape(-1).astype(mx.bool_)
    n = mx.sum(m.astype(mx.int32))
    nf = mx.maximum(n, 1).astype(mx.float32)
    zero = mx.array(0.0, dtype=mx.float32)
    if agg == "mean":
        value = mx.sum(mx.where(m, x, 0.0)) / nf
    elif agg == "rmse":
        value = mx.sqrt(mx.sum(mx.where(m, x * x, 0.0)) / nf + RMSE_EPS)
    elif agg == "p95":
        value = _masked_percentile(x, m, n, P95_PERCENT)
    else:
        value = mx.max(mx.where(m, x, -mx.inf))
    return mx.where(n > 0, value, zero)
