"""mlxgate.analysis: zones, KL aggregates, rep_frac, loops, basins, spectra (SPEC §3.2–3.5, §5.4).

Oracles: hand-derived values on crafted inputs, float64 numpy, and mlx-lm's own LoRA fuse.
"""

import itertools
import json
import math
from collections import Counter
from dataclasses import asdict

import mlxgate  # noqa: F401  (loads OpenBLAS before mlx.core)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxgate.analysis import (
    PHI,
    BasinThresholds,
    LoopInfo,
    SpectralThresholds,
    aggregate_kl,
    attention_diagonal_stats,
    classify_basin,
    detect_loop,
    hidden_spectrum,
    kl_aggregates,
    lora_delta_spectrum,
    lora_singular_values,
    power_iteration,
    power_iteration_sigma_max,
    rep_frac,
    spectral_status,
    zone_bands,
    zone_counts,
    zone_of,
)
from mlxgate.errors import UserError

# ----------------------------------------------------------------------------------- zones


@pytest.mark.parametrize(
    "scheme,h,zone",
    [
        ("iris", 0.0, "LASER"),
        ("iris", 2.999999, "LASER"),
        ("iris", 3.0, "TRANSITION"),
        ("iris", 3.999999, "TRANSITION"),
        ("iris", 4.0, "LANTERN"),
        ("iris", 5.999999, "LANTERN"),
        ("iris", 6.0, "CHAOS"),
        ("iris", math.inf, "CHAOS"),
        ("phasegpt", 1.999999, "HYPER-LASER"),
        ("phasegpt", 2.0, "LASER"),
        ("phasegpt", 3.0, "TRANSITION"),
        ("phasegpt", 4.0, "LANTERN"),
        ("phasegpt", 6.0, "CHAOS"),
        ("cer", 1.999999, "LASER"),
        ("cer", 2.0, "CAGE"),
        ("cer", 3.499999, "CAGE"),
        ("cer", 3.5, "LANTERN"),
        ("cer", 4.999999, "LANTERN"),
        ("cer", 5.0, "CHAOS"),
    ],
)
def test_zone_of_boundaries_belong_to_upper_zone(scheme, h, zone):
    assert zone_of(h, scheme) == zone


def test_zone_bands_and_default_scheme():
    assert zone_bands() == [
        ("LASER", 0.0, 3.0),
        ("TRANSITION", 3.0, 4.0),
        ("LANTERN", 4.0, 6.0),
        ("CHAOS", 6.0, math.inf),
    ]
    assert [b[0] for b in zone_bands("cer")] == ["LASER", "CAGE", "LANTERN", "CHAOS"]
    assert zone_of(3.0) == "TRANSITION"


@pytest.mark.parametrize("scheme", ["iris", "phasegpt", "cer"])
def test_zone_counts_agree_with_zone_of(scheme):
    rng = np.random.default_rng(0)
    hs = np.concatenate([rng.uniform(0, 8, 200), [2.0, 3.0, 3.5, 4.0, 5.0, 6.0], [np.nan]])
    expected = Counter(zone_of(h, scheme) for h in hs if not np.isnan(h))
    counts = zone_counts(hs, scheme)
    assert list(counts) == [b[0] for b in zone_bands(scheme)]
    assert counts == {name: expected.get(name, 0) for name in counts}
    assert sum(counts.values()) == 206


def test_zone_errors():
    with pytest.raises(UserError, match="iris"):
        zone_of(1.0, "nope")
    with pytest.raises(ValueError):
        zone_of(float("nan"))


# ------------------------------------------------------------------------------ KL aggregates


def _loop_kl():
    """60-token completion, KL 0 except a 4-token loop at 5.7 nats (SPEC §5.4's example)."""
    kl = np.zeros(60)
    kl[30:34] = 5.7
    return kl


