"""Reductions over the vocabulary: entropy, KL, logsumexp, target log-prob (SPEC §3.1, §3.3, §4).

Every entropy and KL in mlxgate goes through this module. The last axis is reduced; any leading
shape works; input may be float32/bfloat16/float16; accumulation and output are float32 (nats).

This first version is the composed-MLX-ops path with explicit VJPs; the fused kernels of
``kernels/`` plug in behind the same functions.
"""

from __future__ import annotations

import mlx.core as mx


def _log_softmax(x: mx.array) -> tuple[mx.array, mx.array]:
    x = x.astype(mx.float32)
    lse = mx.logsumexp(x, axis=-1, keepdims=True)
    return x - lse, lse


def _entropy_fwd(logits: mx.array) -> mx.array:
    logp, _ = _log_softmax(logits)
    p = mx.exp(logp)
    # p * logp is 0 where p underflows to 0 (incl. -inf logits): avoid 0 * -inf = nan.
    return -mx.sum(mx.where(p > 0, p * logp, 0.0), axis=-1)


@mx.custom_function
def entropy(logits: mx.array) -> mx.array:
    """H = logsumexp(z) - sum softmax(z) z, in nats. [..., V] -> [...] float32."""
    return _entropy_fwd(logits)


@entropy.vjp
def _entropy_vjp(primals, cotangent, output):
    # mlx passes a one-input custom_function's primal as the array itself, not a 1-tuple.
    logits = primals[0] if isinstance(primals, (tuple, list)) else primals
    logp, _ = _log_softmax(logits)
    p = mx.exp(logp)
    safe_logp = mx.where(p > 0, logp, 0.0)
    grad = -p * (safe_logp + output[..., None]) * cotangent[..., None]
    return (grad.astype(logits.dtype),)


def _kl_fwd(logits_p: mx.array, logits_q: mx.array) -> mx.array:
    logp, _ = _log_softmax(logits_p)
    logq, _ = _log_softmax(logits_q)
    p = mx.exp(logp)
    return mx.sum(mx.where(p > 0, p * (logp - logq), 0.0), axis=-1)


@mx.custom_function
def kl(logits_p: mx.array, logits_q: mx.array) -> mx.array:
    """KL(P||Q) = sum p (log p - log q) per row, P = softmax(logits_p). [..., V] x2 -> [...] float32."""
    return _kl_fwd(logits_p, logits_q)


@kl.vjp
def _kl_vjp(primals, cotangent, output):
    logits_p, logits_q = primals
    logp, _ = _log_softmax(logits_p)
    logq, _ = _log_softmax(logits_q)
    p, q = mx.exp(logp), mx.exp(logq)
    c = cotangent[..., None]
    diff = mx.where(p > 0, logp - logq, 0.0)
    grad_p = p * (diff - output[..., None]) * c
    grad_q = (q - p) * c
    return grad_p.astype(logits_p.dtype), grad_q.astype(logits_q.dtype)


def logsumexp(logits: mx.array) -> mx.array:
    """log sum exp(z) over the last axis, float32. [..., V] -> [...]."""
    return mx.logsumexp(logits.astype(mx.float32), axis=-1)


def target_logprob(logits: mx.array, ids: mx.array) -> mx.array:
    """log softmax(z)[id] per row: [..., V], int [...] -> [...] float32 (nats; -NLL)."""
    x = logits.astype(mx.float32)
    picked = mx.take_along_axis(x, ids[..., None].astype(mx.int32), axis=-1)[..., 0]
    return picked - mx.logsumexp(x, axis=-1)


def entropy_stats(logits: mx.array, ids: mx.array | None = None) -> dict[str, mx.array]:
    """H, logsumexp and (if ``ids``) target log-prob from one pass over the logits.

    Returns a dict with ``entropy``, ``logsumexp`` and optionally ``target_logprob``, each [...].
    """
    out = {"entropy": entropy(logits), "logsumexp": logsumexp(logits)}
    if ids is not None:
        out["target_logprob"] = target_logprob(logits, ids)
    return out
