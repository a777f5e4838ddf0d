"""The kernel bodies of kernels/ executed on the CPU by a SIMT emulator (tests/kernel_host/).

The exact body text MLX would JIT for CUDA (mlxgate._vocab_kernels.host_test_source) is
compiled with g++/clang++ under a host prelude: each block of TPB virtual threads runs as TPB
std::threads, shuffles exchange values among the 32 lanes of a warp, __syncthreads is a
block-wide barrier, and every global-memory access is bounds-checked (vector loads also
alignment-checked, each output element must be written exactly once). So the strided vector
loads, online max/rescale, -inf guards, warp butterflies, the shared-memory second reduction,
the final formulas and the backward bodies all run here, against the float64 oracle of
test_ops.py with the tolerances of test_kernels_cuda.py, at mlxgate.ops' launch shapes (TPB
and VEC from row_threads/vec_width) plus small blocks. Skipped without a C++20 compiler.
"""

from __future__ import annotations

import math
import os

import mlxgate  # noqa: F401  (OpenBLAS before mlx.core)

import mlx.core as mx
import numpy as np
import pytest

from mlxgate import _vocab_kernels as vk
from mlxgate import ops
from tests.kernel_host import harness as H
from tests.test_ops import TOL_16, TOL_F32, close, ref_kl, ref_stats

pytestmark = pytest.mark.skipif(
    H.compiler() is None, reason="no g++/clang++ with C++20 <barrier> and _Float16"
)
RNG = np.random.default_rng(31)
MX = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DTYPES = ["float32", "bfloat16", "float16"]
NEG_INF = -np.inf


def ops_item(name: str, dtype: str, vocab: int, tpb: int | None = None):
    """(name, dtype, V, TPB, VEC) as mlxgate.ops launches it (TPB overridable)."""
    vec = vk.vec_width(MX[dtype], vocab)
    return (name, dtype, vocab, tpb or vk.row_threads(vocab, vec), vec)


def tol(dtype: str) -> float:
    return TOL_F32 if dtype == "float32" else TOL_16


# Widths: a single token, below one warp's vector, not a multiple of any vector width or of
# TPB (scalar loop), vector path with whole U-steps, vector path plus remainder steps.
VOCABS = [1, 33, 4099, 32768, 32771, 40000]
SMALL_TPB = [("float32", 32768), ("bfloat16", 4099), ("float16", 40000)]
ITEMS = sorted({
    *(ops_item(n, d, v) for n in ("entropy_fwd_ids", "kl_fwd") for d in DTYPES for v in VOCABS),
    *(ops_item(n, d, 262144) for n in ("entropy_fwd_ids", "kl_fwd") for d in ("float32", "bfloat16")),
    *(ops_item("entropy_fwd", "float32", v) for v in (4099, 32768)),
    *(ops_item(n, d, v, 64) for n in ("entropy_fwd_ids", "kl_fwd") for d, v in SMALL_TPB),
    *(ops_item(n, "float32", v) for n in ("entropy_fwd_ids", "kl_fwd") for v in (64, 3001, 4096, 5000)),
    *(ops_item("kl_fwd", d, 7) for d in ("float32", "bfloat16")),
    *(ops_item(n, d, 4099) for n in ("entropy_bwd", "entropy_bwd_ids", "kl_bwd") for d in DTYPES),
})


# Block kernels run as fibers (fast; in order, or shuffled per pass with a seed) unless
# MLXGATE_HOST_MODE=threads (one OS thread per virtual thread, for a slower race hunt).
MODE = os.environ.get("MLXGATE_HOST_MODE", "fibers")
SEED = int(os.environ.get("MLXGATE_HOST_SEED", "0"))


@pytest.fixture(scope="module")
def kern(tmp_path_factory):
    k = H.open_all(ITEMS, tmp_path_factory.mktemp("kernel_host"))
    H.set_mode(k, MODE, SEED)
    return k


def stats(kern, dtype, x, ids=None, tpb=None, misalign=False):
    name = "entropy_fwd" if ids is None else "entropy_fwd_ids"
    return H.entropy_fwd(kern, ops_item(name, dtype, x.shape[1], tpb), x, ids, misalign)