def test_kl_aggregates_loop_example_matches_spec():
    agg = kl_aggregates(_loop_kl())
    assert agg["n"] == 60
    assert agg["mean"] == pytest.approx(4 * 5.7 / 60, rel=1e-12)  # 0.38
    assert agg["rmse"] == pytest.approx(math.sqrt(4 * 5.7**2 / 60), rel=1e-12)  # 1.47
    # virtual index 0.95 * 59 = 56.05 lands inside the four 5.7s (sorted positions 56..59)
    assert agg["p95"] == pytest.approx(5.7, rel=1e-12)
    assert agg["max"] == 5.7
    tau = 0.5  # only the rmse barrier fires on the loop
    assert max(agg["mean"] - tau, 0.0) == 0.0
    assert agg["rmse"] - tau == pytest.approx(0.9717, abs=1e-3)
    for name in ("mean", "rmse", "p95", "max"):
        got = aggregate_kl(mx.array(_loop_kl(), dtype=mx.float32), name).item()
        assert got == pytest.approx(agg[name], rel=1e-6)


def test_p95_linear_interpolation_hand_value():
    vals = np.random.default_rng(1).permutation(np.arange(20.0))
    # index 0.95 * 19 = 18.05 -> 18 + 0.05 * (19 - 18)
    assert kl_aggregates(vals)["p95"] == pytest.approx(18.05, rel=1e-12)
    assert aggregate_kl(mx.array(vals, dtype=mx.float32), "p95").item() == pytest.approx(
        18.05, rel=1e-6
    )


@pytest.mark.parametrize("n", [1, 2, 3, 7, 21, 100, 1001])
def test_aggregates_match_numpy_with_mask(n):
    rng = np.random.default_rng(n)
    kl = rng.exponential(1.0, size=(n, 3)).astype(np.float32)
    mask = rng.uniform(size=(n, 3)) < 0.6
    mask.flat[0] = True
    sel = kl[mask].astype(np.float64)
    oracle = {
        "mean": sel.mean(),
        "rmse": math.sqrt(np.mean(sel**2)),  # reports are exact; the barrier adds 1e-8 (negligible here)
        "p95": np.percentile(sel, 95),
        "max": sel.max(),
    }
    agg = kl_aggregates(kl, mask)
    assert agg["n"] == int(mask.sum())
    for name, want in oracle.items():
        assert agg[name] == pytest.approx(want, rel=1e-12)
        got = aggregate_kl(mx.array(kl), name, mx.array(mask)).item()
        assert got == pytest.approx(want, rel=1e-5)


def test_aggregate_kl_is_pooled_over_batch():
    rng = np.random.default_rng(2)
    kl = rng.exponential(size=(2, 30)).astype(np.float32)
    mask = np.zeros((2, 30), bool)
    mask[0, 10:] = True
    mask[1, 25:] = True
    pooled = np.concatenate([kl[0, 10:], kl[1, 25:]])
    assert kl_aggregates(mx.array(kl), mx.array(mask)) == pytest.approx(kl_aggregates(pooled))
    for name in ("mean", "rmse", "p95", "max"):
        got = aggregate_kl(mx.array(kl), name, mx.array(mask)).item()
        assert got == pytest.approx(kl_aggregates(pooled)[name], rel=1e-5)


def test_aggregate_kl_gradients():
    rng = np.random.default_rng(3)
    kl = rng.permutation(np.arange(1.0, 31.0)).astype(np.float32) / 7.0
    mask = np.ones(30, bool)
    mask[[0, 5, 11]] = False
    sel = kl[mask].astype(np.float64)
    n = sel.size  # 27
    grads = {
        a: np.array(mx.grad(lambda k, a=a: aggregate_kl(k, a, mx.array(mask)))(mx.array(kl)))
        for a in ("mean", "rmse", "p95", "max")
    }
    np.testing.assert_allclose(grads["mean"], mask / n, rtol=1e-6)
    rmse = math.sqrt(np.mean(sel**2) + 1e-8)
    np.testing.assert_allclose(grads["rmse"], mask * kl / (n * rmse), rtol=1e-5)
    # p95 over 27 values: index 0.95 * 26 = 24.7 -> 0.3 on the 25th smallest, 0.7 on the 26th
    order = np.argsort(np.where(mask, kl, np.inf))
    want = np.zeros(30)
    want[order[24]], want[order[25]] = 0.3, 0.7
    np.testing.assert_allclose(grads["p95"], want, atol=1e-6)
    want = np.zeros(30)
    want[np.argmax(np.where(mask, kl, -np.inf))] = 1.0
    np.testing.assert_allclose(grads["max"], want, atol=0)


