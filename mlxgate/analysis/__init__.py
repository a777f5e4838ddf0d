"""Pure analysis of measurements: zones, KL aggregates, loops and basins, spectra (SPEC §3.2–3.5).

No model, no I/O: numpy/mlx arrays in, Python floats/ints/dataclasses out (``dataclasses.asdict``
makes them JSON). The ``compare``, ``spectrum`` and ``dashboard`` commands are built on this.
"""

from mlxgate.analysis.kl_stats import KL_AGGS, RMSE_EPS, aggregate_kl, kl_aggregates
from mlxgate.analysis.loops import (
    BASINS,
    BasinResult,
    BasinThresholds,
    LoopInfo,
    classify_basin,
    detect_loop,
    rep_frac,
)
from mlxgate.analysis.spectral import (
    PHI,
    SPECTRUM_METHODS,
    AttentionDiagonalStats,
    SpectralThresholds,
    SpectrumMetrics,
    attention_diagonal_stats,
    hidden_spectrum,
    lora_delta_spectrum,
    lora_singular_values,
    power_iteration,
    power_iteration_sigma_max,
    spectral_status,
)
from mlxgate.analysis.zones import DEFAULT_SCHEME, ZONE_SCHEMES, zone_bands, zone_counts, zone_of

__all__ = [
    "BASINS",
    "DEFAULT_SCHEME",
    "KL_AGGS",
    "PHI",
    "RMSE_EPS",
    "SPECTRUM_METHODS",
    "ZONE_SCHEMES",
    "AttentionDiagonalStats",
    "BasinResult",
    "BasinThresholds",
    "LoopInfo",
    "SpectralThresholds",
    "SpectrumMetrics",
    "aggregate_kl",
    "attention_diagonal_stats",
    "classify_basin",
    "detect_loop",
    "hidden_spectrum",
    "kl_aggregates",
    "lora_delta_spectrum",
    "lora_singular_values",
    "power_iteration",
    "power_iteration_sigma_max",
    "rep_frac",
    "spectral_status",
    "zone_bands",
    "zone_counts",
    "zone_of",
]