def kl(kern, dtype, a, b, tpb=None, misalign=False):
    return H.kl_fwd(kern, ops_item("kl_fwd", dtype, a.shape[1], tpb), a, b, misalign)


def check_fwd(kern, dtype, x, y, ids, tpb=None, rel=None, abs_=1e-6):
    """Entropy stats and KL of storage rows x, y against the float64 oracle."""
    xv, yv = H.values(x, dtype), H.values(y, dtype)
    rel = tol(dtype) if rel is None else rel
    got = stats(kern, dtype, x, ids, tpb)
    for key, want in ref_stats(xv, ids).items():
        close(got[key], want, rel, abs_)
    close(kl(kern, dtype, x, y, tpb)[0], ref_kl(xv, yv), rel, abs_)
    return got


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_forward_matches_oracle(kern, dtype, vocab):
    rows = 3
    x = H.to_storage(RNG.standard_normal((rows, vocab)) * 4, dtype)
    y = H.to_storage(H.values(x, dtype) + RNG.standard_normal((rows, vocab)), dtype)
    check_fwd(kern, dtype, x, y, RNG.integers(0, vocab, rows))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_full_vocab_row(kern, dtype):
    x = H.to_storage(RNG.standard_normal((1, 262144)) * 4, dtype)
    y = H.to_storage(H.values(x, dtype) + RNG.standard_normal((1, 262144)), dtype)
    check_fwd(kern, dtype, x, y, np.array([262143]))


@pytest.mark.parametrize("dtype,vocab", SMALL_TPB)
def test_forward_small_blocks(kern, dtype, vocab):
    """TPB = 64 (two warps): many vector steps per thread, a 2-entry second reduction."""
    x = H.to_storage(RNG.standard_normal((2, vocab)) * 4, dtype)
    y = H.to_storage(H.values(x, dtype) + RNG.standard_normal((2, vocab)), dtype)
    check_fwd(kern, dtype, x, y, np.array([0, vocab - 1]), tpb=64)


def test_forward_without_ids(kern):
    for vocab in (4099, 32768):
        x = (RNG.standard_normal((2, vocab)) * 4).astype(np.float32)
        got = stats(kern, "float32", x)
        assert set(got) == {"entropy", "logsumexp"}
        for key, want in ref_stats(x).items():
            close(got[key], want, TOL_F32, 1e-6)


def test_ids_out_of_range_give_nan(kern):
    vocab = 4099
    x = (RNG.standard_normal((4, vocab)) * 2).astype(np.float32)
    got = stats(kern, "float32", x, np.array([-1, vocab, 0, vocab - 1]))
    tlp = got["target_logprob"]
    assert np.isnan(tlp[0]) and np.isnan(tlp[1])
    close(tlp[2:], ref_stats(x[2:], np.array([0, vocab - 1]))["target_logprob"], TOL_F32, 1e-6)
    assert np.all(np.isfinite(got["entropy"]))


@pytest.mark.parametrize("vocab", [1, 4099, 40000])
@pytest.mark.parametrize("value", [0.0, 7.5, -30.0])
def test_all_equal_logits_give_ln_v(kern, vocab, value):
    x = np.full((2, vocab), value, dtype=np.float32)
    got = stats(kern, "float32", x, np.array([0, vocab - 1]))
    assert np.all(np.abs(got["entropy"] - math.log(vocab)) <= 1e-6 * max(1.0, math.log(vocab)))
    close(got["logsumexp"], np.full(2, value + math.log(vocab)), 1e-6, 1e-6)
    close(got["target_logprob"], np.full(2, -math.log(vocab)), 1e-6, 1e-6)


def test_one_hot_like_rows(kern):
    vocab = 5000
    x = np.full((4, vocab), -1e4, dtype=np.float32)
    x[np.arange(4), [0, 17, 4999, 2500]] = 1e4
    x[3] = RNG.uniform(-1e4, 1e4, vocab).astype(np.float32)
    x[2, 10] = 1e4 - 1.0
    ids = np.array([0, 17, 10, 3])
    got = stats(kern, "float32", x, ids)
    for key, want in ref_stats(x, ids).items():
        close(got[key], want, TOL_F32, 1e-6)
    assert got["entropy"][0] == 0.0
    y = x.copy()
    y[:, :50] += 3.0
    close(kl(kern, "float32", x, y)[0], ref_kl(x, y), TOL_F32, 1e-5)