def test_aggregate_kl_empty_and_zero():
    empty = mx.zeros((4,), dtype=mx.bool_)
    assert kl_aggregates(np.ones(4), np.zeros(4, bool)) == {
        "mean": 0.0, "rmse": 0.0, "p95": 0.0, "max": 0.0, "n": 0
    }
    assert kl_aggregates([])["n"] == 0
    for name in ("mean", "rmse", "p95", "max"):
        val, grad = mx.value_and_grad(lambda k, a=name: aggregate_kl(k, a, empty))(mx.ones(4))
        assert val.item() == 0.0
        assert np.all(np.array(grad) == 0.0)
    # all-zero KL: rmse is sqrt(1e-8) and its gradient stays finite (the epsilon's job)
    val, grad = mx.value_and_grad(lambda k: aggregate_kl(k, "rmse"))(mx.zeros(8))
    assert val.item() == pytest.approx(1e-4, rel=1e-5)
    assert np.all(np.isfinite(np.array(grad)))


def test_aggregate_kl_compiles_and_rejects_unknown():
    kl = mx.array(_loop_kl(), dtype=mx.float32)
    mask = mx.array(np.arange(60) >= 5)
    f = mx.compile(lambda k, m: aggregate_kl(k, "p95", m))
    assert f(kl, mask).item() == pytest.approx(aggregate_kl(kl, "p95", mask).item(), rel=1e-7)
    with pytest.raises(UserError, match="rmse"):
        aggregate_kl(kl, "median")


# ---------------------------------------------------------------------------------- rep_frac


def _original_rep_frac(text):
    """steer-heal-love's filter statistic: most common whitespace 4-gram share."""
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return Counter(grams).most_common(1)[0][1] / len(grams) if grams else 1.0


PROSE = (
    "The morning light came slowly over the hills, and the village woke to the sound of carts on "
    "the old stone road. Maria walked to the bakery, where the owner was already arguing with a "
    "supplier about the price of flour. She bought two loaves, listened for a minute, and then "
    "went on toward the river, thinking about the letter she had not yet answered."
)


def test_rep_frac_crafted_values():
    assert rep_frac("") == 1.0
    assert rep_frac("   \n ") == 1.0
    assert rep_frac("hello") == 1.0
    assert rep_frac("two words") == 1.0  # one word bigram
    # words: 4-grams (a b a b) x2 of 3
    assert rep_frac("a b a b a b") == pytest.approx(2 / 3, abs=0)
    # 2-word loop: 4-grams (go home go home) x3 of 5
    assert rep_frac("go home go home go home go home") == pytest.approx(3 / 5, abs=0)
    # lowercased: (the cat the cat) x2 of 3 word 4-grams
    assert rep_frac("The cat the CAT the Cat") == pytest.approx(2 / 3, abs=0)
    # punctuation stays in the word: 8 distinct words (stripped they would all be "no" -> 1.0);
    # the best share is the character bigram "no", 8 of 29
    assert rep_frac("no. no! no, no? no; no: no- no") == pytest.approx(8 / 29, abs=0)
    # exactly 0.3: (a b) x3 of 10 word bigrams; no other gram shares more
    assert rep_frac("x a b y a b z a b w v") == 0.3


def test_rep_frac_character_loop_without_word_repetition():
    words = "one two three four five six seven eight nine ten "  # 49 chars, 10 unique words
    text = words + "z" * 60
    # words: 11 unique -> best 1/8 (4-grams); chars: "zz" x59 of 108 bigrams
    assert rep_frac(text) == pytest.approx(59 / 108, abs=0)
    # whitespace runs collapse, so padding does not count as repetition
    assert rep_frac("one two\n\n\n\n\n\n\n\n\n\n three four five six seven eight") == pytest.approx(
        rep_frac("one two three four five six seven eight"), abs=0
    )


