"""Reductions over the vocabulary: entropy, KL, logsumexp, target log-prob (SPEC §3.1, §3.3, §4).

Every entropy and KL in mlxgate goes through this module. The last axis (the vocabulary, V up
to 262,144) is reduced; any leading shape works, including 0 rows; input may be
float32/bfloat16/float16; accumulation and output are float32, in nats.

Paths, chosen per call:

- ``metal`` / ``cuda``: the fused kernels of ``kernels/`` (one block per row, each logit read
  once, deterministic reductions), built by :mod:`mlxgate._vocab_kernels`.
- ``composed`` (the CPU path): MLX ops over chunks of rows, so the temporaries stay a few MiB
  whatever the input size; one ``exp`` per logit (two for KL) and the weighted sums as
  batched dot products.
- ``naive``: the textbook composed expressions with MLX's own autodiff; for the benchmark and as
  a fallback. Force it with env ``MLXGATE_OPS=naive`` or :func:`set_mode` / :func:`ops_mode`.

Gradients: the fused and composed paths are ``mx.custom_function``s whose VJPs are SPEC §4's:
dH/dz_i = -p_i (log p_i + H); dKL/da_i = p_i (log p_i - log q_i - KL); dKL/db_i = q_i - p_i;
dlse/dz_i = p_i; dlogp_id/dz_i = [i == id] - p_i.

Edge rows: ``-inf`` logits are masked tokens (p = 0, no contribution, no NaN). If q has -inf
where p > 0, KL = +inf. A row that is all -inf has no distribution: lse = -inf, and H, KL and
the target log-prob are NaN. An id outside [0, V) gives a NaN target log-prob on the fused path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx

from mlxgate import _vocab_kernels as vk
from mlxgate import backend

MODES = ("auto", "naive", "composed")
ENV_MODE = "MLXGATE_OPS"
# Rows per CPU chunk are chosen so that one chunk holds about this many logits (1 MiB of
# float32): the two float32 temporaries of a chunk stay in L2 and far below the input's size.
CHUNK_ELEMS = 1 << 18
# Rows per kernel launch: the launch grid (rows * threads) must fit in a signed int.
_MAX_LAUNCH_ROWS = 1 << 20

_mode_override: str | None = None


def set_mode(mode: str | None) -> None:
    """Force a path for every call: 'auto', 'naive', 'composed'; None goes back to the env."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise ValueError(f"unknown ops mode {mode!r}; use one of {', '.join(MODES)}")
    _mode_override = mode


@contextmanager
def ops_mode(mode: str) -> Iterator[None]:
    """``with ops_mode('naive'): ...`` runs the block on that path, then restores the old one."""
    old = _mode_override
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(old)


def current_path() -> str:
    """The path the next call takes: 'metal', 'cuda', 'composed' or 'naive'."""
    mode = _mode_override or os.environ.get(ENV_MODE, "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r}; use one of {', '.join(MODES)}")
    if mode != "auto":
        return mode
    dev = backend.device_name()
    return dev if dev in ("metal", "cuda") else "composed"


# ----------------------------------------------------------------------------- helpers


def _as_float(x: mx.array) -> mx.array:
    return x if x.dtype in (mx.float32, mx.bfloat16, mx.float16) else x.astype(mx.float32)


def _flatten(x: mx.array) -> tuple[mx.array, tuple[int, ...]]:
    if x.ndim == 0:
        raise ValueError("logits need a vocabulary axis: shape [..., V]")
    if x.shape[-1] == 0:
        raise ValueError("the vocabulary axis is empty (V = 0)")
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, x.shape[-1]), lead


def _full(c: mx.array, n: int) -> mx.array:
    # An unused output's cotangent can arrive as a 0-d zero; kernels index it per row.
    return mx.broadcast_to(c.astype(mx.float32), (n,))


class _Evaluator:
    """Evaluates each chunk as it is built, which is what bounds peak memory; inside
    ``mx.compile`` (where eval is refused) it falls back to one lazy graph."""

    def __init__(self) -> None:
        self.lazy = False

    def __call__(self, arrays: list[mx.array]) -> None:
        if self.lazy:
            return
        try:
            mx.eval(arrays)
        except ValueError as err:
            if "transformations" not in str(err):
                raise
            self.lazy = True