def test_neg_inf_entries(kern):
    vocab = 3001
    x = (RNG.standard_normal((4, vocab)) * 3).astype(np.float32)
    x[RNG.random((4, vocab)) < 0.3] = NEG_INF
    x[:, 0] = 1.0
    x[2, : vocab - 1] = NEG_INF  # only the last token live: the max arrives last, H = 0
    x[2, vocab - 1] = 2.0
    ids = np.array([0, 0, vocab - 1, 5])
    got = stats(kern, "float32", x, ids)
    for key, want in ref_stats(x, ids).items():
        close(got[key], want, TOL_F32, 1e-6)
    assert np.all(np.isfinite(got["entropy"])) and got["entropy"][2] == 0.0
    y = (x + RNG.standard_normal(x.shape)).astype(np.float32)
    close(kl(kern, "float32", x, y)[0], ref_kl(x, y), TOL_F32, 1e-6)
    q = x.copy()
    q[0, 0] = NEG_INF  # q masks a token p keeps: +inf
    p2 = x.copy()
    p2[1, 0] = NEG_INF  # p masks one q keeps: finite
    kl_q = kl(kern, "float32", x, q)[0]
    assert kl_q[0] == np.inf and np.all(np.isfinite(kl_q[1:]))
    close(kl(kern, "float32", p2, x)[0], ref_kl(p2, x), TOL_F32, 1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_far_tail_and_masked_stretch(kern, dtype):
    vocab = 40000
    rows = np.empty((3, vocab))
    rows[0] = -RNG.uniform(0.0, 88.0, vocab)
    rows[1] = -RNG.uniform(38.0, 45.0, vocab)
    rows[1, -1] = 0.0
    rows[2] = -RNG.uniform(0.0, 12.0, vocab)
    rows[2, 5000:9000] = NEG_INF
    rows[2, RNG.random(vocab) < 0.2] = NEG_INF
    rows[2, -1] = 3.0
    x = H.to_storage(rows, dtype)
    y = H.to_storage(H.values(x, dtype) + RNG.standard_normal(x.shape), dtype)
    check_fwd(kern, dtype, x, y, np.array([vocab - 1, vocab - 1, 7]))


# The most negative finite value of each dtype: masks written as finfo(dtype).min.
FLOAT_MIN = {"float32": float(np.finfo(np.float32).min), "bfloat16": -3.3895313892515355e38}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("vocab", [4099, 40000])
@pytest.mark.parametrize("mask", ["-inf", "finfo.min"])
def test_masked_stretches(kern, dtype, vocab, mask):
    """Masked logits (-inf, or the dtype's most negative finite value as torch.finfo(dtype).min
    masks write it) in long stretches: whole threads and warps see only masked values before
    merging with live ones, P masked where Q is live (the KL's slow path), and a row
    spanning +-3e38. The masked entries contribute nothing, as in the oracle."""
    m = NEG_INF if mask == "-inf" else FLOAT_MIN[dtype]
    raw = RNG.standard_normal((4, vocab)) * 3
    raw[0, : vocab // 2] = m
    raw[1, RNG.random(vocab) < 0.6] = m
    raw[1, 0] = 2.0
    raw[2, : vocab - 3] = m  # the live tokens arrive last
    raw[3] = -3e38
    raw[3, 5] = 3e38
    x = H.to_storage(raw, dtype)
    xv = H.values(x, dtype)
    ids = np.array([0, 0, vocab - 1, 5])
    got = stats(kern, dtype, x, ids)
    want = ref_stats(xv, ids)
    for key in want:
        close(got[key], want[key], tol(dtype), 1e-6)
    y = H.to_storage(RNG.standard_normal((4, vocab)) * 3, dtype)
    close(kl(kern, dtype, x[:3], y[:3])[0], ref_kl(xv[:3], H.values(y[:3], dtype)), tol(dtype), 1e-6)
    # (Row 3's KL against finite logits is a difference of +-3e38 terms, beyond float32:
    # only KL(p||p) = 0 is checked there.)
    assert np.all(kl(kern, dtype, x, x)[0] == 0.0)
    if mask == "-inf":
        q = x.copy()
        q[:3] = H.to_storage(np.where(np.isneginf(xv[:3]), NEG_INF, H.values(y[:3], dtype)), dtype)
        close(kl(kern, dtype, q[:3], x[:3])[0], ref_kl(H.values(q[:3], dtype), xv[:3]), tol(dtype), 1e-6)


def test_nan_logit_at_row_start_propagates(kern):
    """A NaN read while its thread's running max is still -inf (a row's start) makes every output
    NaN, as vocab_common.h promises and the composed path does (it used to be skipped)."""
    x = (RNG.standard_normal((2, 4099)) * 3).astype(np.float32)
    x[0, 0] = np.nan
    x[1, 4098] = np.nan
    got = stats(kern, "float32", x, np.array([1, 1]))
    assert np.all(np.isnan(got["entropy"])) and np.all(np.isnan(got["logsumexp"]))


def test_heavy_tail_under_one_dominant_token(kern):
    """40,000 terms of 2e-9 under a 1.0 (test_ops has the same case for the composed CPU path). The
    kernel's per-thread partial sums keep them (each thread adds ~40 tail terms to at most one 1.0)."""
    x = np.full((1, 40000), -20.0, dtype=np.float32)
    x[0, 0] = 0.0
    close(stats(kern, "float32", x, np.array([0]))["entropy"], ref_stats(x)["entropy"], TOL_F32, 1e-7)
    y = (x + np.random.default_rng(1).standard_normal(x.shape).astype(np.float32) * 0.3).astype(np.float32)
    # KL ~ 3.8e-6 nats: the thread holding p's max still drops its ~40 tail terms from sa, about
    # 1/TPB of the tail mass (4.5e-8 nats here; the composed CPU path counts maxima apart: 3e-10).
    close(kl(kern, "float32", x, y)[0], ref_kl(x, y), 0.0, 1e-7)


def test_all_neg_inf_row_is_documented_nan(kern):
    x = np.zeros((3, 64), dtype=np.float32)
    x[1] = NEG_INF
    got = stats(kern, "float32", x, np.array([0, 0, 0]))
    h, lse, tlp = got["entropy"], got["logsumexp"], got["target_logprob"]
    assert np.isnan(h[1]) and lse[1] == -np.inf and np.isnan(tlp[1])
    close(h[[0, 2]], [math.log(64)] * 2, 1e-6)
    klv = kl(kern, "float32", x, np.zeros_like(x))[0]
    assert np.isnan(klv[1]) and klv[0] == 0.0 and klv[2] == 0.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kl_of_p_with_itself_is_exactly_zero(kern, dtype):
    for vocab in (7, 32768, 262144):
        x = H.to_storage(RNG.standard_normal((1 if vocab > 100000 else 2, vocab)) * 5, dtype)
        # (Row 3's KL against finite logits is a difference of +-3e38 terms, beyond float32:
    # only KL(p||p) = 0 is checked there.)
    assert np.all(kl(kern, dtype, x, x)[0] == 0.0)


def test_misaligned_rows_take_the_scalar_loop(kern):
    """Rows starting 4 bytes past a 16-byte boundary: the vector path must be skipped (the
    emulator faults a misaligned vector load, as the GPU does)."""
    x = (RNG.standard_normal((4, 4096)) * 3).astype(np.float32)
    y = (x + RNG.standard_normal(x.shape)).astype(np.float32)
    got = stats(kern, "float32", x, np.array([1, 2, 3, 4]), misalign=True)
    for key, want in ref_stats(x, np.array([1, 2, 3, 4])).items():
        close(got[key], want, TOL_F32, 1e-6)
    close(kl(kern, "float32", x, y, misalign=True)[0], ref_kl(x, y), TOL_F32, 1e-6)


# -------------------------------------------------------------------------- backward


def ref_ent_grad(x, ids, c_ent, c_lse, c_tlp):
    """d/dx of sum(c_ent H + c_lse lse + c_tlp log p[id]) in float64 (SPEC 4)."""
    st = ref_stats(x, ids)
    with np.errstate(invalid="ignore"):
        logp = x - st["logsumexp"][:, None]
        p = np.exp(logp)
        g = np.where(p > 0, -p * (logp + st["entropy"][:, None]), 0.0) * c_ent[:, None]
    g += p * (c_lse - c_tlp)[:, None]
    g[np.arange(len(ids)), ids] += c_tlp
    return g


def ref_kl_grad(a, b, c_kl, c_la, c_lb):
    la = a - ref_stats(a)["logsumexp"][:, None]
    lb = b - ref_stats(b)["logsumexp"][:, None]
    p, q = np.exp(la), np.exp(lb)
    with np.errstate(invalid="ignore"):
        ga = np.where(p > 0, p * (la - lb - ref_kl(a, b)[:, None]), 0.0) * c_kl[:, None]
    return ga + p * c_la[:, None], (q - p) * c_kl[:, None] + q * c_lb[:, None]


def close_grad(got, want, dtype):
    # 16-bit outputs round each entry (rel 2^-8 / 2^-11); entries sum terms of both signs,
    # so the absolute bound scales with the largest entry.
    rel = {"float32": 1e-4, "bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    close(got, want, rel, 1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", [None, 3])
def test_entropy_backward_matches_oracle(kern, dtype, blocks):
    """ops' grid (one element per thread) and a 3-block grid (the grid-stride loop)."""
    rows, vocab = 3, 4099
    raw = RNG.standard_normal((rows, vocab)) * 3
    raw[:, ::7] = NEG_INF  # masked tokens get exactly 0
    x = H.to_storage(raw, dtype)
    xv = H.values(x, dtype)
    ids = np.array([1, 100, vocab - 1])
    c = RNG.standard_normal((3, rows)).astype(np.float32)
    fwd = stats(kern, dtype, x, ids)
    for name, use_ids in (("entropy_bwd_ids", True), ("entropy_bwd", False)):
        c_tlp = c[2] if use_ids else np.zeros(rows, np.float32)
        g = H.entropy_bwd(kern, ops_item(name, dtype, vocab), x, fwd["logsumexp"], fwd["entropy"],
                          c[0], c[1], ids if use_ids else None, c_tlp if use_ids else None, blocks)
        gv = H.values(g, dtype)
        assert np.all(gv[:, ::7] == 0.0)
        want = ref_ent_grad(xv, ids if use_ids else np.zeros(rows, int), c[0].astype(np.float64),
                            c[1].astype(np.float64), c_tlp.astype(np.float64))
        close_grad(gv, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocks", [None, 2])
def test_kl_backward_matches_oracle(kern, dtype, blocks):
    rows, vocab = 3, 4099
    a = H.to_storage(RNG.standard_normal((rows, vocab)) * 3, dtype)
    b = H.to_storage(H.values(a, dtype) + RNG.standard_normal((rows, vocab)), dtype)
    av, bv = H.values(a, dtype), H.values(b, dtype)
    c = RNG.standard_normal((3, rows)).astype(np.float32)
    klv, la, lb = kl(kern, dtype, a, b)
    ga, gb = H.kl_bwd(kern, ops_item("kl_bwd", dtype, vocab), a, b, la, lb, klv, c[0], c[1], c[2], blocks)
    wa, wb = ref_kl_grad(av, bv, *(ci.astype(np.float64) for ci in c))
    close_grad(H.values(ga, dtype), wa, dtype)
    close_grad(H.values(gb, dtype), wb, dtype)


def test_fused_chain_equals_composed_vjp(kern):
    """The kernels' forward + backward chain equals mx.grad through mlxgate.ops' composed
    path (the CPU path) on the same float32 inputs."""
    rows, vocab = 3, 4099
    x = (RNG.standard_normal((rows, vocab)) * 3).astype(np.float32)
    y = (RNG.standard_normal((rows, vocab)) * 3).astype(np.float32)
    ids = np.array([5, 0, vocab - 1])
    w = RNG.standard_normal((4, rows)).astype(np.float32)

    def loss(a, b):
        st = ops.entropy_stats(a, mx.array(ids))
        return (mx.array(w[0]) * st["entropy"] + mx.array(w[1]) * st["logsumexp"]
                + mx.array(w[2]) * st["target_logprob"]).sum() + (mx.array(w[3]) * ops.kl(a, b)).sum()

    with ops.ops_mode("composed"):
        cx, cy = (np.array(g) for g in mx.grad(loss, argnums=(0, 1))(mx.array(x), mx.array(y)))
    fwd = stats(kern, "float32", x, ids)
    gx = H.entropy_bwd(kern, ops_item("entropy_bwd_ids", "float32", vocab), x, fwd["logsumexp"],
                       fwd["entropy"], w[0], w[1], ids, w[2])
    klv, la, lb = kl(kern, "float32", x, y)
    zero = np.zeros(rows, np.float32)
    ga, gb = H.kl_bwd(kern, ops_item("kl_bwd", "float32", vocab), x, y, la, lb, klv, w[3], zero, zero)
    for got, want in ((gx + ga, cx), (gb, cy)):
        close(got, want, 1e-4, 1e-5 * float(np.abs(want).max()))


# ------------------------------------------------------------------------ determinism


def test_twenty_launches_are_bit_identical(kern):
    """Free-running OS threads interleave differently on every launch, and seeded fiber
    schedules reorder every pass; the reduction order is fixed, so all give the same bits."""
    vocab = 32771
    x = (RNG.standard_normal((2, vocab)) * 4).astype(np.float32)
    y = (RNG.standard_normal((2, vocab)) * 4).astype(np.float32)
    ids = np.array([1, 2])
    first = stats(kern, "float32", x, ids)
    kl0 = kl(kern, "float32", x, y)
    runs = [("threads", 0, 1)] * 20 + [("fibers", seed, 2) for seed in range(1, 11)]
    try:
        for mode, seed, rows in runs:
            H.set_mode(kern, mode, seed)
            again = stats(kern, "float32", x[:rows], ids[:rows])
            for key in first:
                assert np.array_equal(again[key], first[key][:rows]), (mode, seed, key)
            for got, want in zip(kl(kern, "float32", x[:rows], y[:rows]), kl0):
                assert np.array_equal(got, want[:rows]), (mode, seed)
    finally:
        H.set_mode(kern, MODE, SEED)


# ------------------------------------------------- the harness can fail (mutation tests)

NEG_ENT = ("entropy_fwd_ids", "float32", 4099, 512, 1)
NEG_KL = ("kl_fwd", "float32", 4096, 128, 4)
MUTANTS = {
    # vocab_common.h: the rescale factor e^(m_old - m_new) becomes e^(m_new - m_old).
    "rescale_sign": ([NEG_ENT, NEG_KL], [
        ("float d = r.m - mn;", "float d = mn - r.m;"),
        ("float a = MLXG_EXP(r.ma - mn);", "float a = MLXG_EXP(mn - r.ma);"),
    ]),
    # The emulator: the last butterfly step reads the lane's own value, not its partner's.
    "shuffle_partner": ([NEG_ENT, NEG_KL], [
        ("mlxg_h::shfl_xor((v), (m))", "mlxg_h::shfl_xor((v), (m) == 1 ? 0 : (m))"),
    ]),
    # Bodies: no barrier before the second reduction; no alignment guard before vector loads;
    # the grid-stride loop one past the end; a grid stride that skips elements.
    "bodies": ([("entropy_fwd", "float32", 4096, 128, 4), NEG_KL,
                ("entropy_bwd", "float32", 4099, 512, 1), ("kl_bwd", "float32", 4099, 512, 1)], [
        ("MLXG_BARRIER();\nif (mlxg_warp == 0) {\n  MlxgEnt r", "if (mlxg_warp == 0) {\n  MlxgEnt r"),
        ("MLXG_ALIGNED16(ra) && MLXG_ALIGNED16(rb)", "true"),
        ("for (size_t i = mlxg_gid; i < total; i += mlxg_gsize) {\n  const size_t r = i / (size_t)V;\n"
         "  const float lp", "for (size_t i = mlxg_gid; i <= total; i += mlxg_gsize) {\n"
         "  const size_t r = i / (size_t)V;\n  const float lp"),
        ("i += mlxg_gsize) {\n  const size_t r = i / (size_t)V;\n  const float la",
         "i += mlxg_gsize + 1) {\n  const size_t r = i / (size_t)V;\n  const float la"),
    ]),
    # A shuffle reached by only half of warp 0's lanes (divergent __shfl_xor_sync: a hang).
    "divergent_shuffle": ([NEG_ENT], [("if (mlxg_warp == 0) {\n  MlxgEnt r", "if (mlxg_tid < 16) {\n  MlxgEnt r")]),
    # Not a mutant: metal_prelude.h's loads (vector steps on any row start, scalar reads).
    "metal_loads": ([ops_item(n, d, v) for n in ("entropy_fwd_ids", "kl_fwd")
                     for d, v in (("float32", 4096), ("bfloat16", 40000), ("float16", 32768))],
                    [('#include "host_runtime.h"', '#define MLXG_H_METAL_LOADS 1\n#include "host_runtime.h"')]),
    # Not a mutant: MLXG_EXP_FAST with 4 low bits cleared (relative error up to 2^-20, all one
    # way: 4x ex2.approx's bound, and biased).
    "coarse_exp": ([ops_item(n, d, v) for n in ("entropy_fwd_ids", "kl_fwd")
                    for d, v in (("float32", 40000), ("bfloat16", 32771), ("float16", 4099))],
                   [('#include "host_runtime.h"', '#define MLXG_H_EXP_FAST_DROP_BITS 4\n#include "host_runtime.h"')]),
}


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """{variant: HostKernels} of the MUTANTS sources (mutants and build variants), built
    concurrently."""
    srcs = []
    for items, edits in MUTANTS.values():
        src = H.source(items)
        for old, new in edits:
            assert old in src, f"mutation target not found: {old!r}"
            src = src.replace(old, new)
        srcs.append(src)
    sos = H.build(srcs, tmp_path_factory.mktemp("kernel_host_mutants"))
    return {name: H.HostKernels(so, items) for (name, (items, _)), so in zip(MUTANTS.items(), sos)}


@pytest.mark.parametrize("dtype,vocab", [("float32", 40000), ("bfloat16", 32771), ("float16", 4099)])
def test_forward_within_tolerance_under_a_coarse_fast_exp(kern, mutants, dtype, vocab):
    """Each per-element exp truncated to 20 significand bits (biased low, 4x the worst of
    ex2.approx): sums of up to 40,000 such terms still meet the oracle's tolerances."""
    m = mutants["coarse_exp"]
    x = H.to_storage(RNG.standard_normal((3, vocab)) * 4, dtype)
    y = H.to_storage(H.values(x, dtype) + RNG.standard_normal((3, vocab)), dtype)
    ids = np.array([0, 1, vocab - 1])
    coarse = check_fwd({it: m for it in m.items}, dtype, x, y, ids)
    exact = kern[ops_item("kl_fwd", dtype, vocab)]
    for t in (-1.0, -7.25, -30.5):  # the define took effect: low bits cleared, biased low
        e = math.exp(t)
        assert m.exp_fast(t) < exact.exp_fast(t) and abs(m.exp_fast(t) - e) <= 2.0**-19 * e
        assert abs(exact.exp_fast(t) - e) <= (2.0**-23 + abs(t) * 2.0**-24) * e


@pytest.mark.parametrize("dtype,vocab", [("float32", 4096), ("bfloat16", 40000), ("float16", 32768)])
@pytest.mark.parametrize("misalign", [False, True])
def test_metal_loads_take_the_vector_steps_on_any_row_start(mutants, dtype, vocab, misalign):
    """The Metal flavour of the loads (MLXG_ALIGNED16 true, element-wise LOAD_VEC): the
    vector-step loops run even on rows starting one element past a 16-byte boundary."""
    m = mutants["metal_loads"]
    km = {it: m for it in m.items}
    x = H.to_storage(RNG.standard_normal((3, vocab)) * 4, dtype)
    y = H.to_storage(H.values(x, dtype) + RNG.standard_normal((3, vocab)), dtype)
    xv, yv = H.values(x, dtype), H.values(y, dtype)
    ids = np.array([0, 7, vocab - 1])
    got = H.entropy_fwd(km, ops_item("entropy_fwd_ids", dtype, vocab), x, ids, misalign)
    for key, want in ref_stats(xv, ids).items():
        close(got[key], want, tol(dtype), 1e-6)
    close(H.kl_fwd(km, ops_item("kl_fwd", dtype, vocab), x, y, misalign)[0], ref_kl(xv, yv), tol(dtype), 1e-6)


def _neg_inputs(vocab):
    x = (RNG.standard_normal((3, vocab)) * 4).astype(np.float32)
    y = (x + RNG.standard_normal(x.shape)).astype(np.float32)
    return x, y, np.array([0, 1, 2])


@pytest.mark.parametrize("mutant", ["rescale_sign", "shuffle_partner"])
def test_wrong_math_or_wrong_shuffle_is_caught(kern, mutants, mutant):
    m = mutants[mutant]
    mk = {it: m for it in m.items}
    x, y, ids = _neg_inputs(NEG_ENT[2])
    want = ref_stats(x, ids)
    good = H.entropy_fwd(kern, NEG_ENT, x, ids)
    bad = H.entropy_fwd(mk, NEG_ENT, x, ids)
    close(good["entropy"], want["entropy"], TOL_F32, 1e-6)
    assert not np.allclose(bad["entropy"], want["entropy"], rtol=TOL_F32, atol=1e-6, equal_nan=True)
    a, b, _ = _neg_inputs(NEG_KL[2])
    close(H.kl_fwd(kern, NEG_KL, a, b)[0], ref_kl(a, b), TOL_F32, 1e-6)
    bad_kl = H.kl_fwd(mk, NEG_KL, a, b)
    assert not np.allclose(bad_kl[0], ref_kl(a, b), rtol=TOL_F32, atol=1e-6, equal_nan=True)
    assert not np.allclose(bad_kl[1], ref_stats(a)["logsumexp"], rtol=TOL_F32, atol=1e-6, equal_nan=True)


def test_missing_barrier_reads_poisoned_shared_memory(mutants):
    """In-order fibers run warp 0 through the second reduction before the other warps have
    stored their partials: it reads the NaN poison of fresh shared memory."""
    m = mutants["bodies"]
    item = m.items[0]
    x, _, _ = _neg_inputs(item[2])
    got = H.entropy_fwd({item: m}, item, x)
    assert np.all(np.isnan(got["entropy"]))


def test_checked_memory_catches_misaligned_oob_and_skipped_writes(mutants):
    m = mutants["bodies"]
    kmap = {it: m for it in m.items}
    a, b, _ = _neg_inputs(NEG_KL[2])
    close(H.kl_fwd(kmap, NEG_KL, a, b)[0], ref_kl(a, b), TOL_F32, 1e-6)  # aligned: still right
    with pytest.raises(H.KernelError, match="misaligned vector load from a"):
        H.kl_fwd(kmap, NEG_KL, a, b, misalign=True)
    x, _, _ = _neg_inputs(4099)
    lse, ent = ref_stats(x)["logsumexp"], ref_stats(x)["entropy"]
    ones = np.ones(3, np.float32)
    with pytest.raises(H.KernelError, match=r"out-of-bounds access to logits\[12297\]"):
        H.entropy_bwd(kmap, m.items[2], x, lse, ent, ones, ones)
    with pytest.raises(H.KernelError, match=r"output ga\[\d+\] written 0 times"):
        H.kl_bwd(kmap, m.items[3], x, x, lse, lse, np.zeros(3), ones, ones, ones, blocks=2)


@pytest.mark.parametrize("mode", ["fibers", "threads"])
def test_divergent_shuffle_is_reported_as_a_hang(mutants, mode):
    m = mutants["divergent_shuffle"]
    x, _, ids = _neg_inputs(NEG_ENT[2])
    m.set_mode(mode)
    m.set_watchdog(1.0)
    with pytest.raises(H.KernelError, match="not reached by all its threads"):
        H.entropy_fwd({NEG_ENT: m}, NEG_ENT, x, ids)