def test_rep_frac_prose_and_loops():
    assert 0.0 < rep_frac(PROSE) < 0.3
    looping = PROSE[:80] + " no no no no no no no no no no no no"
    assert rep_frac(looping) >= 0.3
    # a 4-word sentence repeated: (i will help you.) 4-grams x8 of 29, under the 0.3 filter:
    # why the token-loop detector runs on every completion (SPEC §5.8)
    assert rep_frac("I will help you. " * 8) == pytest.approx(8 / 29, abs=0)
    for text in (PROSE, looping, "I will help you. " * 8, "A b. a B. a b.", "x"):
        assert rep_frac(text) >= _original_rep_frac(text)


# ------------------------------------------------------------------------------ detect_loop


def test_detect_loop_crafted():
    assert detect_loop([]) is None
    assert detect_loop([5]) is None
    assert detect_loop([5, 5]) is None
    assert detect_loop([5, 5, 5]) == LoopInfo(period=1, start=0, repeats=3)
    assert detect_loop(list(range(40))) is None
    assert detect_loop([1, 2, 3] + [9] * 5) == LoopInfo(1, 3, 5)
    assert detect_loop([4, 5, 6] + [1, 2] * 4) == LoopInfo(2, 3, 4)
    prefix = list(range(100, 117))  # 17 tokens, none in the loop
    assert detect_loop(prefix + [1, 2, 3, 4] * 5) == LoopInfo(4, 17, 5)
    # ends mid-period: still the same loop, 3 full periods + 2 tokens
    assert detect_loop(prefix + [1, 2, 3, 4] * 3 + [1, 2]) == LoopInfo(4, 17, 3)
    # a prefix token equal to the period's last token extends the loop back by one
    assert detect_loop(prefix[:-1] + [4] + [1, 2, 3, 4] * 3) == LoopInfo(4, 16, 3)


def test_detect_loop_only_at_the_end_and_shortest_period():
    assert detect_loop([1, 2] * 10 + list(range(10, 30))) is None
    assert detect_loop([7] * 8) == LoopInfo(1, 0, 8)  # period 1, not 2
    assert detect_loop([1, 2] * 6) == LoopInfo(2, 0, 6)  # period 2, not 4
    assert detect_loop([1, 2] * 6, min_period=3) == LoopInfo(4, 0, 3)  # multiples also hold


def test_detect_loop_parameters_and_inputs():
    two = [9, 1, 2, 3, 1, 2, 3]
    assert detect_loop(two) is None
    assert detect_loop(two, min_repeats=2) == LoopInfo(3, 1, 2)
    p17 = [999] + list(range(17)) * 3
    assert detect_loop(p17) is None
    assert detect_loop(p17, max_period=17) == LoopInfo(17, 1, 3)
    p16 = [999] + list(range(16)) * 3
    assert detect_loop(p16) == LoopInfo(16, 1, 3)
    ids = [3, 8] + [5, 6, 7] * 4
    want = LoopInfo(3, 2, 4)
    assert detect_loop(np.array(ids, dtype=np.int64)) == want
    assert detect_loop(mx.array(ids, dtype=mx.uint32)) == want


# ---------------------------------------------------------------------------------- basins

DISTINCT = list(range(1000, 1100))  # 100 tokens that never repeat


def _basin(ids, text=PROSE, h=2.5, ppl=10.0, **kw):
    return classify_basin(ids, text, h, ppl, BasinThresholds(**kw) if kw else BasinThresholds())


def test_basin_token_collapse_single_token_edge():
    at = _basin(DISTINCT + [7] * 16 + list(range(300, 316)))
    assert at.basin == "TOKEN_COLLAPSE"
    assert (at.top_token, at.top_token_frac) == (7, 0.5)
    below = _basin(DISTINCT + [7] * 15 + list(range(300, 317)))
    assert below.top_token_frac == 15 / 32
    assert below.basin == "CREATIVE"
    scattered = [t for i in range(16) for t in (7, 500 + i)]  # 7 every other token, no loop
    assert _basin(DISTINCT + scattered).basin == "TOKEN_COLLAPSE"
    # short completions are measured against the whole window of 32
    assert _basin([5] * 15, text=PROSE).basin != "TOKEN_COLLAPSE"
    assert _basin([5] * 16, text=PROSE).basin == "TOKEN_COLLAPSE"
    assert _basin(DISTINCT + [7] * 8, collapse_window=16).basin == "TOKEN_COLLAPSE"