def _row_chunks(n: int, vocab: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_ELEMS // vocab)
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _cat(parts: list[mx.array], empty_shape: tuple[int, ...], dtype=mx.float32) -> mx.array:
    if not parts:
        return mx.zeros(empty_shape, dtype=dtype)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def _rowdot(x: mx.array, y: mx.array) -> mx.array:
    """sum(x * y, -1) for [r, V] as a batched gemv: no [r, V] product temporary."""
    return (x[:, None, :] @ y[:, :, None])[:, 0, 0]


_ONES: dict[int, mx.array] = {}


def _ones(n: int) -> mx.array:
    """A float32 ones vector of length n for row sums as gemvs (``x @ ones``), kept between
    calls (at most 8 widths, 4n bytes each) so that a call does not allocate one the size of a
    row. Why gemv: MLX's CPU sum adds serially (rel. error ~5e-4 at V = 262,144 measured);
    BLAS gemv keeps many partial sums (~6e-7)."""
    o = _ONES.get(n)
    if o is None:
        o = mx.ones((n,), dtype=mx.float32)
        try:
            mx.eval(o)
        except ValueError:  # inside mx.compile: use it for this trace only
            return o
        if len(_ONES) >= 8:
            _ONES.pop(next(iter(_ONES)))
        _ONES[n] = o
    return o


# ----------------------------------------------------------------- composed (CPU) chunks

# e^r on |r| <= ln2/2: Taylor to r^7/5040 (rel. error < 2e-8 there).
_EXP_TAYLOR = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040)
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # Cody-Waite split of ln 2


def _exp_nonpos(t: mx.array) -> mx.array:
    """exp(t) for float32 t <= ~0 (-inf -> 0, NaN -> NaN), from mul/add/shift only.

    Why: MLX's CPU exp on x86-64 wheels calls the software ``fma`` six times per element
    (~28 ns each on the CI machine, 85% of the naive ops' time); inside ``mx.compile`` this
    form becomes one plain loop, ~7x faster. Max rel. error ~1e-7 down to 2^-126; smaller
    results flush to 0.
    """
    k = mx.maximum(t * 1.4426950408889634, -127.0)
    k = (k + 12582912.0) - 12582912.0  # round to nearest integer (|k| < 2^22)
    r = (t - k * _LN2_HI) - k * _LN2_LO
    r = mx.where(k == -127.0, 0.0, r)  # t = -inf: keep r finite, the 2^k factor below is 0
    p = _EXP_TAYLOR[-1]
    for c in _EXP_TAYLOR[-2::-1]:
        p = p * r + c
    two_k = ((k + 127.0).astype(mx.int32) << 23).view(mx.float32)  # 2^k; k = -127 -> 0.0
    return p * two_k


# Forward entropy: e^t is split in two fused loops because MLX fuses at most 11 ops deep and
# a bit-cast (view) ends a fused loop (as in _exp_nonpos, which left six row-sized buffers per
# chunk). Loop 1 writes (r, k), loop 2 writes (e, e * t), usually into loop 1's buffers: two to
# three float32 temporaries per logit of the chunk (measured), summed by gemvs.
_FLUSH_J = 60  # e^t = 0 for t < -60 ln 2 (~ -41.6): < 2^-60 each, ~1e-11 nats lost at V = 262,144


def _ent_reduce(x: mx.array, m: mx.array) -> tuple[mx.array, mx.array]:
    """(r, k) with -t = m - x = k ln2 - r: k an integer in [0, 127] (as float32), |r| <= ln2/2,
    so e^t = e^r / 2^k. Built from m - x (not x - m) so that MLX's common-subexpression pass
    does not merge it with the t of _ent_scale and keep a third temporary."""
    nt = mx.minimum(m - x.astype(mx.float32), 88.0)  # -inf logit -> 88 -> flushed below
    # The row's maxima (t = 0, e = 1) are flushed too and counted apart (see _ent_chunk): summed
    # with the tail, each 1.0 would swallow the tail terms below its rounding step.
    nt = mx.where(nt == 0.0, 88.0, nt)
    k = (nt * 1.4426950408889634 + 12582912.0) - 12582912.0  # round to nearest (k < 2^22)
    r = (k * _LN2_HI - nt) + k * _LN2_LO  # Cody-Waite: t - (-k) ln2 without rounding loss
    return r, k


