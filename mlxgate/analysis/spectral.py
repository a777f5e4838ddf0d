"""Spectral ("eigenvalue") metrics (SPEC §3.5) and the heal step's σ_max term (SPEC §5.4).

Primary spectrum: the hidden-state covariance of one layer over a probe set. ada-slm took
eigenvalues of attention matrices, but causal attention is lower-triangular: its eigenvalues are
its diagonal and the largest is always 1. ``attention_diagonal_stats`` reports that diagonal as an
extra, labelled as what it is.

All report-side numbers are float64 numpy on the host (the matrices are small); only
``power_iteration_sigma_max`` is mlx, because the heal loss differentiates through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

# SPEC §3.5.
PHI = 1.6180339887
SPECTRUM_TOP = 8  # eigenvalues kept in a report
ATTENTION_DIAGONAL_LABEL = "attention diagonal (not a spectrum)"


@dataclass(frozen=True)
class SpectralThresholds:
    """Status thresholds (SPEC §3.5, from ada-slm's table); comparisons are strict."""

    healthy_entropy: float = 0.5  # HEALTHY needs Hs > this ...
    healthy_dominant: float = 0.4  # ... and dominant ratio < this
    drifting_entropy: float = 0.35  # DRIFTING needs Hs > this ...
    drifting_dominant: float = 0.6  # ... and dominant ratio < this


def spectral_status(
    hs: float, dominant_ratio: float, thresholds: SpectralThresholds = SpectralThresholds()
) -> str:
    """HEALTHY if Hs > 0.5 and dominant < 0.4; DRIFTING if Hs > 0.35 and dominant < 0.6; else
    WARNING. ``hs`` is the normalised spectral entropy in [0, 1]."""
    t = thresholds
    if hs > t.healthy_entropy and dominant_ratio < t.healthy_dominant:
        return "HEALTHY"
    if hs > t.drifting_entropy and dominant_ratio < t.drifting_dominant:
        return "DRIFTING"
    return "WARNING"


def _to_float64(x: Any) -> np.ndarray:
    if isinstance(x, mx.array):
        x = np.array(x.astype(mx.float32))  # numpy has no bfloat16
    return np.asarray(x, dtype=np.float64)


def _input_eps(x: Any) -> float:
    """Machine epsilon of the precision ``x`` was stored in: float64's for float64 (and integer)
    numpy input, float32's for everything else (mlx arrays are at most float32; 16-bit inputs
    are exact in float32)."""
    if isinstance(x, mx.array):
        return float(np.finfo(np.float32).eps)
    dtype = np.asarray(x).dtype
    if dtype == np.float64 or not np.issubdtype(dtype, np.floating):
        return float(np.finfo(np.float64).eps)
    return float(np.finfo(np.float32).eps)


def _nonzero(values: np.ndarray, shape: tuple[int, ...], eps: float) -> np.ndarray:
    """Singular values above numpy's matrix_rank tolerance: s > s_max * max(shape) * eps, with
    eps that of the input's storage precision (``_input_eps``).

    ``values`` sorted descending, non-negative. Below it a value is rounding noise (e.g. the
    direction that centering removes, or an exact rank deficiency blurred by float32 storage),
    and counting it would inflate k in ln(k).
    """
    if values.size == 0 or values[0] <= 0.0:
        return values[:0]
    tol = values[0] * max(shape) * eps
    return values[values > tol]


def _entropy_metrics(weights: np.ndarray) -> tuple[float, float, float, float]:
    """(normalised entropy, effective rank, dominant ratio, φ-proximity) of positive weights
    sorted descending (eigenvalues, or singular values). Empty -> all 0.0."""
    k = weights.size
    if k == 0:
        return 0.0, 0.0, 0.0, 0.0
    p = weights / weights.sum()
    h = float(-np.sum(p * np.log(p)))
    # k = 1: ln k = 0, the normalised entropy is 0/0; one direction is total collapse -> 0.0.
    hs = h / math.log(k) if k > 1 else 0.0
    # λ2 = 0 makes λ1/λ2 infinite: as far from φ as possible -> proximity 0.0.
    phi_prox = 1.0 - min(abs(weights[0] / weights[1] - PHI) / PHI, 1.0) if k > 1 else 0.0
    return hs, math.exp(h), float(p[0]), float(phi_prox)


@dataclass(frozen=True)
class SpectrumMetrics:
    """Hidden-state covariance spectrum of one layer (SPEC §3.5).

    spectral_entropy: -Σ p ln p / ln k in [0, 1], p = λ/Σλ over the k nonzero eigenvalues
    (0.0 when k <= 1); effective_rank: exp(-Σ p ln p) (0.0 for a zero matrix);
    dominant_ratio: λ1/Σλ; phi_proximity: 1 - min(|λ1/λ2 - φ|/φ, 1) (0.0 when λ2 = 0);
    eigenvalues: the largest few λ (covariance with 1/(tokens-1), units of h squared);
    rank: k; total_variance: Σλ. A zero matrix (or one token, or identical tokens) has k = 0
    and every metric 0.0, status WARNING.
    """

    spectral_entropy: float
    effective_rank: float
    dominant_ratio: float
    phi_proximity: float
    eigenvalues: list[float]
    rank: int
    n_tokens: int
    dim: int
    total_variance: float
    status: str


SPECTRUM_METHODS = ("svd", "gram")


def _covariance_eigenvalues(x: np.ndarray, eps: float, method: str) -> np.ndarray:
    """Nonzero eigenvalues (descending) of the covariance of centered ``x`` [tokens, d], float64.

    svd: λ = s²/(tokens-1), nonzero by ``_nonzero``. gram: eigvalsh of the smaller of x xᵀ and
    xᵀ x (several times faster for large probe sets); its rounding noise is ~max(shape)·eps64·λ1,
    so its zero test is λ > λ1 · max((max(shape)·eps)², max(shape)·eps64).
    """
    if method not in SPECTRUM_METHODS:
        raise ValueError(f"unknown spectrum method {method!r}; choose one of {SPECTRUM_METHODS}")
    denom = max(x.shape[0] - 1, 1)
    if x.size == 0:
        return np.zeros(0)
    if method == "svd":
        return _nonzero(np.linalg.svd(x, compute_uv=False), x.shape, eps) ** 2 / denom
    gram = x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x
    lam = np.clip(np.linalg.eigvalsh(gram)[::-1], 0.0, None)
    if lam[0] <= 0.0:
        return lam[:0]
    n = max(x.shape)
    rel = max((n * eps) ** 2, n * float(np.finfo(np.float64).eps))
    return lam[lam > lam[0] * rel] / denom


def hidden_spectrum(
    h: Any,
    thresholds: SpectralThresholds = SpectralThresholds(),
    top: int = SPECTRUM_TOP,
    method: str = "svd",
) -> SpectrumMetrics:
    """Spectrum metrics of hidden states ``h`` [tokens, d] (leading dims are flattened into tokens).

    Centers each feature over tokens, takes singular values s of the centered matrix in float64
    (SVD, no U/V) and λ = s² / (tokens - 1), the covariance eigenvalues. Pass only real tokens
    (no padding): every row counts. "Nonzero" (for k) is s > s_1 · max(tokens, d) · eps, eps of
    the input's precision (float32 for mlx arrays), numpy's matrix_rank rule.
    ``method="gram"``: the same eigenvalues from the smaller Gram matrix, several times faster for
    thousands of tokens (λ agree to ~1e-13·λ1; only eigenvalues below ~1e-12·λ1 may differ in
    whether they count in k).
    """
    x = _to_float64(h)
    if x.ndim < 2:
        raise ValueError(f"hidden states must be [tokens, d], got shape {x.shape}")
    x = x.reshape(-1, x.shape[-1])
    n_tokens, dim = x.shape
    if n_tokens:
        x = x - x.mean(axis=0, keepdims=True)
    lam = _covariance_eigenvalues(x, _input_eps(h), method)
    hs, erank, dom, phi_prox = _entropy_metrics(lam)
    return SpectrumMetrics(
        spectral_entropy=hs,
        effective_rank=erank,
        dominant_ratio=dom,
        phi_proximity=phi_prox,
        eigenvalues=[float(v) for v in lam[:top]],
        rank=int(lam.size),
        n_tokens=int(n_tokens),
        dim=int(dim),
        total_variance=float(lam.sum()),
        status=spectral_status(hs, dom, thresholds),
    )


def lora_singular_values(lora_a: Any, lora_b: Any, scale: float) -> np.ndarray:
    """Singular values (descending, float64) of ΔW = scale · (lora_a @ lora_b).T, [out, in].

    mlx-lm's LoRALinear layout: ``lora_a`` [in, r], ``lora_b`` [r, out], y = x W.T +
    scale · (x lora_a) lora_b. With QR of both thin factors, lora_a = Qa Ra and lora_b.T = Qb Rb,
    ΔW.T = scale · Qa (Ra Rb.T) Qb.T, so its singular values are those of the r x r matrix
    scale · Ra Rb.T: O((in + out) r²), never the out x in product.
    """
    a, b = _to_float64(lora_a), _to_float64(lora_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"expected lora_a [in, r] and lora_b [r, out], got {a.shape} and {b.shape}"
        )
    ra = np.linalg.qr(a, mode="r")
    rb = np.linalg.qr(b.T, mode="r")
    return abs(float(scale)) * np.linalg.svd(ra @ rb.T, compute_uv=False)


def lora_delta_spectrum(lora_a: Any, lora_b: Any, scale: float) -> dict[str, Any]:
    """σ_max and spectral entropy of a LoRA update ΔW = scale · (lora_a @ lora_b).T (SPEC §3.5).

    Returns dict(sigma_max, spectral_entropy, effective_rank, rank, singular_values[:8]).
    The spectral entropy is over the singular values themselves, p = σ/Σσ, normalised by ln k
    (k = nonzero σ; 0.0 when k <= 1) as for the hidden-state spectrum. B = 0 (a fresh adapter):
    all zeros.
    """
    sv = lora_singular_values(lora_a, lora_b, scale)
    shape = (np.shape(lora_a)[0], np.shape(lora_b)[1])
    nz = _nonzero(sv, shape, max(_input_eps(lora_a), _input_eps(lora_b)))
    hs, erank, _, _ = _entropy_metrics(nz)
    return {
        "sigma_max": float(sv[0]) if sv.size else 0.0,
        "spectral_entropy": hs,
        "effective_rank": erank,
        "rank": int(nz.size),
        "singular_values": [float(v) for v in sv[:SPECTRUM_TOP]],
    }


def power_iteration(
    lora_a: mx.array,
    lora_b: mx.array,
    scale: float,
    steps: int = 3,
    v0: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """(σ_max estimate, right singular vector estimate [in]) of ΔW = scale · (lora_a @ lora_b).T.

    Iterates v <- ΔWᵀΔW v / ‖·‖ through the factors (ΔW v = scale · lora_bᵀ (lora_aᵀ v),
    ΔWᵀ u = scale · lora_a (lora_b u)), O((in + out) r) per step, never forming ΔW.
    The estimate is σ = uᵀ ΔW v with u = ΔW v / ‖ΔW v‖ and u, v held constant for the gradient
    (as in spectral normalisation): dσ/dΔW = u vᵀ, the exact gradient of σ_max once converged,
    and finite at ΔW = 0 (a fresh adapter has B = 0: σ = 0, gradient 0).
    ``v0`` [in]: start vector (e.g. the previous step's v for a warm start); default a fixed
    N(0, 1) draw (key 0), so results are reproducible.
    """
    a = lora_a.astype(mx.float32)
    b = lora_b.astype(mx.float32)
    a_c, b_c = mx.stop_gradient(a), mx.stop_gradient(b)
    if v0 is None:
        v = mx.random.normal((a.shape[0],), key=mx.random.key(0))
    else:
        v = mx.stop_gradient(v0.astype(mx.float32).reshape(-1))
    tiny = 1e-30
    v = v / (mx.linalg.norm(v) + tiny)
    for _ in range(steps):
        # scale only rescales ΔWᵀΔW; the direction does not need it.
        w = a_c @ (b_c @ (b_c.T @ (a_c.T @ v)))
        v = w / (mx.linalg.norm(w) + tiny)
    wv_c = scale * (b_c.T @ (a_c.T @ v))
    u = wv_c / (mx.linalg.norm(wv_c) + tiny)
    sigma = mx.sum(u * (scale * (b.T @ (a.T @ v))))
    return sigma, v


def power_iteration_sigma_max(
    lora_a: mx.array,
    lora_b: mx.array,
    scale: float,
    steps: int = 3,
    v0: mx.array | None = None,
) -> mx.array:
    """Differentiable σ_max(ΔW) estimate (scalar float32) by ``steps`` power iterations
    (SPEC §5.4: 3). See ``power_iteration`` for the layout, gradient and start vector."""
    return power_iteration(lora_a, lora_b, scale, steps, v0)[0]


@dataclass(frozen=True)
class AttentionDiagonalStats:
    """Statistics of attention weights a[t, t] (a position attending to itself).

    For causal (lower-triangular) attention these are exactly its eigenvalues, and a[0, 0] = 1
    always, which is why they are not mlxgate's spectrum (SPEC §3.5). ``causal`` says whether the
    upper triangle was zero (within 1e-6), i.e. whether the eigenvalue reading holds at all.
    """

    mean: float
    std: float
    min: float
    max: float
    n: int
    causal: bool
    label: str = ATTENTION_DIAGONAL_LABEL


def attention_diagonal_stats(attn: Any) -> AttentionDiagonalStats:
    """Diagonal self-attention weights of ``attn`` [..., T, T] (e.g. [heads, T, T]) pooled over
    all leading dims and positions: mean, std, min, max, count."""
    x = _to_float64(attn)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"attention must be [..., T, T], got shape {x.shape}")
    diag = np.diagonal(x, axis1=-2, axis2=-1).ravel()
    upper = np.triu(x, k=1)
    causal = bool(upper.size == 0 or np.max(np.abs(upper)) <= 1e-6)
    if diag.size == 0:
        return AttentionDiagonalStats(0.0, 0.0, 0.0, 0.0, 0, causal)
    return AttentionDiagonalStats(
        mean=float(diag.mean()),
        std=float(diag.std()),
        min=float(diag.min()),
        max=float(diag.max()),
        n=int(diag.size),
        causal=causal,
    )