def test_basin_token_collapse_period_two_edge():
    at = _basin(DISTINCT + [1, 2] * 8)
    assert at.basin == "TOKEN_COLLAPSE"
    assert at.top_token_frac == 8 / 32 and at.short_loop_frac == 0.5
    # a period-2 stretch inside the window (not at the end) counts too
    assert _basin(DISTINCT + [1, 2] * 8 + list(range(300, 310))).basin == "TOKEN_COLLAPSE"
    below = _basin(DISTINCT + [1, 2] * 7 + [1])  # 15 tokens: too short to collapse
    assert below.short_loop_frac == 15 / 32
    assert below.basin == "SEMANTIC_LOOP"
    assert below.loop == LoopInfo(period=2, start=100, repeats=7)  # smallest period reported


def test_basin_semantic_loop_by_period():
    five = _basin(DISTINCT + [1, 2, 3, 4, 5] * 3)
    assert five.basin == "SEMANTIC_LOOP" and five.loop == LoopInfo(5, 100, 3)
    assert _basin(DISTINCT + [1, 2, 3, 4, 5] * 2).basin == "CREATIVE"
    assert _basin(DISTINCT + list(range(16)) * 3).loop == LoopInfo(16, 100, 3)
    p17 = _basin(DISTINCT + list(range(17)) * 3)
    assert p17.loop is None and p17.basin == "CREATIVE"
    assert _basin(DISTINCT + [1, 2, 3] * 3).basin == "SEMANTIC_LOOP"
    # the loop must still hold at the end
    assert _basin([1, 2, 3] * 10 + DISTINCT).basin == "CREATIVE"


def test_basin_semantic_loop_by_rep_frac_edges():
    at = "x a b y a b z a b w v"  # rep_frac exactly 0.3, 11 words
    assert _basin(DISTINCT, text=at).basin == "SEMANTIC_LOOP"
    below = "x a b y a b z a b w v u"  # 3/11
    assert rep_frac(below) < 0.3
    assert _basin(DISTINCT, text=below).basin == "CREATIVE"
    assert _basin(DISTINCT, text=at, rep_frac_max=0.31).basin == "CREATIVE"
    # short texts: rep_frac >= 1/3 by construction, so the rule skips them (default 7 words)
    assert _basin(DISTINCT[:3], text="Yes, of course.").basin == "CREATIVE"
    assert _basin(DISTINCT[:3], text="Yes, of course.", rep_frac_min_words=0).basin == (
        "SEMANTIC_LOOP"
    )


def test_basin_creative_and_unknown_edges():
    assert _basin(DISTINCT, h=2.0, ppl=49.999).basin == "CREATIVE"
    assert _basin(DISTINCT, h=1.999, ppl=10.0).basin == "UNKNOWN"
    assert _basin(DISTINCT, h=3.0, ppl=50.0).basin == "UNKNOWN"
    assert _basin(DISTINCT, h=3.0, ppl=None).basin == "UNKNOWN"
    assert _basin(DISTINCT, h=None, ppl=5.0).basin == "UNKNOWN"
    assert _basin(DISTINCT, h=1.5, ppl=10.0, creative_min_entropy=1.5).basin == "CREATIVE"
    # rules are ordered: a collapse is a collapse whatever its entropy and perplexity
    assert _basin([7] * 40, h=3.0, ppl=2.0).basin == "TOKEN_COLLAPSE"
    assert _basin([], text="", h=None, ppl=None).basin == "UNKNOWN"


def test_results_are_json_serialisable():
    res = _basin(DISTINCT + [1, 2, 3, 4, 5] * 3)
    back = json.loads(json.dumps(asdict(res)))
    assert back["loop"] == {"period": 5, "start": 100, "repeats": 3}
    json.dumps(asdict(hidden_spectrum(np.eye(5))))
    json.dumps(kl_aggregates(_loop_kl()))
    json.dumps(lora_delta_spectrum(np.ones((4, 2)), np.ones((2, 3)), 2.0))
    json.dumps(asdict(attention_diagonal_stats(np.tril(np.ones((3, 3))))))


# --------------------------------------------------------------------------------- spectrum