def _ent_scale(r: mx.array, k: mx.array, x: mx.array, m: mx.array) -> tuple[mx.array, mx.array]:
    """(e, e * t) from _ent_reduce's (r, k): e = P(r) / 2^k with 2^k from integer shifts
    (no bit-cast, so this is one fused loop), e = 0 exactly where k > _FLUSH_J."""
    j = k.astype(mx.int32)
    lo = mx.left_shift(1, mx.minimum(j, 30)).astype(mx.float32)
    hi = mx.left_shift(1, mx.minimum(mx.maximum(j - 30, 0), 30)).astype(mx.float32)
    r2 = r * r
    c = _EXP_TAYLOR
    p = ((c[0] + c[1] * r) + r2 * (c[2] + c[3] * r)) + (r2 * r2) * ((c[4] + c[5] * r) + r2 * (c[6] + c[7] * r))
    e = mx.where(j > _FLUSH_J, 0.0, p / (lo * hi))
    # max(): e * t is 0 (not 0 * -inf) at -inf logits.
    return e, e * mx.maximum(x.astype(mx.float32) - m, -88.0)


def _ent_chunk(x: mx.array, ones: mx.array, ids: mx.array | None = None) -> tuple[mx.array, ...]:
    """(H, lse[, log p[id]]) of a [r, V] chunk, float32 [r] each; ``ones`` float32 [V]."""
    m = mx.max(x, axis=-1, keepdims=True).astype(mx.float32)
    m = mx.where(m == -mx.inf, 0.0, m)  # all -inf row: e = 0, lse = -inf, H = NaN
    e_tail, z = _ent_scale(*_ent_reduce(x, m), x, m)
    # s = n_max + s_tail with log s = log n_max + log1p(s_tail / n_max): a dominant token's 1.0
    # never meets the tail's small terms in float32 (1 x 0 over 39,999 x -20 lost 0.4% of H).
    n_max = mx.sum(x == m, axis=-1).astype(mx.float32)
    s_tail = e_tail @ ones  # row sums as gemvs (see _ones)
    s = n_max + s_tail
    ls = _log_count_plus_tail(n_max, s_tail)
    out = (ls - (z @ ones) / s, m[:, 0] + ls)
    if ids is None:
        return out
    # (z_id - m) - log s, not z_id - lse: at |z| ~ 1e4 the latter loses ~1e-4 to rounding.
    picked = mx.take_along_axis(x, ids[:, None], axis=-1)[:, 0].astype(mx.float32)
    return out + ((picked - m[:, 0]) - ls,)


def _log_count_plus_tail(n_max: mx.array, s_tail: mx.array) -> mx.array:
    """log(n_max + s_tail) for a row sum split into its maxima (n_max terms of exactly 1) and the
    rest, as log n_max + log1p(s_tail / n_max): accurate however small the tail. n_max = 0 (an
    all -inf row) gives log s_tail = -inf."""
    n1 = mx.maximum(n_max, 1.0)
    return mx.where(n_max > 0, mx.log(n1) + mx.log1p(s_tail / n1), mx.log(s_tail))


