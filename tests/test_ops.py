"""mlxgate.ops against a float64 numpy oracle (SPEC §3.1, §3.3, §4).

These run on whatever device MLX defaults to: the chunked composed path on CPU, the fused
kernels on CUDA or Metal. Large-V cases use few rows so the suite stays fast.
"""

from __future__ import annotations

import math

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)
import mlxgate.backend

import mlx.core as mx
import numpy as np
import pytest

from mlxgate import ops

NEG_INF = -np.inf
TOL_F32 = 1e-5  # relative, float32 input (the bound)
# 16-bit input: the oracle sees the same rounded values, so only float32 accumulation differs;
# the bound is looser only to leave room for bf16-typed intermediate casts.
TOL_16 = 2e-5


# ------------------------------------------------------------------------ float64 oracle


def ref_stats(x: np.ndarray, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        m = np.where(np.isneginf(m), 0.0, m)
        e = np.exp(x - m)
        s = e.sum(-1)
        lse = m[..., 0] + np.log(s)
        logp = x - lse[..., None]
        p = np.exp(logp)
        h = -np.sum(np.where(p > 0, p * logp, 0.0), axis=-1)
        h = np.where(s > 0, h, np.nan)
        out = {"entropy": h, "logsumexp": lse}
        if ids is not None:
            out["target_logprob"] = np.take_along_axis(x, ids[..., None], -1)[..., 0] - lse
    return out


def ref_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    la = a - ref_stats(a)["logsumexp"][..., None]
    lb = b - ref_stats(b)["logsumexp"][..., None]
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(la)
        return np.sum(np.where(p > 0, p * (la - lb), 0.0), axis=-1)


def as_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def rounded(x: np.ndarray, dtype: mx.Dtype) -> tuple[mx.array, np.ndarray]:
    """The MLX array in ``dtype`` and the exact values it holds, for the oracle."""
    arr = mx.array(x.astype(np.float32)).astype(dtype)
    return arr, as_np(arr)


def close(got: np.ndarray, want: np.ndarray, rel: float, abs_: float = 0.0) -> None:
    np.testing.assert_allclose(got, want, rtol=rel, atol=abs_, equal_nan=True)



def check_random_rows(rng: np.random.Generator, dtype: mx.Dtype, rows: int, vocab: int) -> None:
    """entropy_stats (H, lse, target log-prob) and KL of random rows against the float64 oracle,
    on whatever path ops dispatches to (the per-backend kernel test files call this)."""
    xa, x = rounded(rng.standard_normal((rows, vocab)) * 4, dtype)
    ya, y = rounded(x + rng.standard_normal((rows, vocab)), dtype)
    ids = rng.integers(0, vocab, rows)
    tol = TOL_F32 if dtype == mx.float32 else TOL_16
    got = ops.entropy_stats(xa, mx.array(ids))
    for key, want in ref_stats(x, ids).items():
        close(as_np(got[key]), want, tol, 1e-6)
    close(as_np(ops.kl(xa, ya)), ref_kl(x, y), tol, 1e-6)


RNG = np.random.default_rng(20260613)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize(
    "rows,vocab",
    [(5, 1), (5, 7), (4, 1000), (3, 4099), (3, 32768), (2, 32771), (2, 262144)],
)
def test_random_rows_float32(rows, vocab):
    x = (RNG.standard_normal((rows, vocab)) * 4).astype(np.float32)
    y = (x + RNG.standard_normal((rows, vocab)) * 2).astype(np.float32)
    ids = RNG.integers(0, vocab, rows)
    got = ops.entropy_stats(mx.array(x), mx.array(ids))
    want = ref_stats(x, ids)
    for key in want:
        close(as_np(got[key]), want[key], TOL_F32, 1e-6)
    close(as_np(ops.kl(mx.array(x), mx.array(y))), ref_kl(x, y), TOL_F32, 1e-6)
    close(as_np(ops.entropy(mx.array(x))), want["entropy"], TOL_F32, 1e-6)
    close(as_np(ops.logsumexp(mx.array(x))), want["logsumexp"], TOL_F32, 1e-6)
    close(as_np(ops.target_logprob(mx.array(x), mx.array(ids))), want["target_logprob"], TOL_F32, 1e-6)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("vocab", [1000, 32771, 262144])
def test_random_rows_16bit(dtype, vocab):
    rows = 2 if vocab > 100000 else 3
    xa, x = rounded(RNG.standard_normal((rows, vocab)) * 4, dtype)
    ya, y = rounded(x + RNG.standard_normal((rows, vocab)), dtype)
    ids = RNG.integers(0, vocab, rows)
    got = ops.entropy_stats(xa, mx.array(ids))
    want = ref_stats(x, ids)
    for key in want:
        assert got[key].dtype == mx.float32
        close(as_np(got[key]), want[key], TOL_16, 1e-6)
    close(as_np(ops.kl(xa, ya)), ref_kl(x, y), TOL_16, 1e-6)


@pytest.mark.parametrize("vocab", [1, 1000, 4099, 262144])
@pytest.mark.parametrize("value", [0.0, 7.5, -30.0])
def test_all_equal_logits_give_ln_v(vocab, value):
    x = mx.full((2, vocab), value, dtype=mx.float32)
    h = as_np(ops.entropy(x))
    assert np.all(np.abs(h - math.log(vocab)) <= 1e-6 * max(1.0, math.log(vocab)))
    close(as_np(ops.logsumexp(x)), np.full(2, value + math.log(vocab)), 1e-6, 1e-6)


def test_one_hot_like_rows():
    vocab = 5000
    x = np.full((4, vocab), -1e4, dtype=np.float32)
    x[np.arange(4), [0, 17, 4999, 2500]] = 1e4
    x[3] = RNG.uniform(-1e4, 1e4, vocab).astype(np.float32)  # +-1e4 spread, few live tokens
    x[2, 10] = 1e4 - 1.0  # a runner-up one nat behind
    want = ref_stats(x, np.array([0, 17, 10, 3]))
    got = ops.entropy_stats(mx.array(x), mx.array([0, 17, 10, 3]))
    for key in want:
        close(as_np(got[key]), want[key], TOL_F32, 1e-6)
    assert as_np(got["entropy"])[0] == 0.0
    y = x.copy()
    y[:, :50] += 3.0
    close(as_np(ops.kl(mx.array(x), mx.array(y))), ref_kl(x, y), TOL_F32, 1e-5)


def test_neg_inf_entries():
    vocab = 3001
    x = (RNG.standard_normal((4, vocab)) * 3).astype(np.float32)
    x[RNG.random((4, vocab)) < 0.3] = NEG_INF  # masked vocabulary
    x[:, 0] = 1.0  # every row keeps a live token
    ids = np.array([0, 0, 0, 0])
    got = ops.entropy_stats(mx.array(x), mx.array(ids))
    want = ref_stats(x, ids)
    for key in want:
        close(as_np(got[key]), want[key], TOL_F32, 1e-6)
        assert np.all(np.isfinite(as_np(got[key])))
    y = (x + RNG.standard_normal(x.shape)).astype(np.float32)  # same mask in q
    close(as_np(ops.kl(mx.array(x), mx.array(y))), ref_kl(x, y), TOL_F32, 1e-6)
    # q masks a token that p keeps: KL = +inf; p masks one q keeps: finite.
    q = x.copy()
    q[0, 0] = NEG_INF
    p2 = x.copy()
    p2[1, 0] = NEG_INF
    kl_q = as_np(ops.kl(mx.array(x), mx.array(q)))
    assert kl_q[0] == np.inf and np.all(np.isfinite(kl_q[1:]))
    close(as_np(ops.kl(mx.array(p2), mx.array(x))), ref_kl(p2, x), TOL_F32, 1e-6)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_far_tail_and_flush_boundary(dtype):
    """Logits 0-88 nats below the row max, around the CPU path's flush point (e^t < 2^-60 is
    taken as 0): the tail still matches the oracle, the max sits in the last column, -inf
    entries and whole -inf stretches contribute nothing."""
    vocab = 40000
    rows = np.empty((3, vocab), dtype=np.float64)
    rows[0] = -RNG.uniform(0.0, 88.0, vocab)  # every depth of the tail
    rows[1] = -RNG.uniform(38.0, 45.0, vocab)  # straddles -60 ln 2 = -41.6
    rows[1, -1] = 0.0  # the max in the last column
    rows[2] = -RNG.uniform(0.0, 12.0, vocab)
    rows[2, 5000:9000] = NEG_INF  # a whole masked stretch
    rows[2, RNG.random(vocab) < 0.2] = NEG_INF
    rows[2, -1] = 3.0
    xa, x = rounded(rows, dtype)
    ids = np.array([vocab - 1, vocab - 1, 7])
    got = ops.entropy_stats(xa, mx.array(ids))
    want = ref_stats(x, ids)
    tol = TOL_F32 if dtype == mx.float32 else TOL_16
    for key in want:
        close(as_np(got[key]), want[key], tol, 1e-6)
    ya, y = rounded(x + RNG.standard_normal(x.shape), dtype)
    close(as_np(ops.kl(xa, ya)), ref_kl(x, y), tol, 1e-6)


def test_heavy_tail_under_one_dominant_token():
    """40,000 terms of 2e-9 under one 1.0: summed together in float32 the tail rounds away (H off by
    0.4%, the naive path by 5%); the maxima are counted apart from the tail sum, and with ties."""
    x = np.full((1, 40000), -20.0, dtype=np.float32)
    x[0, 0] = 0.0
    close(as_np(ops.entropy(mx.array(x))), ref_stats(x)["entropy"], TOL_F32, 1e-7)
    y = (x + np.random.default_rng(1).standard_normal(x.shape).astype(np.float32) * 0.3).astype(np.float32)
    close(as_np(ops.kl(mx.array(x), mx.array(y))), ref_kl(x, y), 1e-3, 1e-9)  # KL ~ 4e-6 nats (was -6e-6)
    x[0, 7] = 0.0  # two maxima
    got = ops.entropy_stats(mx.array(x), mx.array([7]))
    want = ref_stats(x, np.array([7]))
    for key in ("entropy", "logsumexp", "target_logprob"):
        close(as_np(got[key]), want[key], TOL_F32, 1e-7)


def test_composed_small_input_extra_memory():
    """One row: the chunk's temporaries are a few row-sized float32 buffers, not six plus a
    fresh ones vector (the ones vector is kept between calls)."""
    if mlxgate.backend.device_name() != "cpu":
        pytest.skip("the composed path's memory is a CPU matter")
    x = mx.array((RNG.standard_normal((1, 32768)) * 4).astype(np.float32))
    mx.eval(x)
    with ops.ops_mode("composed"):
        mx.eval(ops.entropy(x))  # warm: compile cache, ones vector
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(ops.entropy(x))
        extra = mx.get_peak_memory() - base
    assert extra <= 3 * x.nbytes + x.size + 4096  # + the 1-byte mask that counts the maxima


def test_all_neg_inf_row_is_documented_nan():
    x = np.zeros((3, 64), dtype=np.float32)
    x[1] = NEG_INF
    got = ops.entropy_stats(mx.array(x), mx.array([0, 0, 0]))
    h, lse, tlp = (as_np(got[k]) for k in ("entropy", "logsumexp", "target_logprob"))
    assert np.isnan(h[1]) and lse[1] == -np.inf and np.isnan(tlp[1])
    close(h[[0, 2]], [math.log(64)] * 2, 1e-6)
    klv = as_np(ops.kl(mx.array(x), mx.array(np.zeros_like(x))))
    assert np.isnan(klv[1]) and klv[0] == 0.0 and klv[2] == 0.0


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_small_kl_does_not_depend_on_a_logit_offset(offset):
    """Two models whose logits differ by a constant (softmax-invariant) plus a little noise: a
    KL of ~1e-3 nats keeps the same relative accuracy at a 100-nat offset (taking a - b directly
    cancelled against the maxima: ~6e-2 relative there)."""
    a = (RNG.standard_normal((4, 32000)) * 3).astype(np.float32)
    b = (a + RNG.standard_normal(a.shape).astype(np.float32) * 0.05 + offset).astype(np.float32)
    want = ref_kl(a, b)
    assert np.all((want > 5e-4) & (want < 5e-3))
    close(as_np(ops.kl(mx.array(a), mx.array(b))), want, 2e-3)


def test_kl_of_p_with_itself_is_exactly_zero():
    for vocab in (7, 32768, 262144):
        x = mx.array((RNG.standard_normal((2, vocab)) * 5).astype(np.float32))
        assert np.all(as_np(ops.kl(x, x)) == 0.0)
        xb = x.astype(mx.bfloat16)
        assert np.all(as_np(ops.kl(xb, xb)) == 0.0)


def test_shapes_single_row_zero_rows_and_leading_dims():
    vocab = 300
    x = (RNG.standard_normal((2, 3, vocab)) * 2).astype(np.float32)
    ids = RNG.integers(0, vocab, (2, 3))
    got = ops.entropy_stats(mx.array(x), mx.array(ids))
    for key, want in ref_stats(x, ids).items():
        assert got[key].shape == (2, 3)
        close(as_np(got[key]), want, TOL_F32, 1e-6)
    assert ops.kl(mx.array(x), mx.array(x[::-1].copy())).shape == (2, 3)
    one = ops.entropy(mx.array(x[0, 0]))  # a single row, shape [V]
    assert one.shape == ()
    close(as_np(one), ref_stats(x[0, 0])["entropy"], TOL_F32)
    for shape in [(0, vocab), (2, 0, vocab)]:
        z = mx.zeros(shape)
        assert ops.entropy(z).shape == shape[:-1]
        assert ops.kl(z, z).shape == shape[:-1]
        st = ops.entropy_stats(z, mx.zeros(shape[:-1], dtype=mx.int32))
        assert st["target_logprob"].shape == shape[:-1]
        assert mx.grad(lambda t: ops.entropy(t).sum())(z).shape == shape
    with pytest.raises(ValueError):
        ops.entropy(mx.zeros((3, 0)))
    with pytest.raises(ValueError):
        ops.kl(mx.zeros((3, 4)), mx.zeros((3, 5)))


# -------------------------------------------------------------------------- gradients


def fd_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a float64 scalar function."""
    g = np.zeros_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = f(x)
        flat[i] = old - eps
        lo = f(x)
        flat[i] = old
        gf[i] = (hi - lo) / (2 * eps)
    return g


def _loss_np(x, y, ids, w):
    st = ref_stats(x, ids)
    return float(
        np.sum(w[0] * st["entropy"] + w[1] * st["logsumexp"] + w[2] * st["target_logprob"])
        + np.sum(w[3] * ref_kl(x, y))
        + np.sum(w[4] * ref_kl(y, x))
    )


def _loss_mx(x, y, ids, w):
    st = ops.entropy_stats(x, ids)
    return (
        mx.sum(w[0] * st["entropy"] + w[1] * st["logsumexp"] + w[2] * st["target_logprob"])
        + mx.sum(w[3] * ops.kl(x, y))
        + mx.sum(w[4] * ops.kl(y, x))
    )


def test_vjps_match_naive_autodiff_and_finite_differences():
    rows, vocab = 3, 23
    x = RNG.standard_normal((rows, vocab)) * 2
    y = x + RNG.standard_normal((rows, vocab))
    ids = RNG.integers(0, vocab, rows)
    w = RNG.standard_normal((5, rows))
    xm, ym = mx.array(x.astype(np.float32)), mx.array(y.astype(np.float32))
    idm, wm = mx.array(ids), mx.array(w.astype(np.float32))
    grad = mx.grad(_loss_mx, argnums=(0, 1))
    gx, gy = grad(xm, ym, idm, wm)
    with ops.ops_mode("naive"):
        nx, ny = grad(xm, ym, idm, wm)
    close(as_np(gx), as_np(nx), 1e-4, 2e-6)
    close(as_np(gy), as_np(ny), 1e-4, 2e-6)
    x32, y32 = as_np(xm), as_np(ym)
    fx = fd_grad(lambda t: _loss_np(t, y32, ids, w), x32.copy())
    fy = fd_grad(lambda t: _loss_np(x32, t, ids, w), y32.copy())
    close(as_np(gx), fx, 1e-4, 5e-6)
    close(as_np(gy), fy, 1e-4, 5e-6)


def test_entropy_grad_formula_and_masked_tokens():
    vocab = 4099
    x = (RNG.standard_normal((2, vocab)) * 3).astype(np.float32)
    x[:, ::7] = NEG_INF
    g = as_np(mx.grad(lambda t: ops.entropy(t).sum())(mx.array(x)))
    st = ref_stats(x)
    logp = x.astype(np.float64) - st["logsumexp"][:, None]
    with np.errstate(invalid="ignore"):
        want = np.where(np.isneginf(x), 0.0, -np.exp(logp) * (logp + st["entropy"][:, None]))
    assert np.all(np.isfinite(g)) and np.all(g[:, ::7] == 0.0)
    close(g, want, 1e-4, 1e-9)


def test_grad_keeps_input_dtype_and_trains_under_compile():
    x = mx.array((RNG.standard_normal((4, 512)) * 2).astype(np.float32))
    ref = mx.array((RNG.standard_normal((4, 512)) * 2).astype(np.float32))

    def loss(z):
        return ops.kl(z, ref).mean() - 0.01 * ops.entropy(z).mean()

    g_eager = mx.grad(loss)(x)
    g_comp = mx.compile(mx.grad(loss))(x)
    close(as_np(g_comp), as_np(g_eager), 1e-5, 1e-8)
    assert mx.grad(loss)(x.astype(mx.bfloat16)).dtype == mx.bfloat16
    # Gradient descent through the op pulls P onto Q (KL barrier style).
    x, ref = x[:, :64], ref[:, :64]
    z = x
    for _ in range(60):
        z = z - 5.0 * mx.grad(lambda t: ops.kl(t, ref).sum())(z)
    assert ops.kl(z, ref).mean().item() < 0.25 * ops.kl(x, ref).mean().item()


# ----------------------------------------------------------- determinism, modes, memory


def test_twenty_calls_are_bit_identical():
    x = mx.array((RNG.standard_normal((3, 32771)) * 4).astype(np.float32))
    y = mx.array((RNG.standard_normal((3, 32771)) * 4).astype(np.float32))
    ids = mx.array([1, 2, 3])
    first = ops.entropy_stats(x, ids)
    kl0 = ops.kl(x, y)
    g0 = mx.grad(lambda t: ops.kl(t, y).sum())(x)
    for _ in range(20):
        again = ops.entropy_stats(x, ids)
        for key in first:
            assert np.array_equal(np.array(again[key]), np.array(first[key]))
        assert np.array_equal(np.array(ops.kl(x, y)), np.array(kl0))
    assert np.array_equal(np.array(mx.grad(lambda t: ops.kl(t, y).sum())(x)), np.array(g0))


def test_mode_switches(monkeypatch):
    monkeypatch.setenv(ops.ENV_MODE, "naive")
    assert ops.current_path() == "naive"
    x = mx.array((RNG.standard_normal((2, 50))).astype(np.float32))
    close(as_np(ops.entropy(x)), ref_stats(as_np(x))["entropy"], 1e-5)
    monkeypatch.setenv(ops.ENV_MODE, "auto")
    assert ops.current_path() in ("composed", "cuda", "metal")
    with ops.ops_mode("naive"):
        assert ops.current_path() == "naive"
    assert ops.current_path() != "naive"
    monkeypatch.setenv(ops.ENV_MODE, "bogus")
    with pytest.raises(ValueError):
        ops.current_path()
    with pytest.raises(ValueError):
        ops.set_mode("fast")


@pytest.mark.skipif(
    mlxgate.backend.device_name() != "cpu", reason="the composed path's memory bound is a CPU target"
)
def test_composed_path_peak_memory_is_small():
    """Extra memory is a few chunk-sized temporaries, the same for 4 rows as for 16."""

    def extra(rows: int) -> list[int]:
        x = mx.array((RNG.standard_normal((rows, 262144))).astype(np.float32))
        y = x * 0.5
        mx.eval(x, y)
        out = []
        for f in (lambda: ops.entropy(x), lambda: ops.kl(x, y)):
            mx.eval(f())  # warm: compile caches
            mx.reset_peak_memory()
            base = mx.get_active_memory()
            mx.eval(f())
            out.append(mx.get_peak_memory() - base)
        return out

    with ops.ops_mode("composed"):
        small, large = extra(4), extra(16)
    chunk_bytes = ops.CHUNK_ELEMS * 4
    for s_, l_ in zip(small, large):
        assert l_ <= 16 * chunk_bytes  # [16, 262144] float32 input: 16 MiB; KL: 32 MiB
        assert abs(l_ - s_) <= chunk_bytes


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_random_rows_on_the_default_path(dtype):
    """The oracle check the CUDA and Metal test files share, on this machine's path."""
    check_random_rows(np.random.default_rng(5), dtype, 3, 4099)