def _orthonormal(rng, rows, cols, exclude_ones=False):
    """rows x cols orthonormal columns; optionally orthogonal to the all-ones vector too."""
    m = rng.standard_normal((rows, cols + exclude_ones))
    if exclude_ones:
        m[:, 0] = 1.0
    q, _ = np.linalg.qr(m)
    return q[:, 1:] if exclude_ones else q


def _known_spectrum_matrix(s, tokens=40, dim=12, seed=0):
    """[tokens, dim] matrix whose centered singular values are exactly s (plus a row offset)."""
    rng = np.random.default_rng(seed)
    u = _orthonormal(rng, tokens, len(s), exclude_ones=True)  # columns have zero mean
    v = _orthonormal(rng, dim, len(s))
    offset = rng.standard_normal(dim) * 3.0  # removed by centering
    return u @ np.diag(s) @ v.T + offset


def _expected_metrics(s, tokens):
    lam = np.asarray(s, float) ** 2 / (tokens - 1)
    p = lam / lam.sum()
    h = -np.sum(p * np.log(p))
    return lam, h / math.log(len(lam)), math.exp(h), p[0], 1 - min(
        abs(lam[0] / lam[1] - PHI) / PHI, 1
    )


def test_hidden_spectrum_known_spectrum():
    s = [5.0, 3.0, 2.0, 1.5, 1.0, 0.5]
    x = _known_spectrum_matrix(s)
    lam, hs, erank, dom, phi = _expected_metrics(s, 40)
    m = hidden_spectrum(x)
    assert m.rank == 6 and m.n_tokens == 40 and m.dim == 12
    np.testing.assert_allclose(m.eigenvalues, lam, rtol=1e-9)
    assert m.spectral_entropy == pytest.approx(hs, rel=1e-9)
    assert m.effective_rank == pytest.approx(erank, rel=1e-9)
    assert m.dominant_ratio == pytest.approx(dom, rel=1e-9)
    assert m.phi_proximity == pytest.approx(phi, rel=1e-9)
    assert m.total_variance == pytest.approx(lam.sum(), rel=1e-9)
    assert m.status == spectral_status(hs, dom)
    # float32 mlx input, leading dims flattened into tokens
    m32 = hidden_spectrum(mx.array(x.reshape(4, 10, 12), dtype=mx.float32))
    assert m32.rank == 6
    np.testing.assert_allclose(m32.eigenvalues, lam, rtol=1e-5)
    assert m32.spectral_entropy == pytest.approx(hs, rel=1e-5)


@pytest.mark.parametrize("tokens,dim", [(40, 12), (9, 30)])
def test_hidden_spectrum_gram_method_matches_svd(tokens, dim):
    s = [5.0, 3.0, 2.0, 1.5, 1.0, 0.5][: min(tokens - 1, dim)]
    low_rank = _known_spectrum_matrix(s, tokens=tokens, dim=dim)
    full = np.random.default_rng(7).standard_normal((tokens, dim))
    for x in (low_rank, full, mx.array(low_rank, dtype=mx.float32)):
        a, b = hidden_spectrum(x), hidden_spectrum(x, method="gram")
        assert a.rank == b.rank
        np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-9)
        for f in ("spectral_entropy", "effective_rank", "dominant_ratio", "phi_proximity"):
            assert getattr(b, f) == pytest.approx(getattr(a, f), rel=1e-9)
    with pytest.raises(ValueError, match="gram"):
        hidden_spectrum(full, method="eig")


def test_hidden_spectrum_isotropic_phi_and_top():
    iso = hidden_spectrum(_known_spectrum_matrix([2.0] * 10, tokens=30, dim=16))
    assert iso.rank == 10
    assert iso.spectral_entropy == pytest.approx(1.0, rel=1e-9)
    assert iso.effective_rank == pytest.approx(10.0, rel=1e-9)
    assert iso.dominant_ratio == pytest.approx(0.1, rel=1e-9)
    assert iso.status == "HEALTHY"
    assert len(iso.eigenvalues) == 8  # top few only
    golden = hidden_spectrum(_known_spectrum_matrix([math.sqrt(PHI), 1.0, 0.5]))
    assert golden.phi_proximity == pytest.approx(1.0, abs=1e-9)
    far = hidden_spectrum(_known_spectrum_matrix([math.sqrt(2 * PHI) * 1.01, 1.0]))
    assert far.phi_proximity == 0.0


