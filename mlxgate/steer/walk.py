"""Dose control ("walk-C", SPEC §5.2): find the largest κ whose probes still pass the filter.

:func:`walk_c` is a pure function of a pass-rate oracle (κ -> fraction of a probe that passes), so
it is unit-tested without a model. Rule: bisection on log κ in [lo, hi]; a probe at the geometric
midpoint that passes (rate >= 75%) raises lo to it ("raise κ while >= 75% passes"), one that fails
lowers hi to it; stop when hi/lo < 1.05 or after 6 probes. The settled κ is the largest probed κ
that passed. If no bisection probe passed, lo itself is probed once more (so "nothing passes" is
a measured fact, not an untested floor); if that fails too, a UserError says so.

With [0.2, 1.0]: after k probes hi/lo = 5^(1/2^k), so the 6th probe brings it to 1.026 < 1.05:
the two stopping rules coincide for the default range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from mlxgate.errors import UserError

# SPEC §5.2 constants.
KAPPA_LO = 0.2
KAPPA_HI = 1.0
PASS_THRESHOLD = 0.75  # a probe passes when >= 75% of its completions pass the filter
RATIO_TOL = 1.05  # stop when hi / lo < 1.05
MAX_STEPS = 6  # bisection probes
PROBE_N = 8  # completions per probe


@dataclass
class WalkResult:
    """Settled κ and every probe made: ``history`` = [(κ, pass rate, passed)], in order."""

    kappa: float
    history: list[tuple[float, float, bool]] = field(default_factory=list)
    lo: float = KAPPA_LO
    hi: float = KAPPA_HI
    converged: bool = False  # hi / lo < RATIO_TOL at the end

    @property
    def steps(self) -> int:
        return len(self.history)

    def to_dict(self) -> dict:
        return {
            "kappa": self.kappa,
            "lo": self.lo,
            "hi": self.hi,
            "converged": self.converged,
            "steps": self.steps,
            "history": [{"kappa": k, "pass_rate": r, "passed": p} for k, r, p in self.history],
        }


def walk_c(
    oracle: Callable[[float], float],
    lo: float = KAPPA_LO,
    hi: float = KAPPA_HI,
    threshold: float = PASS_THRESHOLD,
    ratio_tol: float = RATIO_TOL,
    max_steps: int = MAX_STEPS,
) -> WalkResult:
    """Bisection on log κ for the largest κ in [lo, hi] with ``oracle(κ) >= threshold``.

    ``oracle(κ)`` returns the pass rate in [0, 1] of a probe generated at κ. Returns the settled κ
    (the largest passing probe) and the probe history. Raises UserError when no probe passes,
    ValueError on a bad range or an oracle value outside [0, 1].
    """
    if not (0 < lo < hi) or not all(map(math.isfinite, (lo, hi))):
        raise ValueError(f"need 0 < lo < hi, got lo={lo}, hi={hi}")
    if ratio_tol <= 1.0 or max_steps < 1:
        raise ValueError("ratio_tol must be > 1 and max_steps >= 1")
    result = WalkResult(kappa=lo, lo=lo, hi=hi)

    def probe(kappa: float) -> bool:
        rate = float(oracle(kappa))
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"the pass-rate oracle returned {rate} at κ={kappa}; it must be in [0, 1]")
        ok = rate >= threshold
        result.history.append((kappa, rate, ok))
        return ok

    best: float | None = None
    while result.steps < max_steps and result.hi / result.lo >= ratio_tol:
        mid = math.sqrt(result.lo * result.hi)
        if probe(mid):
            result.lo, best = mid, mid
        else:
            result.hi = mid
    result.converged = result.hi / result.lo < ratio_tol
    if best is None:
        if not probe(result.lo):
            rates = ", ".join(f"κ={k:.3g}: {r:.0%}" for k, r, _ in result.history)
            raise UserError(
                f"no dose passes the filter: fewer than {threshold:.0%} of probe completions passed at every κ tried "
                f"down to {result.lo:.3g} ({rates}); lower the κ range, use a weaker vector, or check the filter"
            )
        best = result.lo
    result.kappa = best
    return result


__all__ = ["KAPPA_HI", "KAPPA_LO", "MAX_STEPS", "PASS_THRESHOLD", "PROBE_N", "RATIO_TOL", "WalkResult", "walk_c"]
