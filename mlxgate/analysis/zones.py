"""Entropy zones (SPEC §3.2): name the regime a per-token entropy H_t (nats) falls in.

A scheme is an ordered list of (name, upper_bound): a value h is in the first zone whose upper
bound is strictly greater than h, so a value equal to a bound belongs to the zone above it
(H = 3.0 is TRANSITION, not LASER). The last zone's bound is +inf.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from mlxgate.errors import UserError

# SPEC §3.2. "iris" is the default (IRIS Gate main scheme).
ZONE_SCHEMES: dict[str, list[tuple[str, float]]] = {
    "iris": [("LASER", 3.0), ("TRANSITION", 4.0), ("LANTERN", 6.0), ("CHAOS", math.inf)],
    "phasegpt": [
        ("HYPER-LASER", 2.0),
        ("LASER", 3.0),
        ("TRANSITION", 4.0),
        ("LANTERN", 6.0),
        ("CHAOS", math.inf),
    ],
    "cer": [("LASER", 2.0), ("CAGE", 3.5), ("LANTERN", 5.0), ("CHAOS", math.inf)],
}
DEFAULT_SCHEME = "iris"


def _scheme(scheme: str) -> list[tuple[str, float]]:
    try:
        return ZONE_SCHEMES[scheme]
    except KeyError:
        raise UserError(
            f"unknown zone scheme {scheme!r}; choose one of {', '.join(ZONE_SCHEMES)}"
        ) from None


def zone_of(h: float, scheme: str = DEFAULT_SCHEME) -> str:
    """Zone name of one entropy value ``h`` (nats). NaN raises ValueError (it has no zone)."""
    h = float(h)
    if math.isnan(h):
        raise ValueError("entropy is NaN: it has no zone")
    for name, upper in _scheme(scheme):
        if h < upper:
            return name
    return _scheme(scheme)[-1][0]  # h == +inf


def zone_bands(scheme: str = DEFAULT_SCHEME) -> list[tuple[str, float, float]]:
    """(name, lo, hi) per zone, lo inclusive, hi exclusive, for shading plots.

    The first band starts at 0.0 (entropy is never negative); the last ends at +inf (clip it to
    the axis when plotting; ``json.dumps`` writes it as ``Infinity``).
    """
    bands, lo = [], 0.0
    for name, upper in _scheme(scheme):
        bands.append((name, lo, upper))
        lo = upper
    return bands


def zone_counts(hs: Iterable[float] | np.ndarray, scheme: str = DEFAULT_SCHEME) -> dict[str, int]:
    """Number of values per zone, every zone of the scheme present (in order), NaNs ignored."""
    values = np.asarray(hs, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    names = [name for name, _ in _scheme(scheme)]
    uppers = np.array([upper for _, upper in _scheme(scheme)][:-1])
    # side="right": a value equal to a bound goes to the zone above it.
    idx = np.searchsorted(uppers, values, side="right")
    counts = np.bincount(idx, minlength=len(names))
    return {name: int(c) for name, c in zip(names, counts)}