def test_hidden_spectrum_degenerate():
    rank1 = hidden_spectrum(_known_spectrum_matrix([3.0]))
    assert rank1.rank == 1
    assert (rank1.spectral_entropy, rank1.effective_rank) == (0.0, pytest.approx(1.0))
    assert rank1.dominant_ratio == pytest.approx(1.0) and rank1.phi_proximity == 0.0
    assert rank1.status == "WARNING"
    for x, method in itertools.product(
        (np.zeros((10, 4)), np.tile(np.arange(4.0), (10, 1)), np.ones((1, 4)), np.ones((0, 4))),
        ("svd", "gram"),
    ):
        m = hidden_spectrum(x, method=method)
        assert (m.rank, m.spectral_entropy, m.effective_rank, m.dominant_ratio) == (0, 0, 0, 0)
        assert m.eigenvalues == [] and m.status == "WARNING"
    with pytest.raises(ValueError):
        hidden_spectrum(np.ones(5))


@pytest.mark.parametrize(
    "hs,dom,status",
    [
        (0.9, 0.1, "HEALTHY"),
        (0.5000001, 0.3999999, "HEALTHY"),
        (0.5, 0.1, "DRIFTING"),  # Hs must be > 0.5
        (0.9, 0.4, "DRIFTING"),  # dominant must be < 0.4
        (0.3500001, 0.5999999, "DRIFTING"),
        (0.35, 0.1, "WARNING"),
        (0.9, 0.6, "WARNING"),
        (0.1, 0.9, "WARNING"),
    ],
)
def test_spectral_status_edges(hs, dom, status):
    assert spectral_status(hs, dom) == status


def test_spectral_status_custom_thresholds():
    t = SpectralThresholds(healthy_entropy=0.8, healthy_dominant=0.2)
    assert spectral_status(0.7, 0.1, t) == "DRIFTING"
    assert spectral_status(0.81, 0.1, t) == "HEALTHY"


# ------------------------------------------------------------------------------------- LoRA


def _lora_factors(sing, d_in=48, d_out=40, seed=0):
    """mlx-lm layout lora_a [in, r], lora_b [r, out] with lora_a @ lora_b = Qa diag(sing) Qb^T."""
    rng = np.random.default_rng(seed)
    qa = _orthonormal(rng, d_in, len(sing))
    qb = _orthonormal(rng, d_out, len(sing))
    mix = _orthonormal(rng, len(sing), len(sing))  # factors themselves not orthogonal
    a = qa @ np.diag(sing) @ mix
    b = mix.T @ qb.T
    return a, b


def test_lora_singular_values_match_full_svd():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((48, 6)), rng.standard_normal((6, 40))
    full = np.linalg.svd(-2.0 * (a @ b).T, compute_uv=False)
    np.testing.assert_allclose(lora_singular_values(a, b, -2.0), full[:6], rtol=1e-10)
    out = lora_delta_spectrum(a, b, -2.0)
    top = full[:6]
    p = top / top.sum()
    assert out["sigma_max"] == pytest.approx(top[0], rel=1e-10)
    assert out["rank"] == 6
    assert out["spectral_entropy"] == pytest.approx(-np.sum(p * np.log(p)) / math.log(6), rel=1e-9)
    assert out["effective_rank"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)
    a2, b2 = _lora_factors([4.0, 1.0, 0.8, 0.5])
    np.testing.assert_allclose(lora_singular_values(a2, b2, 2.0), [8.0, 2.0, 1.6, 1.0], rtol=1e-10)


def test_lora_delta_spectrum_matches_mlx_lm_fuse():
    from mlx_lm.tuner.lora import LoRALinear

    mx.random.seed(0)
    base = nn.Linear(24, 20, bias=False)
    layer = LoRALinear.from_base(base, r=4, scale=2.0)
    layer.lora_b = mx.random.normal(layer.lora_b.shape)
    delta = np.array(layer.fuse().weight) - np.array(base.weight)  # [out, in]
    want = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    out = lora_delta_spectrum(layer.lora_a, layer.lora_b, layer.scale)
    np.testing.assert_allclose(out["singular_values"], want[:4], rtol=1e-4)