def _kl_chunk(a: mx.array, b: mx.array, ones: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    a = a.astype(mx.float32)
    b = b.astype(mx.float32)
    ma = mx.max(a, axis=-1, keepdims=True)
    mb = mx.max(b, axis=-1, keepdims=True)
    ma = mx.where(ma == -mx.inf, 0.0, ma)
    mb = mx.where(mb == -mx.inf, 0.0, mb)
    ta, tb = a - ma, b - mb
    # As in _ent_chunk, each side's maxima (t = 0, e = 1) are counted apart from its tail sum.
    na = mx.sum(ta == 0, axis=-1).astype(mx.float32)
    nb = mx.sum(tb == 0, axis=-1).astype(mx.float32)
    ea = _exp_nonpos(ta)
    sa_tail = mx.where(ta == 0, 0.0, ea) @ ones
    la = _log_count_plus_tail(na, sa_tail)
    lb = _log_count_plus_tail(nb, mx.where(tb == 0, 0.0, _exp_nonpos(tb)) @ ones)
    # KL = E_p[(a - ma) - (b - mb)] + log(sb / sa): each logit taken relative to its own row's
    # max, so a constant offset between the two models' logits does not cancel against a small KL
    # (E_p[a - b] + (mb - ma) lost ~1e-2 relative at KL ~ 1e-3 with a 100-nat offset); exactly
    # 0 when a == b.
    u = _rowdot(ea, mx.where(ea > 0, ta - tb, 0.0))
    kl = u / (na + sa_tail) + (lb - la)
    return kl, ma[:, 0] + la, mb[:, 0] + lb


def _ent_bwd_chunk(x, lse, ent, c_ent, c_lse, c_tlp, ids):
    lp = x.astype(mx.float32) - lse[:, None]
    p = _exp_nonpos(lp)
    coef = (c_lse - c_tlp)[:, None] - c_ent[:, None] * (lp + ent[:, None])
    g = mx.where(p > 0, p * coef, 0.0)
    if ids is not None:
        hit = mx.arange(x.shape[-1], dtype=mx.int32)[None, :] == ids[:, None]
        g = g + mx.where(hit, c_tlp[:, None], 0.0)
    return g.astype(x.dtype)


def _kl_bwd_chunk(a, b, lse_a, lse_b, kl, c_kl, c_la, c_lb):
    la = a.astype(mx.float32) - lse_a[:, None]
    lb = b.astype(mx.float32) - lse_b[:, None]
    p = _exp_nonpos(la)
    q = _exp_nonpos(lb)
    c = c_kl[:, None]
    pc = mx.where(p > 0, p * c, 0.0)
    ga = mx.where(p > 0, p * ((la - lb - kl[:, None]) * c + c_la[:, None]), 0.0)
    gb = mx.where(q > 0, q * (c + c_lb[:, None]), 0.0) - pc
    return ga.astype(a.dtype), gb.astype(b.dtype)


_ent_chunk_c = mx.compile(lambda x, ones: _ent_chunk(x, ones))
_ent_chunk_ids_c = mx.compile(_ent_chunk)
_kl_chunk_c = mx.compile(_kl_chunk)
_ent_bwd_chunk_c = mx.compile(lambda x, lse, ent, ce, cl, ct: _ent_bwd_chunk(x, lse, ent, ce, cl, ct, None))
_ent_bwd_chunk_ids_c = mx.compile(_ent_bwd_chunk)
_kl_bwd_chunk_c = mx.compile(_kl_bwd_chunk)


def _composed_stats(x: mx.array, ids: mx.array | None) -> list[mx.array]:
    n, vocab = x.shape
    ev = _Evaluator()
    ents, lses, tlps = [], [], []
    ones = _ones(vocab)
    for lo, hi in _row_chunks(n, vocab):
        if ids is None:
            outs = _ent_chunk_c(x[lo:hi], ones)
        else:
            outs = _ent_chunk_ids_c(x[lo:hi], ones, ids[lo:hi])
            tlps.append(outs[2])
        ev(list(outs))
        ents.append(outs[0])
        lses.append(outs[1])
    res = [_cat(ents, (0,)), _cat(lses, (0,))]
    if ids is not None:
        res.append(_cat(tlps, (0,)))
    return res


def _composed_kl(a: mx.array, b: mx.array) -> list[mx.array]:
    n, vocab = a.shape
    ev = _Evaluator()
    parts: list[list[mx.array]] = [[], [], []]
    ones = _ones(vocab)
    for lo, hi in _row_chunks(n, vocab):
        outs = _kl_chunk_c(a[lo:hi], b[lo:hi], ones)
        ev(list(outs))
        for acc, o in zip(parts, outs):
            acc.append(o)
    return [_cat(p, (0,)) for p in parts]


# ------------------------------------------------------------------------ fused kernels


def _launch_rows(n: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, _MAX_LAUNCH_ROWS):
        yield lo, min(n, lo + _MAX_LAUNCH_ROWS)


def _kernel_stats(dev: str, x: mx.array, ids: mx.array | None) -> list[mx.array]:
    n, vocab = x.shape
    vec = vk.vec_width(x.dtype, vocab)
    tpb = vk.row_threads(vocab, vec)
    name = "entropy_fwd" if ids is None else "entropy_fwd_ids"
    k = vk.kernel(dev, name)
    nout = 2 if ids is None else 3
    parts: list[list[mx.array]] = [[] for _ in range(nout)]
    for lo, hi in _launch_rows(n):
        ins = [x[lo:hi]] if ids is None else [x[lo:hi], ids[lo:hi]]
        outs = k(
            inputs=ins,
            template=[("T", x.dtype), ("V", vocab), ("TPB", tpb), ("VEC", vec)],
            grid=((hi - lo) * tpb, 1, 1),
            threadgroup=(tpb, 1, 1),
            output_shapes=[(hi - lo,)] * nout,
            output_dtypes=[mx.float32] * nout,
        )
        for acc, o in zip(parts, outs):
            acc.append(o)
    return [_cat(p, (0,)) for p in parts]


def _kernel_kl(dev: str, a: mx.array, b: mx.array) -> list[mx.array]:
    n, vocab = a.shape
    if a.dtype != b.dtype:
        a, b = a.astype(mx.float32), b.astype(mx.float32)
    vec = vk.vec_width(a.dtype, vocab)
    tpb = vk.row_threads(vocab, vec)
    k = vk.kernel(dev, "kl_fwd")
    parts: list[list[mx.array]] = [[], [], []]
    for lo, hi in _launch_rows(n):
        outs = k(
            inputs=[a[lo:hi], b[lo:hi]],
            template=[("T", a.dtype), ("V", vocab), ("TPB", tpb), ("VEC", vec)],
            grid=((hi - lo) * tpb, 1, 1),
            threadgroup=(tpb, 1, 1),
            output_shapes=[(hi - lo,)] * 3,
            output_dtypes=[mx.float32] * 3,
        )
        for acc, o in zip(parts, outs):
            acc.append(o)
    return [_cat(p, (0,)) for p in parts]


def _elementwise_grid(total: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    tpb = 256
    blocks = max(1, min(-(-total // tpb), 8192))  # grid-stride loop covers the rest
    return (blocks * tpb, 1, 1), (tpb, 1, 1)


def _kernel_ent_bwd(dev, x, lse, ent, c_ent, c_lse, c_tlp, ids):
    n, vocab = x.shape
    grid, tg = _elementwise_grid(n * vocab)
    nrows = mx.array([n], dtype=mx.int32)
    if ids is None:
        k, ins = vk.kernel(dev, "entropy_bwd"), [x, lse, ent, c_ent, c_lse, nrows]
    else:
        k = vk.kernel(dev, "entropy_bwd_ids")
        ins = [x, lse, ent, c_ent, c_lse, nrows, ids, c_tlp]
    return k(
        inputs=ins,
        template=[("T", x.dtype), ("V", vocab)],
        grid=grid,
        threadgroup=tg,
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )[0]


def _kernel_kl_bwd(dev, a, b, lse_a, lse_b, kl, c_kl, c_la, c_lb):
    n, vocab = a.shape
    grid, tg = _elementwise_grid(n * vocab)
    nrows = mx.array([n], dtype=mx.int32)
    ga, gb = vk.kernel(dev, "kl_bwd")(
        inputs=[a, b, lse_a, lse_b, kl, c_kl, c_la, c_lb, nrows],
        template=[("T", a.dtype), ("V", vocab)],
        grid=grid,
        threadgroup=tg,
        output_shapes=[a.shape, b.shape],
        output_dtypes=[a.dtype, b.dtype],
    )
    return ga, gb


# ------------------------------------------------------------- custom functions (2-D)


def _stats_fwd(x: mx.array, ids: mx.array | None) -> list[mx.array]:
    if x.shape[0] == 0:
        return [mx.zeros((0,), dtype=mx.float32)] * (2 if ids is None else 3)
    path = current_path()
    if path in ("metal", "cuda"):
        return _kernel_stats(path, x, ids)
    return _composed_stats(x, ids)


def _stats_bwd(x, ids, cots, outs):
    n = x.shape[0]
    if n == 0:
        return mx.zeros_like(x)
    ent, lse = outs[0], outs[1]
    c_ent, c_lse = _full(cots[0], n), _full(cots[1], n)
    c_tlp = _full(cots[2], n) if ids is not None else mx.zeros((n,), dtype=mx.float32)
    path = current_path()
    if path in ("metal", "cuda"):
        return _kernel_ent_bwd(path, x, lse, ent, c_ent, c_lse, c_tlp, ids)
    f = _ent_bwd_chunk_c if ids is None else _ent_bwd_chunk_ids_c
    ev, parts = _Evaluator(), []
    for lo, hi in _row_chunks(n, x.shape[1]):
        args = [x[lo:hi], lse[lo:hi], ent[lo:hi], c_ent[lo:hi], c_lse[lo:hi], c_tlp[lo:hi]]
        g = f(*args) if ids is None else f(*args, ids[lo:hi])
        ev([g])
        parts.append(g)
    return _cat(parts, x.shape, x.dtype)


@mx.custom_function
def _stats(x: mx.array):
    """(H, lse) of [N, V] logits, float32 [N] each."""
    return tuple(_stats_fwd(x, None))


@_stats.vjp
def _stats_vjp(primals, cotangents, outputs):
    # A one-argument custom_function gets its primal as the array itself.
    x = primals[0] if isinstance(primals, (tuple, list)) else primals
    return (_stats_bwd(x, None, cotangents, outputs),)


@mx.custom_function
def _stats_ids(x: mx.array, ids: mx.array):
    """(H, lse, log p[id]) of [N, V] logits and int32 [N] ids, float32 [N] each."""
    return tuple(_stats_fwd(x, ids))


@_stats_ids.vjp
def _stats_ids_vjp(primals, cotangents, outputs):
    x, ids = primals
    return _stats_bwd(x, ids, cotangents, outputs), mx.zeros_like(ids)


@mx.custom_function
def _kl3(a: mx.array, b: mx.array):
    """(KL(P||Q), lse_a, lse_b) of [N, V] logits a (P) and b (Q), float32 [N] each."""
    if a.shape[0] == 0:
        return tuple([mx.zeros((0,), dtype=mx.float32)] * 3)
    path = current_path()
    if path in ("metal", "cuda"):
        return tuple(_kernel_kl(path, a, b))
    return tuple(_composed_kl(a, b))


@_kl3.vjp
def _kl3_vjp(primals, cotangents, outputs):
    a, b = primals
    n = a.shape[0]
    if n == 0:
        return mx.zeros_like(a), mx.zeros_like(b)
    kl, lse_a, lse_b = outputs
    c_kl, c_la, c_lb = (_full(c, n) for c in cotangents)
    path = current_path()
    if path in ("metal", "cuda") and a.dtype == b.dtype:
        return _kernel_kl_bwd(path, a, b, lse_a, lse_b, kl, c_kl, c_la, c_lb)
    ev, gas, gbs = _Evaluator(), [], []
    for lo, hi in _row_chunks(n, a.shape[1]):
        ga, gb = _kl_bwd_chunk_c(
            a[lo:hi], b[lo:hi], lse_a[lo:hi], lse_b[lo:hi], kl[lo:hi],
            c_kl[lo:hi], c_la[lo:hi], c_lb[lo:hi],
        )
        ev([ga, gb])
        gas.append(ga)
        gbs.append(gb)
    return _cat(gas, a.shape, a.dtype), _cat(gbs, b.shape, b.dtype)


# --------------------------------------------------------------------- naive reference


def naive_entropy(logits: mx.array) -> mx.array:
    """Textbook composed H (full-size log_softmax temporaries); MLX autodiff."""
    x = logits.astype(mx.float32)
    logp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    p = mx.exp(logp)
    return -mx.sum(mx.where(p > 0, p * logp, 0.0), axis=-1)


def naive_kl(logits_p: mx.array, logits_q: mx.array) -> mx.array:
    """Textbook composed KL(P||Q) from two float32 log-softmaxes; MLX autodiff."""
    a = logits_p.astype(mx.float32)
    b = logits_q.astype(mx.float32)
    logp = a - mx.logsumexp(a, axis=-1, keepdims=True)
    logq = b - mx.logsumexp(b, axis=-1, keepdims=True)
    p = mx.exp(logp)
    return mx.sum(mx.where(p > 0, p * (logp - logq), 0.0), axis=-1)


def _naive_stats(x: mx.array, ids: mx.array | None) -> dict[str, mx.array]:
    xf = x.astype(mx.float32)
    lse = mx.logsumexp(xf, axis=-1)
    out = {"entropy": naive_entropy(x), "logsumexp": lse}
    if ids is not None:
        out["target_logprob"] = mx.take_along_axis(xf, ids[..., None], axis=-1)[..., 0] - lse
    return out


# -------------------------------------------------------------------------- public API


def _ids32(ids: mx.array, lead: tuple[int, ...]) -> mx.array:
    if tuple(ids.shape) != lead:
        raise ValueError(f"ids shape {tuple(ids.shape)} must equal the logits' leading shape {lead}")
    return ids.astype(mx.int32).reshape(-1)


def entropy_stats(logits: mx.array, ids: mx.array | None = None) -> dict[str, mx.array]:
    """H, logsumexp and (if ``ids``) the target log-prob, from one pass over the logits.

    ``logits`` [..., V]; ``ids`` int [...] (token ids in [0, V)). Returns a dict with
    ``entropy`` (nats), ``logsumexp`` and optionally ``target_logprob`` (nats, = -NLL),
    each float32 [...]. All three are differentiable w.r.t. ``logits``.
    """
    logits = _as_float(logits)
    if current_path() == "naive":
        return _naive_stats(logits, None if ids is None else ids.astype(mx.int32))
    x, lead = _flatten(logits)
    if ids is None:
        h, lse = _stats(x)
        return {"entropy": h.reshape(lead), "logsumexp": lse.reshape(lead)}
    h, lse, tlp = _stats_ids(x, _ids32(ids, lead))
    return {
        "entropy": h.reshape(lead),
        "logsumexp": lse.reshape(lead),
        "target_logprob": tlp.reshape(lead),
    }


def entropy(logits: mx.array) -> mx.array:
    """H = logsumexp(z) - sum softmax(z) z, in nats (SPEC §3.1). [..., V] -> [...] float32."""
    return entropy_stats(logits)["entropy"]


def logsumexp(logits: mx.array) -> mx.array:
    """log sum exp(z) over the last axis. [..., V] -> [...] float32."""
    return entropy_stats(logits)["logsumexp"]


def target_logprob(logits: mx.array, ids: mx.array) -> mx.array:
    """log softmax(z)[id] per row, nats (= -NLL). [..., V], int [...] -> [...] float32."""
    return entropy_stats(logits, ids)["target_logprob"]


def kl(logits_p: mx.array, logits_q: mx.array) -> mx.array:
    """KL(P||Q) = sum p (log p - log q) per row, nats (SPEC §3.3), P = softmax(logits_p).

    [..., V] x2 (same shape) -> [...] float32. Differentiable w.r.t. both.
    """
    if tuple(logits_p.shape) != tuple(logits_q.shape):
        raise ValueError(f"kl needs equal shapes, got {tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    a, b = _as_float(logits_p), _as_float(logits_q)
    if current_path() == "naive":
        return naive_kl(a, b)
    a2, lead = _flatten(a)
    b2, _ = _flatten(b)
    return _kl3(a2, b2)[0].reshape(lead)