def test_lora_fresh_adapter_is_zero():
    out = lora_delta_spectrum(np.ones((8, 2)), np.zeros((2, 5)), 2.0)
    assert out == {
        "sigma_max": 0.0,
        "spectral_entropy": 0.0,
        "effective_rank": 0.0,
        "rank": 0,
        "singular_values": [0.0, 0.0],
    }
    with pytest.raises(ValueError):
        lora_delta_spectrum(np.ones((8, 2)), np.ones((3, 5)), 2.0)


def test_power_iteration_converges():
    a, b = _lora_factors([4.0, 1.0, 0.8, 0.5])  # σ(ΔW) = 8, 2, ...: gap 4
    a, b = mx.array(a, dtype=mx.float32), mx.array(b, dtype=mx.float32)
    three = power_iteration_sigma_max(a, b, 2.0).item()  # SPEC §5.4: 3 steps
    assert three == pytest.approx(8.0, rel=1e-3)
    assert three <= 8.0 * (1 + 1e-6)  # a Rayleigh-type estimate never overshoots
    assert power_iteration_sigma_max(a, b, 2.0, steps=60).item() == pytest.approx(8.0, rel=1e-5)
    assert power_iteration_sigma_max(a, b, -2.0, steps=60).item() == pytest.approx(8.0, rel=1e-5)
    # warm start from the returned vector: already converged, zero further steps
    _, v = power_iteration(a, b, 2.0, steps=60)
    warm = power_iteration_sigma_max(a, b, 2.0, steps=0, v0=v).item()
    assert warm == pytest.approx(8.0, rel=1e-5)


def test_power_iteration_gradient_is_top_singular_pair():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((48, 6)), rng.standard_normal((6, 40))
    scale = 2.0
    u_, s_, vt_ = np.linalg.svd(scale * (a @ b).T)
    u, v = u_[:, 0], vt_[0]  # [out], [in]; signs cancel in the products below
    want_da = scale * np.outer(v, b @ u)  # dσ/d lora_a, [in, r]
    want_db = scale * np.outer(a.T @ v, u)  # dσ/d lora_b, [r, out]
    f = mx.value_and_grad(lambda x, y: power_iteration_sigma_max(x, y, scale, steps=200), [0, 1])
    sigma, (da, db) = f(mx.array(a, dtype=mx.float32), mx.array(b, dtype=mx.float32))
    assert sigma.item() == pytest.approx(s_[0], rel=1e-5)
    np.testing.assert_allclose(np.array(da), want_da, atol=1e-4 * np.abs(want_da).max())
    np.testing.assert_allclose(np.array(db), want_db, atol=1e-4 * np.abs(want_db).max())


def test_power_iteration_fresh_adapter_has_finite_zero_gradient():
    a, b = mx.ones((16, 4)) * 0.1, mx.zeros((4, 12))
    f = mx.value_and_grad(lambda x, y: power_iteration_sigma_max(x, y, 2.0), [0, 1])
    sigma, grads = f(a, b)
    assert sigma.item() == 0.0
    for g in grads:
        assert np.all(np.array(g) == 0.0)


# ------------------------------------------------------------------------- attention diagonal


def test_attention_diagonal_is_the_causal_spectrum():
    rng = np.random.default_rng(6)
    scores = rng.standard_normal((3, 7, 7))
    scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    st = attention_diagonal_stats(attn)
    diag = np.diagonal(attn, axis1=-2, axis2=-1)
    assert st.label == "attention diagonal (not a spectrum)"
    assert st.causal and st.n == 21
    assert st.max == 1.0  # position 0 attends only to itself
    assert (st.mean, st.std, st.min) == (
        pytest.approx(diag.mean()), pytest.approx(diag.std()), pytest.approx(diag.min())
    )
    for h in range(3):  # SPEC §3.5: eigenvalues of causal attention are its diagonal
        np.testing.assert_allclose(
            np.sort(np.linalg.eigvals(attn[h]).real), np.sort(diag[h]), atol=1e-9
        )
    assert not attention_diagonal_stats(np.full((4, 4), 0.25)).causal
    with pytest.raises(ValueError):
        attention_diagonal_stats(np.ones((3, 4)))
